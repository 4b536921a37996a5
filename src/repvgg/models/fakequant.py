"""Quantization-aware training of the multi-branch model: it trains against the int8 conv it will deploy as.

Each block runs as the single conv it converts to: the equivalent kernel of its branches (BN folded with frozen
running statistics, as in the deploy model) fake-quantized per output channel to symmetric int8, applied to its input
fake-quantized per tensor to uint8. Gradients pass straight through the rounding to every branch, so the branches
keep training while the loss sees the deployed model's rounding. The rounding is torch's own
``torch.fake_quantize_per_channel_affine`` / ``torch.fake_quantize_per_tensor_affine``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import RepVGGBlock

__all__ = ["WEIGHT_LEVELS", "ACTIVATION_LEVELS", "fake_quant_weight", "ActivationFakeQuant", "FakeQuantBlock",
           "prepare_qat", "is_qat"]

WEIGHT_LEVELS = (-127, 127)  # symmetric int8, narrow range: what NNCF and ONNX Runtime use for per-channel weights
ACTIVATION_LEVELS = (0, 255)  # asymmetric uint8 per tensor


def fake_quant_weight(kernel: Tensor) -> Tensor:
    """``kernel`` rounded to symmetric int8 per output channel (scale: the channel's largest magnitude / 127),
    with a straight-through gradient."""
    scale = kernel.detach().abs().amax(dim=tuple(range(1, kernel.ndim))).float() / WEIGHT_LEVELS[1]
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(kernel, scale, zero, 0, *WEIGHT_LEVELS)


class ActivationFakeQuant(nn.Module):
    """Per-tensor asymmetric uint8 fake quantization over a moving average of the batch min/max (the range that
    includes 0). The range is not saved with the weights: a reloaded model re-estimates it from its first training
    batch (a resumed run gets it back from its training state); until a range was seen, values pass unchanged."""

    def __init__(self, momentum: float = 0.05) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("low", torch.tensor(float("nan")), persistent=False)
        self.register_buffer("high", torch.tensor(float("nan")), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self._observe(x.detach())
        if torch.isnan(self.low):
            return x
        low, high = self.low.clamp(max=0.0), self.high.clamp(min=0.0)
        scale = ((high - low) / ACTIVATION_LEVELS[1]).clamp_min(torch.finfo(torch.float32).tiny)
        zero = (-low / scale).round().clamp(*ACTIVATION_LEVELS).to(torch.int32)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, *ACTIVATION_LEVELS)

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        low, high = x.min().float(), x.max().float()
        if not torch.isnan(self.low):
            low, high = self.low.lerp(low, self.momentum), self.high.lerp(high, self.momentum)
        self.low.copy_(low)
        self.high.copy_(high)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


class FakeQuantBlock(RepVGGBlock):
    """A training-time :class:`RepVGGBlock` whose forward is its int8 deploy conv: the fake-quantized equivalent
    kernel on the fake-quantized input (with the block's stride and dilation). It shares the block's parameters and
    state-dict keys, converts like it, and its deploy form runs in float."""

    input_quant: ActivationFakeQuant

    @classmethod
    def from_block(cls, block: RepVGGBlock) -> FakeQuantBlock:
        """The fake-quantized view of ``block`` (same parameter tensors)."""
        if block.deploy:
            raise ValueError("quantization-aware training needs the training-time (multi-branch) block")
        qat = cls.__new__(cls)
        qat.__dict__.update(block.__dict__)
        qat._parameters, qat._buffers, qat._modules = (dict(block._parameters), dict(block._buffers),
                                                       dict(block._modules))
        qat.input_quant = ActivationFakeQuant()
        return qat

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            return super().forward(x)
        kernel, bias = self.equivalent_kernel_bias()
        out = F.conv2d(self.input_quant(x), fake_quant_weight(kernel), bias, self.stride, self.dilation, self.dilation,
                       self.groups)
        return self.post_se(self.nonlinearity(self.se(out)))


def prepare_qat(model: nn.Module) -> nn.Module:
    """Replace every training-time :class:`RepVGGBlock` inside ``model`` (any network: a RepVGG, or a segmenter or
    detector holding RepVGG blocks anywhere) by its :class:`FakeQuantBlock`, in place; the other layers are left
    alone. Returns ``model``; its state dict and checkpoints stay those of the plain model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is RepVGGBlock and not child.deploy:
                setattr(parent, name, FakeQuantBlock.from_block(child))
    return model


def is_qat(model: nn.Module) -> bool:
    """True when ``model`` holds fake-quantized blocks (see :func:`prepare_qat`)."""
    return any(isinstance(m, FakeQuantBlock) for m in model.modules())
