"""Training recipes: named hyper-parameter presets, the paper's weight-decay rules, the official custom L2, and the
learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import RepVGGError
from ..models.blocks import BNInit, RepVGGBlock
from ..models.preprocess import IMAGENET_PREPROCESS
from .data import AutoAugment, Flip, TrainCrop

__all__ = ["Decay", "Recipe", "RECIPES", "recipe_with", "recipe_of", "recipe_differences", "param_groups",
           "custom_l2_penalty", "WarmupDecay", "preprocess_of", "schedule_warnings"]

Decay = Literal["cosine", "linear"]


@dataclass(frozen=True)
class Recipe:
    """Every hyper-parameter of a training recipe; ``lr`` is for a global batch of 256 and scales linearly,
    BatchNorm biases train at ``bn_bias_lr_scale`` times the learning rate of the rest, ``crop_pad`` is the border
    of the pad crops (None: an eighth of the side), ``cutout`` is the side of the square each training image loses
    (0: none), ``flip`` mirrors images at random or every other epoch, and
    ``bn_init`` starts the blocks' BatchNorms as built (weight 1, bias 0) or small (timm's)."""

    name: str
    epochs: int
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    img_size: int = 224
    eval_resize: int = 256
    crop: TrainCrop = "random_resized"
    crop_pad: int | None = None
    auto_augment: AutoAugment = "none"
    flip: Flip = "random"
    warmup_epochs: float = 0.0
    schedule: Decay = "cosine"
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    cutout: int = 0
    ema_decay: float = 0.0
    lookahead: int = 0
    bn_bias_lr_scale: float = 1.0
    custom_l2: bool = False
    strides: tuple[int, ...] = (2, 2, 2, 2, 2)
    bn_init: BNInit = "default"

    def scaled_lr(self, global_batch: int) -> float:
        """The peak learning rate for ``global_batch`` images per step."""
        return self.lr * global_batch / 256


DEFAULT_RECIPE = "paper"  # the preset of a run that names none (and of a checkpoint that records none)

RECIPES: dict[str, Recipe] = {
    # RepVGG paper, ImageNet: 120 epochs, SGD 0.9, batch 256, lr 0.1 cosine, wd 1e-4, crop+flip only.
    "paper": Recipe("paper", epochs=120),
    # The stronger recipe of the RepVGG repo / RepVGGplus: warm-up, smoothing, mixup/cutmix, AutoAugment, EMA.
    "strong": Recipe("strong", epochs=300, warmup_epochs=5, label_smoothing=0.1, mixup=0.2, cutmix=1.0,
                     auto_augment="auto", ema_decay=0.9998),
    # CIFAR-size images: pad-4 crop with a mirrored border + alternating flip + Cutout 8; stride-1 stem and stage1
    # keep 32x32 inputs at 32/16/8/4 pixels through stages 1-4 (ResNet's CIFAR layout); Cutout 8, BN biases at 4x
    # the lr, a linear decay, the mirrored border, the alternating flip, a 5-epoch warm-up and label smoothing 0.3
    # won the search of benchmarks/results/cifar10_search.md (90.10% deploy top-1 in 30 epochs).
    "cifar": Recipe("cifar", epochs=30, batch_size=256, lr=0.2, nesterov=True, weight_decay=5e-4, img_size=32,
                    eval_resize=32, crop="pad_reflect", flip="alternate", warmup_epochs=5, schedule="linear",
                    label_smoothing=0.3, cutout=8, bn_bias_lr_scale=4.0, strides=(1, 1, 2, 2, 2)),
}


def recipe_with(name: str, **overrides: Any) -> Recipe:
    """A named recipe with the given fields replaced (``None`` values are ignored)."""
    if name not in RECIPES:
        raise RepVGGError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "strides" in overrides:
        overrides["strides"] = tuple(overrides["strides"])
    return replace(RECIPES[name], **overrides)


def recipe_of(metadata: Mapping[str, Any]) -> Recipe:
    """The recipe a checkpoint was trained with: its stored values (a field it predates takes its default, one from
    a later version is ignored), else its recipe's name as registered (``DEFAULT_RECIPE`` when it names none)."""
    values = metadata.get("recipe_values")
    if not values:
        return recipe_with(metadata.get("recipe") or DEFAULT_RECIPE)
    known = {f.name for f in fields(Recipe)}
    kept = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
    return Recipe(**kept)


