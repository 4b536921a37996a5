"""Architectures as data: one frozen config per published model, one generic ``RepVGG`` builder, a registry."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields, replace
from numbers import Real
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import RepVGGError
from .blocks import BLOCK_KINDS, BRANCHES, BlockKind, Branches, RepVGGBlock, SEPosition, check_int, is_int
from .reparam import is_batchnorm

__all__ = ["RepVGGConfig", "BlockShape", "OUTPUT_STRIDES", "stage_dilations", "RepVGG", "AuxHead", "FeatureInfo",
           "MODEL_CONFIGS", "build_model", "get_config", "canonical_name", "name_key", "registered_name",
           "NOT_IN_REPVGG"]

STAGE_BASE_WIDTHS = (64, 128, 256, 512)
GROUPED_LAYERS = tuple(range(2, 27, 2))  # layers 2, 4, ..., 26; layer 1 is the first block of stage1


@dataclass(frozen=True)
class RepVGGConfig:
    """Everything that distinguishes one published RepVGG from another."""

    official_name: str
    depths: tuple[int, int, int, int]
    widths: tuple[float, float, float, float]
    groups: int = 1
    se: SEPosition | None = None
    se_reduction: int = 16
    aux_heads: bool = False

    def __post_init__(self) -> None:
        _check_config(self)

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Output channels of stage0..stage4."""
        a = self.widths[0]
        return (min(64, int(64 * a)), *(int(b * w) for b, w in zip(STAGE_BASE_WIDTHS, self.widths, strict=True)))

    def layer_groups(self, layer: int) -> int:
        """Conv groups of layer ``layer`` (1 = first block of stage1)."""
        return self.groups if layer in GROUPED_LAYERS else 1

    def block_shapes(self, in_chans: int = 3, strides: Sequence[int] = (2, 2, 2, 2, 2),
                     output_stride: int = 32) -> list[BlockShape]:
        """Every block, stage0 first: the one description that :class:`RepVGG` builds from and that
        :func:`repvgg.models.profile.architecture_stats` counts from. Stages dilated for ``output_stride`` are
        described as :func:`stage_dilations` says."""
        channels = self.stage_channels
        plan = stage_dilations(strides, output_stride)
        stride, first, dilation = plan[0]
        shapes = [BlockShape(0, in_chans, channels[0], stride, 1, first, stride == strides[0])]
        for i, depth in enumerate(self.depths, start=1):
            stride, first, dilation = plan[i]
            for j in range(depth):
                shapes.append(BlockShape(i, channels[i - 1] if j == 0 else channels[i], channels[i],
                                         stride if j == 0 else 1, self.layer_groups(len(shapes)),
                                         first if j == 0 else dilation, j > 0 or stride == strides[i]))
        return shapes

    def aux_taps(self) -> dict[str, tuple[int, int]]:
        """Where RepVGGplus auxiliary heads read: name -> (stage, number of its blocks run before the tap)."""
        d = self.depths
        return {"stage1": (1, d[0]), "stage2": (2, d[1]), "stage3_first": (3, d[2] // 2)}

    def as_dict(self) -> dict[str, Any]:
        """Every field as JSON values: how a checkpoint describes an architecture that is not registered."""
        return {f.name: list(v) if isinstance(v, tuple) else v
                for f in fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, data: object) -> RepVGGConfig:
        """The config :meth:`as_dict` wrote, checked as a new one is; missing or unknown fields are refused."""
        names = [f.name for f in fields(cls)]
        if not isinstance(data, Mapping):
            raise RepVGGError(f"an architecture config must be a mapping of {', '.join(names)}; got {data!r:.60}")
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing, unknown = [n for n in required if n not in data], sorted(set(data) - set(names))
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(map(str, unknown))}"] if unknown else [])
        if parts:
            raise RepVGGError(f"architecture config: {'; '.join(parts)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        if not isinstance(values["official_name"], str):
            raise RepVGGError(f"architecture config: official_name must be a string, got {values['official_name']!r}")
        return cls(**values)


def _check_config(config: RepVGGConfig) -> None:
    """Reject a config whose network could not run or would mean nothing (no channels, empty stages, groups that
    do not divide the channels they split)."""
    name = config.official_name
    if not _sequence_of(config.depths, 4, lambda d: is_int(d) and d >= 1):
        raise RepVGGError(f"{name}: depths must be four block counts of at least 1, got {config.depths!r}")
    if not _sequence_of(config.widths, 4, lambda w: _is_real(w) and math.isfinite(w) and w > 0):
        raise RepVGGError(f"{name}: widths must be four positive width multipliers, got {config.widths!r}")
    if min(config.stage_channels) < 1:
        raise RepVGGError(f"{name}: widths {config.widths!r} leave a stage with no channel "
                          f"(channels {config.stage_channels})")
    check_int("groups", config.groups, 1)
    for layer, shape in enumerate(config.block_shapes()):
        if shape.in_channels % shape.groups or shape.out_channels % shape.groups:
            raise RepVGGError(f"{name}: groups={shape.groups} must divide the channels of every grouped layer; "
                              f"layer {layer} has {shape.in_channels} in and {shape.out_channels} out")
    if config.se not in (None, "pre", "post"):
        raise RepVGGError(f"{name}: se must be None, 'pre' or 'post', got {config.se!r}")
    check_int("se_reduction", config.se_reduction, 1)
    if config.se is not None and min(config.stage_channels) < config.se_reduction:
        raise RepVGGError(f"{name}: se_reduction={config.se_reduction} leaves the squeeze-excitation of "
                          f"{min(config.stage_channels)} channels with no hidden channel")


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _sequence_of(values: object, length: int | None, valid: Callable[[object], bool]) -> bool:
    """True when ``values`` is a sequence (not a string) of ``length`` items (any number when None), all valid."""
    return (isinstance(values, Sequence) and not isinstance(values, str) and
            (length is None or len(values) == length) and all(valid(v) for v in values))


class BlockShape(NamedTuple):
    """One block's place and size: its stage (0-4), channels in and out, stride, conv groups, the dilation of its
    3x3 conv, and whether it may have an identity branch (not where a stride-2 block was made stride 1 and dilated:
    its weights stay those of the stride-2 block)."""

    stage: int
    in_channels: int
    out_channels: int
    stride: int
    groups: int
    dilation: int = 1
    identity: bool = True


OUTPUT_STRIDES = (8, 16, 32)


def stage_dilations(strides: Sequence[int], output_stride: int = 32) -> list[tuple[int, int, int]]:
    """(stride, first block's dilation, later blocks' dilation) of stage0..stage4 for a total reduction of at most
    ``output_stride``: a stage whose stride would reduce past it gets stride 1 and multiplies the dilation by that
    stride instead. Its first block keeps the previous dilation and the later ones take the new one, the convention
    of torchvision's and timm's dilated ResNets (and timm's RepVGG), so the first block sees what the stride-2
    block saw."""
    plan, reduction, dilation = [], 1, 1
    for stride in strides:
        first = dilation
        if reduction * stride > output_stride:
            dilation, stride = dilation * stride, 1
        reduction *= stride
        plan.append((stride, first, dilation))
    return plan


_A, _B, _D = (2, 4, 14, 1), (4, 6, 16, 1), (8, 14, 24, 1)
MODEL_CONFIGS: dict[str, RepVGGConfig] = {
    "repvgg_a0": RepVGGConfig("RepVGG-A0", _A, (0.75, 0.75, 0.75, 2.5)),
    "repvgg_a1": RepVGGConfig("RepVGG-A1", _A, (1, 1, 1, 2.5)),
    "repvgg_a2": RepVGGConfig("RepVGG-A2", _A, (1.5, 1.5, 1.5, 2.75)),
    "repvgg_b0": RepVGGConfig("RepVGG-B0", _B, (1, 1, 1, 2.5)),
    "repvgg_b1": RepVGGConfig("RepVGG-B1", _B, (2, 2, 2, 4)),
    "repvgg_b1g2": RepVGGConfig("RepVGG-B1g2", _B, (2, 2, 2, 4), groups=2),
    "repvgg_b1g4": RepVGGConfig("RepVGG-B1g4", _B, (2, 2, 2, 4), groups=4),
    "repvgg_b2": RepVGGConfig("RepVGG-B2", _B, (2.5, 2.5, 2.5, 5)),
    "repvgg_b2g2": RepVGGConfig("RepVGG-B2g2", _B, (2.5, 2.5, 2.5, 5), groups=2),
    "repvgg_b2g4": RepVGGConfig("RepVGG-B2g4", _B, (2.5, 2.5, 2.5, 5), groups=4),
    "repvgg_b3": RepVGGConfig("RepVGG-B3", _B, (3, 3, 3, 5)),
    "repvgg_b3g2": RepVGGConfig("RepVGG-B3g2", _B, (3, 3, 3, 5), groups=2),
    "repvgg_b3g4": RepVGGConfig("RepVGG-B3g4", _B, (3, 3, 3, 5), groups=4),
    "repvgg_d2se": RepVGGConfig("RepVGG-D2se", _D, (2.5, 2.5, 2.5, 5), se="pre", se_reduction=16),
    "repvggplus_l2pse": RepVGGConfig("RepVGGplus-L2pse", _D, (2.5, 2.5, 2.5, 5), se="post", se_reduction=4,
                                     aux_heads=True),
}


def name_key(name: str) -> str:
    """``RepVGG-A0``, ``repvgg-a0`` or ``repvgg_a0`` spelled as registry keys are: ``repvgg_a0`` (registered or not)."""
    return name.strip().lower().replace("-", "_")


def canonical_name(name: str) -> str:
    """Map ``RepVGG-A0``, ``repvgg-a0`` or ``repvgg_a0`` to the registry key ``repvgg_a0``."""
    if not isinstance(name, str):
        raise RepVGGError(f"the model name must be a string, got {name!r}; choose one of: {', '.join(MODEL_CONFIGS)}")
    key = name_key(name)
    if key not in MODEL_CONFIGS:
        raise RepVGGError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_CONFIGS)}")
    return key


