"""Choosing how a training step runs on the machine at hand: precision, memory format and threads.

What is fastest differs by an order of magnitude between CPUs (bf16 autocast is several times faster than float32
where AMX/AVX-512 bf16 exist, and many times slower where they do not, so it is tried only there), so a short
side-by-side probe decides.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..hardware import measure_throughput
from .device import AmpMode, autocast, synchronize

__all__ = ["StepMode", "native_bf16", "candidate_modes", "probe_modes", "step_runner", "training_flops_per_image"]


@dataclass(frozen=True)
class StepMode:
    """How a training step runs: autocast precision, memory format and torch intra-op threads."""

    amp: AmpMode = "none"
    channels_last: bool = False
    threads: int = 1

    @property
    def label(self) -> str:
        precision = {"none": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[self.amp]
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{precision} {layout}, {self.threads} thread{'s' if self.threads > 1 else ''}"


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 runs natively: a GPU, or a CPU with AVX-512 bf16 or AMX (elsewhere oneDNN emulates bf16, many
    times slower than float32)."""
    return device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def candidate_modes(device: torch.device, amp: AmpMode | None, channels_last: bool | None,
                    threads: int | None, bf16: bool | None = None) -> list[StepMode]:
    """Every combination the user left open (``None``), with the fixed choices kept; float32 is always included
    so that a requested mode slower than float32 can be reported. bf16 is a candidate where it runs natively
    (``bf16``, default :func:`native_bf16`), or when asked for."""
    cores = os.cpu_count() or 1
    bf16 = native_bf16(device) if bf16 is None else bf16
    open_amps: list[AmpMode] = ["none", "bf16", "fp16"] if device.type == "cuda" else ["none", "bf16"] if bf16 \
        else ["none"]
    amps = [amp] if amp else open_amps
    layouts = [channels_last] if channels_last is not None else [False, True]
    thread_counts = [threads] if threads else sorted({1, min(cores, torch.get_num_threads())})
    if device.type == "cuda":
        thread_counts = [threads or torch.get_num_threads()]
    modes = [StepMode(a, c, t) for a in amps for c in layouts for t in thread_counts]
    reference = StepMode("none", False, max(thread_counts))
    return modes if reference in modes else [*modes, reference]


def probe_modes(model: nn.Module, modes: list[StepMode], images: torch.Tensor, targets: torch.Tensor,
                rounds: int = 3) -> dict[StepMode, float]:
    """Training images/s of each mode on copies of ``model`` (SGD steps on one batch), measured interleaved."""
    original_threads = torch.get_num_threads()
    runners: dict[str, Callable[[], None]] = {}
    by_label: dict[str, StepMode] = {}
    for mode in modes:
        runners[mode.label] = step_runner(copy.deepcopy(model).train(), mode, images, targets)
        by_label[mode.label] = mode
    try:
        speed = measure_throughput(runners, len(targets), rounds=rounds, iters_per_round=1, warmup=1,
                                   inference=False)
    finally:
        torch.set_num_threads(original_threads)
    return {by_label[label]: r["images_per_s"] for label, r in speed.items()}


def step_runner(model: nn.Module, mode: StepMode, images: torch.Tensor, targets: torch.Tensor
                ) -> Callable[[], None]:
    """One SGD training step of ``model`` on a fixed batch in ``mode``, as a no-argument callable for timing."""
    if mode.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        torch.set_num_threads(mode.threads)
        with autocast(images.device, mode.amp):
            out = model(images)
            out = out["main"] if isinstance(out, dict) else out
            loss = nn.functional.cross_entropy(out.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(images.device)

    return step


def training_flops_per_image(forward_macs: int) -> float:
    """FLOPs of one training step per image: forward (2 FLOPs per MAC) plus a backward of about twice that."""
    return 3 * 2 * forward_macs
