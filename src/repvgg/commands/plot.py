"""``repvgg plot``: a training run's loss, top-1 and learning-rate curves as an image."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..files import Outputs
from .args import figure_file

WRITES = True


def inputs(args: argparse.Namespace) -> list[str]:
    """The run's metrics files (its curves image is this command's own output)."""
    from ..training.metrics import METRICS_FILES

    return [str(Path(args.run_dir) / name) for name in METRICS_FILES]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a `repvgg train` output directory")
    p.add_argument("--out", type=figure_file, help="image file (default RUN_DIR/curves.png)")


def run(args: argparse.Namespace, outputs: Outputs) -> None:
    from ..training.plot import plot_run

    out = outputs.file(args.out or Path(args.run_dir) / "curves.png")
    print(f"curves -> {plot_run(args.run_dir, out)}")
