"""Top-k prediction on image files with a checkpoint's preprocessing and class names, on the fastest engine; and the
image files that paths, folders and glob patterns name."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import RepVGGError
from ..models.preprocess import eval_transform, input_size
from ..training.data import IMAGE_EXTENSIONS, READ_ERRORS, is_image_file, read_image, upright
from .engines import class_names_for, create_engine
from .probe import fastest_engine
from .sources import Artifact

__all__ = ["predict", "image_files"]

Prediction = list[tuple[str, float]]


def _folder_images(folder: str) -> list[str]:
    """The image files below ``folder``, sorted."""
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() and is_image_file(p))


def image_files(specs: Sequence[str | os.PathLike]) -> list[str]:
    """The image files that ``specs`` name, in order and each once: a file as given, a folder's image files
    (searched recursively, sorted), and a glob pattern's matches (``val/cat/*.jpg``, ``**`` recursive: for shells
    that leave a pattern unexpanded, quoted or matching nothing), whose folders are searched likewise. A pattern
    or folder that yields no image is an error; a plain path is passed on (reading it names what is wrong)."""
    out: list[str] = []
    for spec in map(str, specs):
        if os.path.isdir(spec):
            found = _folder_images(spec)
            if not found:
                raise RepVGGError(f"no image files in the folder {spec} (the kinds read: "
                                  f"{', '.join(IMAGE_EXTENSIONS)})")
        elif not os.path.exists(spec) and glob.has_magic(spec):
            found = [f for m in sorted(glob.glob(spec, recursive=True))
                     for f in (_folder_images(m) if os.path.isdir(m) else [m] if is_image_file(m) else [])]
            if not found:
                raise RepVGGError(f"no image file matches {spec}")
        else:
            found = [spec]
        out += found
    return list(dict.fromkeys(out))


def _load_image(path: str | os.PathLike) -> Image.Image:
    """The image file read as training and evaluation read it, or a one-line error."""
    try:
        return read_image(path)
    except RepVGGError:
        raise
    except (FileNotFoundError, IsADirectoryError):
        raise RepVGGError(f"image not found: {path}") from None
    except READ_ERRORS as e:
        raise RepVGGError(f"cannot read image {path}: {e}") from None


def predict(model: nn.Module | Artifact, images: Sequence[str | os.PathLike | Image.Image],
            engine: str | None = None, metadata: dict[str, Any] | None = None,
            topk: int = 5, batch_size: int = 32) -> list[Prediction]:
    """Top-``topk`` (class name, probability) per image, with the checkpoint's preprocessing and class names
    from ``metadata`` (``preprocess``, ``class_names``; ImageNet preprocessing and class indices when absent).

    ``model`` is a deploy model run on ``engine``, or an exported file opened with
    :func:`~repvgg.deploy.sources.open_artifact` (its own metadata is the default). Images are read and run
    ``batch_size`` at a time, so a folder of any size fits in memory."""
    if not images:
        raise RepVGGError("no images given")
    if topk < 1 or batch_size < 1:
        raise RepVGGError(f"top-k and the batch size must be at least 1, got {topk} and {batch_size}")
    if getattr(model, "num_classes", None) == 0:
        raise RepVGGError("the model has no classifier (no linear.* weights): there are no classes to predict")
    metadata = metadata or (model.metadata if isinstance(model, Artifact) else {})
    transform = eval_transform(metadata.get("preprocess"))
    size = min(batch_size, len(images))
    run = model.run if isinstance(model, Artifact) else create_engine(
        model, engine or fastest_engine(batch_size=size), input_size(metadata), batch_size=size)
    results: list[Prediction] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch = torch.stack([transform(upright(im) if isinstance(im, Image.Image) else _load_image(im))
                             for im in chunk])
        results += _top(torch.from_numpy(np.ascontiguousarray(run(batch.numpy()))), metadata, topk)
    return results


def _top(logits: torch.Tensor, metadata: dict[str, Any], topk: int) -> list[Prediction]:
    """The ``topk`` classes of each row of ``logits``, with their names and softmax probabilities."""
    if not bool(logits.isfinite().all()):
        raise RepVGGError("model outputs are not finite (NaN or inf): the weights are broken")
    probs = torch.softmax(logits, dim=1)
    names = class_names_for(metadata, probs.shape[1])
    values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
    return [[(names[i], p) for p, i in zip(vs, ix, strict=True)] for vs, ix in zip(values.tolist(), indices.tolist(),
                                                                                 strict=True)]
