"""Data: image preprocessing shared by training, evaluation and prediction.

Checkpoints carry their preprocessing as metadata under ``preprocess`` (see :data:`IMAGENET_PREPROCESS`),
so that evaluation and prediction see images exactly as training did.
"""

from __future__ import annotations

from typing import Any

from PIL import Image
from torchvision import transforms

__all__ = ["IMAGENET_PREPROCESS", "eval_transform", "to_rgb"]

IMAGENET_PREPROCESS: dict[str, Any] = {
    "resize": 256,  # shorter side before the centre crop
    "crop": 224,  # the network's input side
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette and RGBA images become 3-channel RGB."""
    return image if image.mode == "RGB" else image.convert("RGB")


def eval_transform(preprocess: dict[str, Any] | None = None) -> transforms.Compose:
    """PIL image -> normalized tensor: resize the shorter side, centre-crop, to tensor, normalize (RGB)."""
    p = {**IMAGENET_PREPROCESS, **(preprocess or {})}
    return transforms.Compose([
        transforms.Lambda(to_rgb),
        transforms.Resize(p["resize"]),
        transforms.CenterCrop(p["crop"]),
        transforms.ToTensor(),
        transforms.Normalize(p["mean"], p["std"]),
    ])
