"""Where and in what precision training and evaluation run: the device named by the user, and autocast."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from ..errors import RepVGGError

__all__ = ["AmpMode", "AMP_DTYPES", "resolve_device", "autocast", "check_amp", "synchronize"]

AmpMode = Literal["none", "bf16", "fp16"]
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | None = None) -> torch.device:
    """``name`` (``cpu``, ``cuda``, ``cuda:1``) checked against the devices present; default: CUDA when present."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise RepVGGError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RepVGGError(f"--device {name}: no CUDA GPU is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RepVGGError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise RepVGGError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return device


def check_amp(amp: AmpMode, device: torch.device) -> None:
    """fp16 autocast needs a gradient scaler and fast fp16 kernels: CUDA only."""
    if amp == "fp16" and device.type != "cuda":
        raise RepVGGError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")


def autocast(device: torch.device, amp: AmpMode = "none") -> contextlib.AbstractContextManager:
    """The forward pass's autocast context for ``amp`` on ``device`` (a no-op in full precision)."""
    dtype = AMP_DTYPES.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a GPU runs asynchronously), so that a clock read after it times the
    work and not only its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
