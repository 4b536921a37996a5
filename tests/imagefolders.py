"""Helpers for tests: tiny ImageFolder trees of easily separable colour images, a tiny architecture, and a CPU-friendly
environment."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from repvgg import RepVGGConfig

COLOURS = ((220, 40, 40), (40, 200, 40), (40, 40, 220))
REPO = Path(__file__).resolve().parents[1]


def make_split(root: Path, split: str, per_class: int, size: int = 16, seed: int = 0) -> Path:
    """``root/split/classK/*.png``: one dominant colour per class plus noise."""
    rng = np.random.default_rng(seed + len(split))
    for c, colour in enumerate(COLOURS):
        folder = root / split / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.normal(0, 30, (size, size, 3)) + np.array(colour)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root / split


def make_dataset(root: Path, train: int = 16, val: int = 4, size: int = 16) -> Path:
    """A data folder with train/ and val/ splits of three classes."""
    make_split(root, "train", train, size)
    make_split(root, "val", val, size, seed=1)
    return root


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: one compute thread each (the machine is small and shared)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"), **extra)
    return env


PYTHON = sys.executable
# an architecture of a test's own (16-128 channels, six blocks) for the tests of run machinery, where a registered
# one would only cost time
TINY_MODEL = str(REPO / "tests" / "tiny_repvgg.json")
TINY_ARCH = RepVGGConfig.from_dict(json.loads(Path(TINY_MODEL).read_text()))  # the same, for the library's calls
TINY_TRAIN = ["--model", TINY_MODEL, "--recipe", "cifar", "--img-size", "16", "--eval-resize", "16",
              "--strides", "2", "2", "2", "2", "2", "--batch-size", "8", "--workers", "0", "--no-tensorboard",
              "--warmup-epochs", "0", "--no-probe"]
