"""A run's whole training state as one object: what ``last.pt`` holds, and what ``--resume`` restores."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..errors import RepVGGError
from ..files import atomic_write
from ..models.checkpoints import torch_bytes
from .lookahead import Lookahead

__all__ = ["Progress", "RunState", "read_state", "STATE_FORMAT"]

STATE_FORMAT = "repvgg-train-state-2"


@dataclass
class Progress:
    """A run's counters; the ``epoch_*`` sums belong to the epoch in progress so that a mid-epoch resume reports
    that epoch whole."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps done in the epoch in progress
    total_epochs: int = 0  # the plan (the recipe's epochs, or fewer to fit a time budget)
    best_top1: float = -1.0
    elapsed_s: float = 0.0
    skipped_total: int = 0
    epoch_loss_sum: float = 0.0
    epoch_seen: int = 0
    epoch_skipped: int = 0
    epoch_train_s: float = 0.0
    epoch_skipped_steps: int = 0  # steps no process trained on (a process had no readable image)
    epoch_lr_steps: list[list[float]] = field(default_factory=list)  # [global step, lr] samples for the curves
    last_eval: dict[str, float] | None = None  # the final-form model's evaluation: epoch, top1, top5, loss

    def start_epoch(self) -> None:
        self.step, self.epoch_skipped_steps, self.epoch_lr_steps = 0, 0, []
        self.clear_epoch_sums()

    def clear_epoch_sums(self) -> None:
        """Zero the sums a process adds to over the epoch in progress (loss, images, skipped images, time)."""
        self.epoch_loss_sum, self.epoch_seen, self.epoch_skipped, self.epoch_train_s = 0.0, 0, 0, 0.0


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unsaved_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a model's state dict leaves out (such as the activation ranges that quantization-aware training
    learns): not part of its weights, yet part of where its training stands."""
    kept = model.state_dict().keys()
    return {name: buffer for name, buffer in model.named_buffers() if name not in kept}


def _restore_buffers(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put back the buffers :func:`_unsaved_buffers` saved (states without them leave the model's as they are)."""
    buffers = dict(model.named_buffers())
    for name, value in saved.items():
        if name in buffers:
            buffers[name].copy_(value)


@dataclass
class RunState:
    """The stateful parts of a run (model, optimizer, schedule, scaler, EMA, Lookahead, RNG) and its progress."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    progress: Progress
    metadata: dict[str, Any]  # architecture, classes, strides, class names, preprocessing, recipe values
    lookahead: Lookahead | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "repvgg": self.metadata, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
                "lookahead": self.lookahead.state_dict() if self.lookahead is not None else None,
                "progress": asdict(self.progress), "rng": _rng_state(), "buffers": _unsaved_buffers(self.model)}

    def load_state_dict(self, state: dict[str, Any], restore_rng: bool = True) -> None:
        self.model.load_state_dict(state["model"])
        _restore_buffers(self.model, state.get("buffers", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        if self.lookahead is not None and state.get("lookahead"):
            self.lookahead.load_state_dict(state["lookahead"])
        known = {f.name for f in fields(Progress)}
        self.progress = Progress(**{k: v for k, v in state["progress"].items() if k in known})
        if restore_rng:
            _set_rng_state(state["rng"])

    def save(self, path: Path) -> None:
        """Write the state atomically: a kill mid-write leaves the previous file intact."""
        atomic_write(path, torch_bytes(self.state_dict()))


def read_state(path: Path) -> dict[str, Any]:
    """A ``last.pt`` written by :meth:`RunState.save`, read to the CPU (loading it puts each tensor on its device; the
    generator states must stay CPU tensors), or a one-line error saying what the file is instead."""
    if not path.is_file():
        raise RepVGGError(f"checkpoint to resume from not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or corrupt archives raise many unrelated types
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise RepVGGError(f"cannot resume from {path}: not a readable training state (truncated, corrupt, or it "
                          f"holds objects other than tensors, which are never unpickled): {reason}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        kind = "a model checkpoint (weights only)" if isinstance(state, dict) and "repvgg" in state else "not one"
        raise RepVGGError(f"cannot resume from {path}: --resume needs a training state (a run's last.pt), and this "
                          f"file is {kind}; to start from weights, use --pretrained")
    return state
