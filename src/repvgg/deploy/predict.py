"""Top-k prediction on image files with a checkpoint's preprocessing and class names, on the fastest engine."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import RepVGGError
from ..models.preprocess import eval_transform
from ..training.data import READ_ERRORS, read_image, upright
from .engines import class_names_for, create_engine
from .probe import fastest_engine
from .sources import Artifact

__all__ = ["predict"]


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
            topk: int = 5) -> list[list[tuple[str, float]]]:
    """Top-``topk`` (class name, probability) per image, with the checkpoint's preprocessing and class names
    from ``metadata`` (``preprocess``, ``class_names``; ImageNet preprocessing and class indices when absent).

    ``model`` is a deploy model run on ``engine``, or an exported file opened with
    :func:`~repvgg.deploy.sources.open_artifact` (its own metadata is the default)."""
    if not images:
        raise RepVGGError("no images given")
    if topk < 1:
        raise RepVGGError(f"top-k must be at least 1, got {topk}")
    if getattr(model, "num_classes", None) == 0:
        raise RepVGGError("the model has no classifier (no linear.* weights): there are no classes to predict")
    metadata = metadata or (model.metadata if isinstance(model, Artifact) else {})
    transform = eval_transform(metadata.get("preprocess"))
    batch = torch.stack([transform(upright(im) if isinstance(im, Image.Image) else _load_image(im)) for im in images])
    run = model.run if isinstance(model, Artifact) else create_engine(
        model, engine or fastest_engine(batch_size=len(batch)), tuple(batch.shape[-2:]), batch_size=len(batch))
    logits = torch.from_numpy(np.ascontiguousarray(run(batch.numpy())))
    if not bool(logits.isfinite().all()):
        raise RepVGGError("model outputs are not finite (NaN or inf): the weights are broken")
    probs = torch.softmax(logits, dim=1)
    names = class_names_for(metadata, probs.shape[1])
    values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
    return [[(names[i], p) for p, i in zip(vs, ix, strict=True)] for vs, ix in zip(values.tolist(), indices.tolist(),
                                                                                 strict=True)]
