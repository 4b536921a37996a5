"""Checkpoint to checkpoint conversion: training-time file in, deploy file out, written only once verified."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import RepVGGError
from .checkpoints import model_from_checkpoint, save_checkpoint
from .reparam import relative_difference, reparameterize

__all__ = ["ConvertResult", "convert_checkpoint"]

# Metadata that describes the model itself: rewritten from the converted model, never copied from the source.
_MODEL_KEYS = ("architecture", "num_classes", "in_chans", "strides", "output_stride", "groups", "branches", "block",
               "deploy", "format", "library_version", "source", "source_format")


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert_checkpoint` read and wrote, and how closely the deploy model reproduces the source."""

    src: str
    dst: str
    source_format: str
    architecture: str
    num_classes: int
    rel_diff: float


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, model_name: str | None = None,
                       img_size: int = 64, tolerance: float = 1e-4, headless: bool = False) -> ConvertResult:
    """Re-parameterize the training-time checkpoint ``src`` into a deploy checkpoint ``dst`` (metadata kept).

    Both forms run on a random batch of ``img_size`` images first; ``dst`` is written (atomically) only when their
    outputs are finite and differ by at most ``tolerance`` of the output scale. A model without a classifier is
    converted only with ``headless=True``.
    """
    if os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst):
        raise RepVGGError(f"convert would overwrite its source: {dst} is the same file as {src}")
    model, ckpt = model_from_checkpoint(src, model_name, headless=headless)
    if ckpt.deploy:
        raise RepVGGError(f"{src} is already in deploy form (re-parameterized); nothing to convert")
    deploy = reparameterize(model)
    x = torch.randn(2, model.stage0.in_channels, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(x), deploy(x)
    if not bool(ref.isfinite().all()):
        raise RepVGGError(f"{src}: model outputs are not finite (NaN or inf) on a random input; nothing written")
    err = relative_difference(ref, out)
    if not err <= tolerance:
        raise RepVGGError(f"converted model differs from the source by {err:.2e} of the output scale "
                          f"(tolerance {tolerance:.0e}); nothing written")
    extra = {k: v for k, v in ckpt.metadata.items() if k not in _MODEL_KEYS}
    save_checkpoint(deploy, dst, **extra, source=str(src), source_format=ckpt.format)
    return ConvertResult(str(src), str(dst), ckpt.format, model.config.official_name, model.num_classes, err)
