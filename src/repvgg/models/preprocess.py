"""What the network sees: 8-bit RGB images resized, centre-cropped and normalized as the checkpoint's ``preprocess``
metadata says (``resize``, ``crop``, ``mean``, ``std``). Training, evaluation, export, prediction and quantization
all read it from here, so that every phase feeds the network exactly what it was trained on."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from torch import nn

from ..errors import RepVGGError

if TYPE_CHECKING:
    from torchvision import transforms

__all__ = ["IMAGENET_PREPROCESS", "CROP_FRACTION", "resize_for", "preprocess_settings", "preprocess_for_size",
           "input_size", "to_rgb", "eval_crop", "eval_transform", "resolve_data_config", "create_transform"]

IMAGENET_PREPROCESS: dict[str, Any] = {
    "resize": 256,  # shorter side before the centre crop
    "crop": 224,  # the network's input side
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
CROP_FRACTION = 0.875  # the centre crop's share of the resized side (224 of 256), the ImageNet convention


def resize_for(crop: int) -> int:
    """The shorter side to resize to before a centre crop of ``crop``."""
    return round(crop / CROP_FRACTION)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any image becomes 3-channel 8-bit RGB; greyscale deeper than 8 bits is scaled first, which PIL's
    ``convert("RGB")`` does not do (it clips, so a 16-bit PNG would turn white)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """Modes ``I;16*`` span 0..65535; ``I`` and ``F`` are on PIL's 8-bit scale unless a value exceeds 255 (then
    16-bit), and ``F`` within [0, 1] is taken as normalized."""
    pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))
    peak = pixels.max(initial=0.0)
    if image.mode.startswith("I;16") or peak > 255:
        pixels = pixels * (255 / 65535)
    elif image.mode == "F" and peak <= 1:
        pixels = pixels * 255
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")


def _size_ok(value: Any) -> bool:
    """A positive integer, or [height, width] of positive integers."""
    if isinstance(value, list | tuple):
        return len(value) == 2 and all(_size_ok(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _stats_ok(value: Any, positive: bool) -> bool:
    """1 or 3 finite numbers (one per channel), all > 0 when ``positive``."""
    return isinstance(value, list | tuple) and len(value) in (1, 3) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
        for v in value)


def preprocess_settings(preprocess: Any = None) -> dict[str, Any]:
    """Checkpoint ``preprocess`` metadata over the ImageNet defaults, checked: the one place it is validated, so
    malformed metadata ends in a one-line :class:`RepVGGError` wherever it is used."""
    if preprocess is not None and not isinstance(preprocess, Mapping):
        raise RepVGGError(f"preprocess metadata must be a mapping (resize, crop, mean, std), got {preprocess!r:.60}")
    p = {**IMAGENET_PREPROCESS, **(preprocess or {})}
    for key in ("resize", "crop"):
        if not _size_ok(p[key]):
            raise RepVGGError(f"preprocess {key!r} must be a positive integer or [height, width], got {p[key]!r:.60}")
    for key in ("mean", "std"):
        if not _stats_ok(p[key], positive=key == "std"):
            raise RepVGGError(f"preprocess {key!r} must be 1 or 3 finite numbers{' > 0' if key == 'std' else ''}, "
                              f"got {p[key]!r:.60}")
    return p


def preprocess_for_size(preprocess: Any, img_size: tuple[int, int]) -> dict[str, Any]:
    """``preprocess`` with its crop set to ``img_size`` (height, width), resized by the crop rule if it changed."""
    p = preprocess_settings(preprocess)
    if tuple(img_size) != input_size({"preprocess": p}):
        p.update(crop=img_size[0] if img_size[0] == img_size[1] else list(img_size), resize=resize_for(min(img_size)))
    return p


def input_size(metadata: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """(height, width) the network sees: the ``crop`` of the checkpoint's ``preprocess`` metadata, else 224."""
    crop = preprocess_settings((metadata or {}).get("preprocess"))["crop"]
    return (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))


def eval_crop(preprocess: dict[str, Any] | None = None) -> transforms.Compose:
    """PIL image -> the RGB PIL image the network sees, before scaling and normalization: resize the shorter side,
    centre-crop (what a decoded in-memory evaluation set stores)."""
    p = preprocess_settings(preprocess)
    from torchvision import transforms  # here, so that reading metadata (repvgg list, info) needs no torchvision

    return transforms.Compose([transforms.Lambda(to_rgb), transforms.Resize(p["resize"]),
                               transforms.CenterCrop(p["crop"])])


def eval_transform(preprocess: dict[str, Any] | None = None) -> transforms.Compose:
    """PIL image -> normalized tensor: resize the shorter side, centre-crop, to tensor, normalize (RGB)."""
    p = preprocess_settings(preprocess)
    from torchvision import transforms

    return transforms.Compose([*eval_crop(p).transforms, transforms.ToTensor(), transforms.Normalize(p["mean"],
                                                                                                    p["std"])])


def _preprocess_of(source: Any) -> Any:
    """The ``preprocess`` settings a model, checkpoint, artifact or metadata mapping carries (None: not said)."""
    if source is None:
        return None
    if isinstance(source, Mapping):
        if "preprocess" in source:
            return source["preprocess"]
        return source if set(source) & set(IMAGENET_PREPROCESS) else None  # settings themselves, else metadata
    if isinstance(getattr(source, "metadata", None), Mapping):  # a Checkpoint, or an exported file opened
        return _preprocess_of(source.metadata)
    if isinstance(source, nn.Module):
        return getattr(source, "preprocess", None)
    hint = ": read the file first (repvgg.read_checkpoint(path))" if isinstance(source, str) else ""
    raise RepVGGError(f"resolve_data_config takes a model, a checkpoint, an opened exported file, their metadata or "
                      f"preprocessing settings, not {type(source).__name__}{hint}")


def resolve_data_config(source: Any = None) -> dict[str, Any]:
    """What ``source`` expects its images to be, as timm's function of that name resolves a model's: ``resize``,
    ``crop``, ``mean`` and ``std`` (checked; the ImageNet defaults fill what it does not say).

    ``source`` is a model (its ``preprocess``, set when its weights came with it: ``create_model(pretrained=...)``,
    ``model_from_checkpoint``), a checkpoint or an opened exported file (their ``metadata``), a metadata mapping,
    preprocessing settings themselves, or None."""
    return preprocess_settings(_preprocess_of(source))


def create_transform(config: Mapping[str, Any] | None = None, **settings: Any) -> transforms.Compose:
    """The evaluation transform (:func:`eval_transform`) of a data config (:func:`resolve_data_config`) with
    ``settings`` over it (``create_transform(**config)`` works as with timm); a ``crop`` given without ``resize``
    resizes by the crop rule (:func:`resize_for`). Only resize, crop, mean and std exist: anything else (timm's
    ``is_training``, ``interpolation``) is refused, not ignored."""
    merged = {**(config or {}), **settings}
    unknown = sorted(set(merged) - set(IMAGENET_PREPROCESS))
    if unknown:
        raise RepVGGError(f"create_transform takes {', '.join(IMAGENET_PREPROCESS)}, not {', '.join(unknown)} (it "
                          f"makes the evaluation transform; training augmentation is "
                          f"repvgg.training.data.train_transform)")
    p = preprocess_settings(merged)
    if "crop" in settings and "resize" not in settings:
        p["resize"] = resize_for(min(input_size({"preprocess": p})))
    return eval_transform(p)
