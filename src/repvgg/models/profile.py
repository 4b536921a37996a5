"""Model statistics: parameter counts and multiply-accumulates (MACs) of convs and linears, measured on any
module by torch's FLOP counter, or computed for a registered architecture from its config alone (no tensors:
instant)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .architectures import RepVGGConfig, get_config

__all__ = ["count_params", "count_macs", "input_channels", "ArchitectureStats", "architecture_stats"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (BN running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, img_size: tuple[int, int] = (224, 224), in_chans: int = 3) -> int:
    """MACs of one image through every convolution and matrix product, as torch's ``FlopCounterMode`` counts them
    (elementwise ops, BN and pooling are not counted): functional ones too, such as the single fused conv that a
    quantization-aware block trains as, which module hooks would miss."""
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters())
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_chans, *img_size, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


@dataclass(frozen=True)
class ArchitectureStats:
    """Parameters of the training-time and deploy forms, and MACs of one image through the deploy form."""

    train_params: int
    deploy_params: int
    macs: int


def _se_params(channels: int, config: RepVGGConfig) -> tuple[int, int]:
    """(parameters, MACs) of one squeeze-excitation: 1x1 down and up convs with bias, on a 1x1 map."""
    if config.se is None:
        return 0, 0
    hidden = channels // config.se_reduction
    return 2 * channels * hidden + hidden + channels, 2 * channels * hidden


def architecture_stats(config: RepVGGConfig | str, num_classes: int = 1000, img_size: tuple[int, int] = (224, 224),
                       in_chans: int = 3, strides: Sequence[int] = (2, 2, 2, 2, 2),
                       output_stride: int = 32) -> ArchitectureStats:
    """What :func:`count_params` and :func:`count_macs` measure on the built model, from the config's block shapes
    (tests check both agree on every architecture): a whole model list in milliseconds."""
    config = get_config(config) if isinstance(config, str) else config
    shapes = config.block_shapes(in_chans, strides, output_stride)
    train = deploy = macs = 0
    h, w = img_size
    for b in shapes:
        kernel = b.in_channels // b.groups * b.out_channels  # weights of a 1x1 conv
        se_params, se_macs = _se_params(b.out_channels, config)
        identity = 2 * b.in_channels if b.identity and b.in_channels == b.out_channels and b.stride == 1 else 0
        train += 10 * kernel + 4 * b.out_channels + identity + se_params  # 3x3 + 1x1 convs, two BNs, identity BN
        deploy += 9 * kernel + b.out_channels + se_params  # one 3x3 conv with bias
        h, w = (h - 1) // b.stride + 1, (w - 1) // b.stride + 1  # 3x3, padding = dilation
        macs += 9 * kernel * h * w + se_macs
    head = (shapes[-1].out_channels + 1) * num_classes
    channels = config.stage_channels
    aux = sum(9 * channels[s] ** 2 + 2 * channels[s] + (channels[s] + 1) * num_classes
              for s, _ in config.aux_taps().values()) if config.aux_heads and num_classes else 0
    return ArchitectureStats(train + head + aux, deploy + head, macs + shapes[-1].out_channels * num_classes)


def input_channels(model: nn.Module) -> int:
    """Channels the model expects: RepVGG's stem input, else the first conv's input channels, else 3."""
    stem = getattr(model, "stage0", None)
    if stem is not None and hasattr(stem, "in_channels"):
        return stem.in_channels
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3