def get_config(name: str) -> RepVGGConfig:
    """The config of a registered model, by any accepted spelling of its name."""
    return MODEL_CONFIGS[canonical_name(name)]


def registered_name(config: RepVGGConfig) -> str | None:
    """The registry key of ``config`` (its grouped-conv setting aside, which :func:`build_model` can override), or
    None for an architecture of the user's own."""
    key = name_key(config.official_name)
    known = MODEL_CONFIGS.get(key)
    return key if known is not None and replace(known, groups=config.groups) == config else None


@contextlib.contextmanager
def _keep_bn_statistics(module: nn.Module) -> Iterator[None]:
    """Undo what a recomputed forward pass does to BatchNorm running statistics, so that gradient checkpointing
    updates them once per step, as training without it does."""
    saved = [(bn, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for bn in module.modules() if is_batchnorm(bn) and bn.track_running_stats]
    try:
        yield
    finally:
        for bn, mean, var, count in saved:
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(count)


class AuxHead(nn.Sequential):
    """RepVGGplus auxiliary classifier: 3x3 stride-2 conv+BN+ReLU, global average pool, linear."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(channels, num_classes)


class FeatureInfo(list):
    """Every stage's ``num_chs``, ``reduction`` and ``module`` (one dict per stage, as timm's models list them), with
    ``channels()`` and ``reduction()`` of the stages the model returns (``out_indices``, else all), as timm's
    ``features_only`` models answer them."""

    def __init__(self, stages: Sequence[dict], out_indices: Sequence[int] | None) -> None:
        super().__init__(stages)
        self.out_indices = tuple(range(len(stages)) if out_indices is None else out_indices)

    def channels(self) -> list[int]:
        """Channels of each returned feature map."""
        return [self[i]["num_chs"] for i in self.out_indices]

    def reduction(self) -> list[int]:
        """Input side over feature-map side of each returned feature map."""
        return [self[i]["reduction"] for i in self.out_indices]


class RepVGG(nn.Module):
    """A RepVGG (or RepVGGplus) network built from a :class:`RepVGGConfig`.

    Args:
        config: the architecture.
        num_classes: classifier outputs; 0 builds no classifier (``forward`` then returns pooled features).
        in_chans: input image channels.
        strides: stride of the first layer of stage0..stage4; use e.g. ``(1, 1, 2, 2, 2)`` for 32x32 images.
        out_indices: stages (0-4) whose outputs ``forward`` returns as a list, for detection/segmentation necks;
            no head is built.
        output_stride: the largest total reduction, 8, 16 or 32 (default): for dense prediction, the stages that
            would reduce further keep their resolution with dilated 3x3 convs (see :func:`stage_dilations`); the
            weights are the same at every output stride. ``feature_info`` gives the real reductions.
        deploy: build the plain 3x3-conv form directly.
        aux_weight: weight of each auxiliary loss (RepVGGplus); used by :meth:`loss`.
        branches: the training-time branches every block keeps (``"full"``, ``"3x3"``, ``"3x3+1x1"``,
            ``"3x3+identity"``: the paper's ablation).
        block: ``"repvgg"``, or ``"qarepvgg"`` for the quantization-friendly block (see :class:`RepVGGBlock`).
    """

    def __init__(self, config: RepVGGConfig, num_classes: int = 1000, in_chans: int = 3,
                 strides: Sequence[int] = (2, 2, 2, 2, 2), out_indices: Sequence[int] | None = None,
                 deploy: bool = False, aux_weight: float = 0.1, branches: Branches = "full",
                 block: BlockKind = "repvgg", output_stride: int = 32) -> None:
        super().__init__()
        _check_model_options(num_classes, in_chans, strides, out_indices, aux_weight, branches, block, output_stride)
        self.branches, self.block = branches, block
        self.config = config
        self.deploy = deploy
        self.strides = tuple(strides)
        self.output_stride = int(output_stride)
        self.out_indices = tuple(out_indices) if out_indices is not None else None
        self.grad_checkpointing = False
        self.aux_weight = aux_weight
        # what the weights expect the images to be (resize, crop, mean, std), when they came with it (create_model's
        # pretrained weights, model_from_checkpoint); None: the ImageNet defaults. See repvgg.resolve_data_config.
        self.preprocess: dict[str, Any] | None = None
        channels = config.stage_channels
        block = dict(se=config.se, se_reduction=config.se_reduction, deploy=deploy, branches=branches, kind=block)
        shapes = config.block_shapes(in_chans, strides, output_stride)
        blocks = [RepVGGBlock(*s[1:5], dilation=s.dilation, identity=s.identity, **block) for s in shapes]
        self.stage0 = blocks[0]
        for i in range(1, 5):
            self.add_module(f"stage{i}", nn.Sequential(*(b for b, s in zip(blocks, shapes, strict=True)
                                                         if s.stage == i)))
        reductions = list(itertools.accumulate((s for s, _, _ in stage_dilations(strides, output_stride)),
                                               operator.mul))
        self.feature_info = FeatureInfo([dict(num_chs=channels[i], reduction=reductions[i], module=f"stage{i}")
                                         for i in range(5)], self.out_indices)
        self.num_features = channels[4]
        self.num_classes = 0 if self.out_indices is not None else num_classes
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(self.num_features, self.num_classes) if self.num_classes else nn.Identity()
        self.aux = nn.ModuleDict()
        if config.aux_heads and not deploy and self.num_classes:
            for name, (stage, _) in self.aux_taps.items():
                self.aux[name] = AuxHead(channels[stage], self.num_classes)

    @property
    def stages(self) -> list[nn.Module]:
        """stage0..stage4 in order."""
        return [getattr(self, f"stage{i}") for i in range(5)]

    @property
    def aux_taps(self) -> dict[str, tuple[int, int]]:
        """Where auxiliary heads read: name -> (stage, number of its blocks run before the tap)."""
        return self.config.aux_taps()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory: recompute each stage's activations in the backward pass."""
        self.grad_checkpointing = enable

    def _run_stage(self, stage: nn.Module, x: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training and isinstance(stage, nn.Sequential) and torch.is_grad_enabled():
            for block in stage:
                x = checkpoint(block, x, use_reentrant=False,
                               context_fn=lambda block=block: (contextlib.nullcontext(), _keep_bn_statistics(block)))
            return x
        return stage(x)

    def _forward_stages(self, x: Tensor, last: int = 4) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Run stage0..stage ``last``; return each one's output and the auxiliary heads' logits (training only)."""
        use_aux = bool(self.aux) and self.training
        taps = {stage: (name, n) for name, (stage, n) in self.aux_taps.items()} if use_aux else {}
        outputs, aux = [], {}
        for i, stage in enumerate(self.stages[:last + 1]):
            if i in taps:
                name, n = taps[i]
                x = self._run_stage(stage[:n], x)
                aux[name] = self.aux[name](x)
                x = self._run_stage(stage[n:], x) if n < len(stage) else x
            else:
                x = self._run_stage(stage, x)
            outputs.append(x)
        return outputs, aux

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's feature map."""
        return self._forward_stages(x)[0][-1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pool, then the linear classifier unless ``pre_logits``."""
        x = torch.flatten(self.gap(x), 1)
        return x if pre_logits else self.linear(x)

    def forward(self, x: Tensor) -> Tensor | list[Tensor] | dict[str, Tensor]:
        """Logits; a list of stage outputs when ``out_indices`` is set; for RepVGGplus in training, a dict of
        ``main`` plus one entry per auxiliary head (see :meth:`loss`). Stages after the last of ``out_indices``
        are not run."""
        if self.out_indices is not None:
            outputs, _ = self._forward_stages(x, max(self.out_indices))
            return [outputs[i] for i in self.out_indices]
        outputs, aux = self._forward_stages(x)
        logits = self.forward_head(outputs[-1])
        if aux:
            return {"main": logits, **{f"{name}_aux": v for name, v in aux.items()}}
        return logits

    def loss(self, output: Tensor | dict[str, Tensor], target: Tensor, criterion: nn.Module) -> Tensor:
        """Training loss: the main loss plus ``aux_weight`` times each auxiliary head's loss."""
        if isinstance(output, Tensor):
            return criterion(output, target)
        return sum((self.aux_weight if name != "main" else 1.0) * criterion(out, target)
                   for name, out in output.items())

    def get_classifier(self) -> nn.Module:
        """The classifier (``nn.Identity`` when the model has none), as timm's models return it."""
        return self.linear

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier (and any auxiliary heads) for ``num_classes`` outputs; 0 removes it."""
        check_int("num_classes", num_classes, 0)
        self.num_classes = num_classes
        self.linear = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        if len(self.aux):
            self.aux = nn.ModuleDict({n: AuxHead(h.fc.in_features, num_classes) for n, h in self.aux.items()}
                                     if num_classes else {})

    def switch_to_deploy(self) -> None:
        """Drop training-only auxiliary heads and fuse every block."""
        self.aux = nn.ModuleDict()
        for m in self.modules():
            if isinstance(m, RepVGGBlock):
                m.switch_to_deploy()
        self.deploy = True


def _check_model_options(num_classes: object, in_chans: object, strides: object, out_indices: object,
                         aux_weight: object, branches: object, block: object, output_stride: object) -> None:
    """Reject :class:`RepVGG` arguments that would fail later with a traceback or build a network that means
    nothing, with one message naming the argument."""
    check_int("num_classes", num_classes, 0)
    check_int("in_chans", in_chans, 1)
    if not _sequence_of(strides, 5, lambda s: is_int(s) and s in (1, 2)):
        raise RepVGGError(f"strides must be five values of 1 or 2 (stage0..stage4), got {strides!r}")
    if out_indices is not None and not (_sequence_of(out_indices, None, lambda i: is_int(i) and 0 <= i <= 4)
                                        and len(out_indices) > 0):
        raise RepVGGError(f"out_indices must be stage numbers in 0..4, got {out_indices!r}")
    if not is_int(output_stride) or output_stride not in OUTPUT_STRIDES:
        raise RepVGGError(f"output_stride must be one of {', '.join(map(str, OUTPUT_STRIDES))}, got {output_stride!r}")
    if not (_is_real(aux_weight) and math.isfinite(aux_weight) and aux_weight >= 0):
        raise RepVGGError(f"aux_weight must be a finite number of at least 0, got {aux_weight!r}")
    if branches not in BRANCHES or block not in BLOCK_KINDS:
        raise RepVGGError(f"branches must be one of {', '.join(BRANCHES)} and block one of "
                          f"{', '.join(BLOCK_KINDS)}; got branches={branches!r}, block={block!r}")


# timm options with no counterpart in RepVGG: refused with the reason unless they ask for nothing (0)
NOT_IN_REPVGG = {
    "drop_path_rate": "RepVGG has no drop-path (stochastic depth): neither the paper nor the official code trains "
                      "with it (timm's RepVGG block has it as an experiment), and this library builds the paper's "
                      "block",
    "drop_rate": "RepVGG has no dropout before its classifier: neither the paper nor the official code uses it",
}


def _refuse_timm_options(options: dict) -> None:
    """Take the timm options :data:`NOT_IN_REPVGG` out of ``options``: accepted at 0 (they ask for nothing),
    refused with the reason otherwise, rather than silently ignored."""
    for key, reason in NOT_IN_REPVGG.items():
        value = options.pop(key, 0)
        if value not in (0, None):
            raise RepVGGError(f"{key}={value!r} is not supported: {reason}")


def build_model(name: str | RepVGGConfig, num_classes: int = 1000, deploy: bool = False, **options) -> RepVGG:
    """Build a registered architecture by name (``repvgg_a0`` or the official ``RepVGG-A0``), or any
    :class:`RepVGGConfig`, randomly initialized; :func:`repvgg.create_model` adds published or local weights on top.

    ``options`` are passed to :class:`RepVGG` (``in_chans``, ``strides``, ``out_indices``, ``output_stride``,
    ``aux_weight``, ``branches``, ``block``); ``groups`` overrides the config's grouped-conv setting.
    """
    config = name if isinstance(name, RepVGGConfig) else get_config(name)
    _refuse_timm_options(options)
    if "groups" in options:
        config = replace(config, groups=options.pop("groups"))
    known = set(inspect.signature(RepVGG).parameters) - {"config"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise RepVGGError(f"unknown option(s) for create_model: {', '.join(unknown)}; options are: "
                          f"{', '.join(sorted(known))}")
    return RepVGG(config, num_classes=num_classes, deploy=deploy, **options)
