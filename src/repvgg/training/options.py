"""One training run's options (data, model, recipe with overrides, run machinery) and the callbacks a caller can
pass to observe a run."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from ..models.architectures import RepVGGConfig
from ..models.blocks import BlockKind, Branches
from .data import PADDING_MODES, BadImagePolicy, DataPath, crop_padding
from .device import AmpMode
from .recipes import DEFAULT_RECIPE, RECIPES, Recipe

__all__ = ["TrainOptions", "Callback", "default_workers", "describe"]


def default_workers() -> int:
    """Data-loading processes: one core is left to the training process itself (at least 1, at most 4)."""
    return max(1, min(4, (os.cpu_count() or 1) - 1))


class Callback:
    """Hooks for observing a run (progress reporting, tests, custom logging); every default does nothing."""

    def on_epoch_start(self, epoch: int, indices: Sequence[int]) -> None:
        """``indices``: the samples this process trains on in ``epoch`` (0-based), in order."""

    def on_step_end(self, epoch: int, step: int) -> None:
        """After optimizer step ``step`` (1-based) of ``epoch`` (0-based)."""

    def on_finish(self, model: nn.Module, summary: dict[str, Any]) -> None:
        """With the final training-time model, once it and its deploy form are saved and evaluated."""


@dataclass
class TrainOptions:
    """One run: data, model, recipe (with overrides applied) and the machinery around it.

    ``amp``, ``channels_last`` and ``threads`` left as None are chosen by a short speed probe (``probe``).
    ``recipe_given`` names the recipe fields set on purpose (a command's flags; ``name`` for its ``--recipe``): a
    resume takes the others from its checkpoint, its preset too unless ``name`` is given, so a run goes on as begun
    after a preset changes; None holds all of ``recipe`` to the checkpoint's.
    """

    data: str | None
    out_dir: str
    model: str | RepVGGConfig = "repvgg_a0"  # a registered name, or an architecture of one's own
    recipe: Recipe = field(default_factory=lambda: RECIPES[DEFAULT_RECIPE])
    recipe_given: frozenset[str] | None = None  # see above
    model_factory: Callable[[int], nn.Module] | None = None  # any classifier for a class count (``model`` names it)
    block: BlockKind = "repvgg"  # or "qarepvgg", the quantization-friendly block
    branches: Branches = "full"  # the training-time branches each block keeps (the paper's ablation)
    pretrained: str | None = None  # weights to start from: a file, a hub id, or "true" for the published ones
    origin: dict[str, str] = field(default_factory=dict)  # what the run derives from; a resume must match it
    freeze_stages: int = 0  # stage0..stage(N-1) keep their pretrained weights and BN statistics
    backbone_lr_scale: float = 1.0  # learning rate of everything but the classifier, relative to --lr
    workers: int = field(default_factory=default_workers)
    data_path: DataPath = "auto"  # images decoded into memory (when they fit), or per-image loading processes
    amp: AmpMode | None = None
    channels_last: bool | None = None
    threads: int | None = None
    probe: bool = True
    grad_checkpointing: bool = False
    sync_bn: bool = False
    seed: int = 0  # initialization, shuffling and every sample's augmentation; kept in the run, a resume must match it
    resume: str | None = None  # a checkpoint path, or "auto" for out_dir/last.pt when present
    bad_images: BadImagePolicy = "skip"
    cache_dir: str | None = None
    time_budget_min: float | None = None
    save_every_min: float = 10.0  # also write last.pt mid-epoch this often (0: at epoch ends and on a stop only)
    eval_every: int = 1  # validate every n epochs (the final model is always evaluated)
    device: str | None = None
    tensorboard: bool = True
    log: Callable[[str], None] = print
    callbacks: Sequence[Callback] = ()

    @property
    def model_name(self) -> str:
        """The model as runs, logs and summaries name it."""
        return self.model if isinstance(self.model, str) else self.model.official_name


def describe(opts: TrainOptions, extra: dict[str, Any] | None = None) -> str:
    """Every recipe value and option of a run, one per line."""
    rows: dict[str, Any] = {f"recipe.{f.name}": getattr(opts.recipe, f.name) for f in fields(opts.recipe)}
    rows["recipe.lr"] = f"{opts.recipe.lr} (for a global batch of 256; scaled linearly with the batch)"
    if opts.recipe.crop_pad is None and opts.recipe.crop in PADDING_MODES:
        rows["recipe.crop_pad"] = f"None (an eighth of the side: {crop_padding(opts.recipe.img_size)} pixels)"
    rows.update({f.name: getattr(opts, f.name) for f in fields(opts)
                 if f.name not in ("recipe", "recipe_given", "log", "callbacks", "model_factory")})
    rows.update(extra or {})
    width = max(map(len, rows))
    return "\n".join(f"  {k:<{width}} {v}" for k, v in rows.items())