def param_groups(model: nn.Module, weight_decay: float, custom_l2: bool = False) -> list[dict[str, Any]]:
    """SGD parameter groups with the official decay rules: no decay on biases or BN weights, except the identity
    branch's BN weight; with ``custom_l2`` the 3x3/1x1 kernels leave plain decay for :func:`custom_l2_penalty`."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        branch_kernel = name.endswith(("rbr_dense.conv.weight", "rbr_1x1.conv.weight"))
        if name.endswith("rbr_identity.weight") or (p.ndim > 1 and not (custom_l2 and branch_kernel)):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def custom_l2_penalty(model: nn.Module) -> Tensor:
    """The official "custom L2": for every block, the squared 3x3 kernel outside its centre plus the squared
    equivalent centre (3x3 centre and 1x1 scaled by their BN), normalized by those BN scales (a block without a
    1x1 branch contributes its plain squared 3x3 kernel)."""
    total = torch.zeros(())
    for m in model.modules():
        if not isinstance(m, RepVGGBlock) or m.deploy:
            continue
        k3, bn3 = m.rbr_dense.conv.weight, m.rbr_dense.bn
        t3 = (bn3.weight / (bn3.running_var + bn3.eps).sqrt()).detach().reshape(-1, 1, 1, 1)
        centre = k3[:, :, 1:2, 1:2]
        ring = (k3 ** 2).sum() - (centre ** 2).sum()
        eq, norm = centre * t3, t3 ** 2
        if m.rbr_1x1 is not None:
            bn1 = m.rbr_1x1.bn
            t1 = (bn1.weight / (bn1.running_var + bn1.eps).sqrt()).detach().reshape(-1, 1, 1, 1)
            eq, norm = eq + m.rbr_1x1.conv.weight * t1, norm + t1 ** 2
        total = total.to(k3.device) + ring + (eq ** 2 / norm).sum()
    return total


class WarmupDecay:
    """LR factor per optimizer step: linear warm-up, then a cosine or linear decay to zero at ``total_steps``
    (picklable state)."""

    def __init__(self, warmup_steps: int, total_steps: int, decay: Decay = "cosine") -> None:
        self.warmup_steps, self.total_steps, self.decay = warmup_steps, total_steps, decay

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        done = min(1.0, (step - self.warmup_steps) / span)
        return 1.0 - done if self.decay == "linear" else 0.5 * (1 + math.cos(math.pi * done))


def schedule_warnings(recipe: Recipe, steps_per_epoch: int) -> list[str]:
    """What a run of ``recipe`` at ``steps_per_epoch`` is too short for: a warm-up that never decays, or an EMA of
    the weights (the model a run evaluates and saves) still made largely of the initial ones at the end."""
    warnings = []
    if recipe.warmup_epochs >= recipe.epochs:
        warnings.append(f"the {recipe.warmup_epochs:g}-epoch warm-up spans the whole {recipe.epochs}-epoch run: the "
                        f"learning rate ends at its peak instead of decaying (lower --warmup-epochs or raise --epochs)")
    steps = recipe.epochs * steps_per_epoch
    held = recipe.ema_decay ** steps if recipe.ema_decay else 0.0
    if held > 0.05:
        warnings.append(f"the EMA of the weights (decay {recipe.ema_decay:g} a step) still holds {100 * held:.0f}% "
                        f"of the initial weights after the run's {steps} steps, and the final model is that average; "
                        f"lower --ema-decay (e.g. {0.01 ** (1 / steps):.4f}, 1% left) or turn it off with 0")
    return warnings


def preprocess_of(recipe: Recipe) -> dict[str, Any]:
    """The evaluation preprocessing a recipe implies, as stored in checkpoint metadata."""
    return {**IMAGENET_PREPROCESS, "resize": recipe.eval_resize, "crop": recipe.img_size}


def recipe_differences(stored: dict[str, Any], recipe: Recipe, ignore: tuple[str, ...] = ("epochs",)) -> list[str]:
    """``field: stored -> now`` for each recipe value that differs from a checkpoint's ``stored`` recipe; a field the
    checkpoint predates counts as its default (what that version trained with)."""
    now = asdict(recipe)
    defaults = {f.name: f.default for f in fields(Recipe) if f.default is not MISSING}
    out = []
    for key, value in now.items():
        old = stored.get(key, defaults.get(key))
        old = tuple(old) if isinstance(old, list) else old
        if key not in ignore and old != value:
            out.append(f"{key}: {old!r} -> {value!r}")
    return out
