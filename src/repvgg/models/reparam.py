"""Structural re-parameterization: the math as small pure tensor functions, and the model-level switch.

Every function here is differentiable, so the equivalent kernel can feed regularizers or
quantization-aware training as well as the one-off conversion to deploy form.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import RepVGGError

__all__ = [
    "is_batchnorm",
    "fuse_bn",
    "pad_to_3x3",
    "identity_kernel",
    "sum_branches",
    "reparameterize",
    "is_deploy",
    "relative_difference",
    "output_difference",
    "randomize_bn",
]


def is_batchnorm(module: nn.Module) -> bool:
    """True for a torch BatchNorm of any kind: BatchNorm1d/2d/3d, their lazy forms, and the SyncBatchNorm that
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` puts in their place for multi-GPU training."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def fuse_bn(kernel: Tensor | None, bn: nn.Module, conv_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fold eval-mode BatchNorm into the preceding conv: W' = W*g/s, b' = beta + (b - mean)*g/s, s = sqrt(var+eps),
    with b the conv's bias (0 when ``conv_bias`` is None). ``bn`` is any BatchNorm kind, or a frozen one such as
    torchvision's ``FrozenBatchNorm2d``: only its statistics, affine weights and ``eps`` are read.

    ``kernel`` may be None for a BN-only branch, whose kernel must then be supplied by the caller.
    """
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    mean = bn.running_mean if conv_bias is None else bn.running_mean - conv_bias
    bias = bn.bias - mean * scale
    if kernel is None:
        return scale, bias
    return kernel * scale.reshape(-1, 1, 1, 1), bias


def pad_to_3x3(kernel: Tensor) -> Tensor:
    """Zero-pad a 1x1 kernel to 3x3 with the weight at the centre (3x3 kernels pass through)."""
    if kernel.shape[-1] == 3:
        return kernel
    return F.pad(kernel, [1, 1, 1, 1])


def identity_kernel(channels: int, groups: int = 1, *, dtype: torch.dtype | None = None,
                    device: torch.device | None = None) -> Tensor:
    """A 3x3 grouped-conv kernel that copies each channel: 1 at the centre of its own channel within its group."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, 3, 3, dtype=dtype, device=device)
    idx = torch.arange(channels, device=device)
    kernel[idx, idx % per_group, 1, 1] = 1.0
    return kernel


def sum_branches(branches: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Add (kernel, bias) pairs after padding every kernel to 3x3: the single equivalent conv."""
    kernel = sum(pad_to_3x3(k) for k, _ in branches)
    bias = sum(b for _, b in branches)
    return kernel, bias


def relative_difference(reference: Tensor | np.ndarray, output: Tensor | np.ndarray) -> float:
    """max|reference - output| / max|reference| (in float64): how far a converted or exported model's output is
    from the original's, relative to the output's scale. NaN when either holds a NaN or infinity."""
    ref = torch.as_tensor(reference).detach().double()
    out = torch.as_tensor(output).detach().double()
    if not (ref.isfinite().all() and out.isfinite().all()):
        return float("nan")
    return ((ref - out).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def is_deploy(model: nn.Module) -> bool:
    """True when no module inside ``model`` still has branches to fuse."""
    return not any(getattr(m, "deploy", True) is False for m in model.modules())


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Convert every re-parameterizable module inside ``model`` (any network) to its plain deploy form.

    A module opts in by one of the conventions in use: ``fuse()`` returning the module that replaces it (timm),
    ``reparameterize()`` converting in place (timm, and this library's blocks), or ``switch_to_deploy()`` (the
    official RepVGG, mmpretrain, this library). The outermost are converted first, so that models can drop
    training-only parts (auxiliary heads) before their blocks are fused; other layers are left alone. Returns the
    converted model in eval mode (a new module when ``model`` itself is replaced by its ``fuse()``).
    """
    if not isinstance(model, nn.Module):
        raise RepVGGError(f"reparameterize needs a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    with torch.no_grad():
        model = _convert_tree(model)
    return model.eval()


def _convert_tree(module: nn.Module) -> nn.Module:
    """``module`` converted by its own convention, then its children (the converted ones put in their place)."""
    fuse = getattr(module, "fuse", None)
    if callable(fuse):
        module = fuse()
    else:
        method = next((getattr(module, n) for n in ("reparameterize", "switch_to_deploy")
                       if callable(getattr(module, n, None))), None)
        if method is not None:
            method()
    for name, child in list(module.named_children()):
        converted = _convert_tree(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


def output_difference(reference: nn.Module, x: Tensor, other: nn.Module | None = None) -> float:
    """How far ``other`` (default: ``reparameterize(reference)``) is from ``reference`` on input ``x``: the largest
    :func:`relative_difference` over their output tensors (one, or a list, tuple or dict of them), both run in eval
    mode without gradients. For any network: a backbone's feature maps, a segmenter's logits, a detector's heads."""
    other = reparameterize(reference) if other is None else other
    ref, out = _flat_outputs(reference, x), _flat_outputs(other, x)
    if len(ref) != len(out) or any(r.shape != o.shape for r, o in zip(ref, out, strict=False)):
        raise RepVGGError(f"the two models' outputs differ in number or shape: "
                          f"{[tuple(r.shape) for r in ref]} vs {[tuple(o.shape) for o in out]}")
    return max(relative_difference(r, o) for r, o in zip(ref, out, strict=True))


def _flat_outputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Every tensor ``model`` returns for ``x`` in eval mode (its training mode restored afterwards)."""
    was_training = model.training
    try:
        with torch.no_grad():
            output = model.eval()(x)
    finally:
        model.train(was_training)
    tensors, pending = [], [output]
    while pending:
        item = pending.pop(0)
        if isinstance(item, Tensor):
            tensors.append(item)
        elif isinstance(item, Mapping | list | tuple):
            pending[:0] = list(item.values() if isinstance(item, Mapping) else item)
        else:
            raise RepVGGError(f"model outputs must be tensors (or lists, tuples or dicts of them), got "
                              f"{type(item).__name__}")
    if not tensors:
        raise RepVGGError("the model returned no tensor")
    return tensors


def randomize_bn(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Give every BatchNorm non-trivial statistics and affine weights, as a trained network would have: conversion
    checks on a fresh model (all BNs at 0/1) would miss errors in folding them."""
    with torch.no_grad():
        for m in model.modules():
            if is_batchnorm(m):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.5)
