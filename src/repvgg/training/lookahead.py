"""Lookahead (Zhang et al., 2019) on a model's weights, scheduled as airbench does for fast CIFAR-10 training: slow
weights that the trained ones restart from every few steps, pulled toward them less and less as the run ends."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LOOKAHEAD_RATE", "Lookahead"]

LOOKAHEAD_RATE = 0.95  # the slow weights' decay per optimizer step at the run's end (airbench's)


def _tracked(model: nn.Module) -> list[Tensor]:
    """The weights Lookahead averages: every parameter and floating-point buffer (BatchNorm statistics)."""
    return [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]


class Lookahead:
    """Every ``every`` optimizer steps the slow weights move toward the model's, ``slow += (1 - d) (fast - slow)``,
    and the model continues from them. ``d`` grows as ``rate ** every * (step / total) ** 3``: no effect early on, an
    average over the last few dozen steps at the end; the run's final model takes the slow weights."""

    def __init__(self, model: nn.Module, every: int, rate: float = LOOKAHEAD_RATE) -> None:
        self.every, self.rate = every, rate
        self.slow = [t.detach().clone() for t in _tracked(model)]

    def decay(self, step: int, total: int) -> float:
        """The share of the slow weights kept at a sync after optimizer step ``step`` of ``total``."""
        return self.rate ** self.every * min(1.0, step / total) ** 3

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int, total: int) -> None:
        """Called after optimizer step ``step`` (counted from 1) of ``total``: syncs on every ``every``-th."""
        if step % self.every:
            return
        decay = self.decay(step, total)
        for slow, fast in zip(self.slow, _tracked(model), strict=True):
            slow.lerp_(fast, 1.0 - decay)
            fast.copy_(slow)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Set ``model`` (the trained model or a copy of it) to the slow weights."""
        for slow, fast in zip(self.slow, _tracked(model), strict=True):
            fast.copy_(slow)

    def state_dict(self) -> dict[str, Any]:
        return {"slow": self.slow}  # every and rate come from the recipe, which a resume checks against the run's

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for slow, saved in zip(self.slow, state["slow"], strict=True):
            slow.copy_(saved)
