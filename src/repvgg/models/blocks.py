"""Building blocks: the multi-branch RepVGG block, its squeeze-excitation, and the conv+BN branch.

Attribute names follow the official implementation (``rbr_dense``, ``rbr_1x1``, ``rbr_identity``,
``rbr_reparam``, ``se``, ``post_se``) so that official checkpoints map onto these modules one to one.
"""

from __future__ import annotations

from numbers import Integral
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import RepVGGError
from .reparam import fuse_bn, identity_kernel, is_batchnorm, sum_branches

__all__ = ["ConvBN", "PointwiseConv", "SqueezeExcite", "RepVGGBlock", "SEPosition", "Branches", "BRANCHES", "BlockKind",
           "BLOCK_KINDS", "BNInit", "small_batchnorm_init", "is_int", "check_int"]

SEPosition = Literal["pre", "post"]
Branches = Literal["full", "3x3", "3x3+1x1", "3x3+identity"]
BRANCHES: tuple[str, ...] = ("full", "3x3", "3x3+1x1", "3x3+identity")
BlockKind = Literal["repvgg", "qarepvgg"]
BLOCK_KINDS: tuple[str, ...] = ("repvgg", "qarepvgg")
BNInit = Literal["default", "small"]


class PointwiseConv(nn.Conv2d):
    """A 1x1 conv that, when strided, keeps every ``stride``-th pixel and then convolves: the same values as
    ``nn.Conv2d``, without oneDNN's weight gradient for strided 1x1 convs over channels-last inputs of few channels,
    which corrupts memory on AVX2 CPUs (torch 2.14; the stem's 1x1 branch reads 3 channels)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1,
                 bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, 1, stride, 0, 1, groups, bias=bias)

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        sy, sx = self.stride
        return F.conv2d(input[:, :, ::sy, ::sx], weight, bias, 1, 0, 1, self.groups)


class ConvBN(nn.Sequential):
    """A bias-free conv followed by BatchNorm: one branch of the training-time block."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, dilation: int = 1) -> None:
        super().__init__()
        if kernel_size == 1 and padding == 0 and dilation == 1:
            self.conv: nn.Conv2d = PointwiseConv(in_channels, out_channels, stride, groups)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                  bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def fused(self) -> tuple[Tensor, Tensor]:
        """The (kernel, bias) of the equivalent conv with BN folded in."""
        return fuse_bn(self.conv.weight, self.bn)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global average, 1x1 down, ReLU, 1x1 up, sigmoid gate (as in RepVGG-D2se/L2pse)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, hidden, 1, bias=True)
        self.up = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        scale = x.mean((2, 3), keepdim=True)
        scale = torch.sigmoid(self.up(torch.relu(self.down(scale))))
        return x * scale


class RepVGGBlock(nn.Module):
    """``ReLU(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x))``, optionally with SE before or after the ReLU.

    The identity branch exists only when ``in_channels == out_channels`` and ``stride == 1``, unless
    ``identity=False`` leaves it out (the block that replaces a stride-2 block in a dilated backbone keeps that
    block's weights). ``dilation`` spaces the 3x3 taps (padding follows, so the size is kept as at dilation 1);
    the 1x1 and identity branches read the centre tap only, so they are unchanged. ``branches`` keeps a subset of
    the training-time branches (the paper's ablation: ``"3x3"``, ``"3x3+1x1"``, ``"3x3+identity"``, ``"full"``).
    ``kind="qarepvgg"`` is the quantization-friendly block of QARepVGG (Chu et al., 2022): no BN on the 1x1 and
    identity branches, one BN after their sum, ``ReLU(BN(BN(conv3x3(x)) + conv1x1(x) + x))``. Every variant
    converts exactly to one (dilated) 3x3 conv. ``deploy=True`` builds that conv directly; ``switch_to_deploy()``
    (or ``reparameterize()``, timm's name for it) converts in place.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1,
                 se: SEPosition | None = None, se_reduction: int = 16, deploy: bool = False,
                 branches: Branches = "full", kind: BlockKind = "repvgg", dilation: int = 1,
                 identity: bool = True) -> None:
        super().__init__()
        _check_block_options(in_channels, out_channels, stride, groups, se, se_reduction, branches, kind)
        check_int("dilation", dilation, 1)
        if not isinstance(identity, bool):
            raise RepVGGError(f"identity must be True or False, got {identity!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.groups, self.dilation = stride, groups, dilation
        self.branches, self.kind = branches, kind
        self.deploy = deploy
        se_module = SqueezeExcite(out_channels, out_channels // se_reduction) if se else nn.Identity()
        self.se = se_module if se == "pre" else nn.Identity()
        self.post_se = se_module if se == "post" else nn.Identity()
        self.nonlinearity = nn.ReLU()
        if deploy:
            self.rbr_reparam = nn.Conv2d(in_channels, out_channels, 3, stride, dilation, dilation, groups, bias=True)
            return
        self.rbr_dense = ConvBN(in_channels, out_channels, 3, stride, dilation, groups, dilation)
        self.rbr_1x1: nn.Module | None = None
        self.rbr_identity: nn.Module | None = None
        if branches in ("full", "3x3+1x1"):
            self.rbr_1x1 = ConvBN(in_channels, out_channels, 1, stride, 0, groups) if kind == "repvgg" else \
                PointwiseConv(in_channels, out_channels, stride, groups)
        if branches in ("full", "3x3+identity") and identity and in_channels == out_channels and stride == 1:
            self.rbr_identity = nn.BatchNorm2d(in_channels) if kind == "repvgg" else nn.Identity()
        if kind == "qarepvgg":
            self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            out = self.rbr_reparam(x)
        else:
            out = self.rbr_dense(x)
            if self.rbr_1x1 is not None:
                out = out + self.rbr_1x1(x)
            if self.rbr_identity is not None:
                out = out + self.rbr_identity(x)
            if self.kind == "qarepvgg":
                out = self.bn(out)
        return self.post_se(self.nonlinearity(self.se(out)))

    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The (3x3 kernel, bias) of the single conv equal to all branches in eval mode; differentiable."""
        if self.deploy:
            return self.rbr_reparam.weight, self.rbr_reparam.bias
        weight = self.rbr_dense.conv.weight
        zero = weight.new_zeros(self.out_channels)
        branches = [self.rbr_dense.fused()]
        # which branches carry a BN follows from the block's kind, never from the type of its modules: that type
        # changes when BNs are converted (SyncBatchNorm for multi-GPU training, a frozen BN for fine-tuning)
        with_bn = self.kind == "repvgg"
        if self.rbr_1x1 is not None:
            branches.append(self.rbr_1x1.fused() if with_bn else (self.rbr_1x1.weight, zero))
        if self.rbr_identity is not None:
            eye = identity_kernel(self.in_channels, self.groups, dtype=weight.dtype, device=weight.device)
            branches.append(fuse_bn(eye, self.rbr_identity) if with_bn else (eye, zero))
        kernel, bias = sum_branches(branches)
        return fuse_bn(kernel, self.bn, bias) if self.kind == "qarepvgg" else (kernel, bias)

    def switch_to_deploy(self) -> None:
        """Replace the branches by one 3x3 conv with bias, in place. Idempotent."""
        if self.deploy:
            return
        kernel, bias = self.equivalent_kernel_bias()
        conv = self.rbr_dense.conv
        self.rbr_reparam = nn.Conv2d(self.in_channels, self.out_channels, 3, self.stride, self.dilation,
                                     self.dilation, self.groups, bias=True, device="meta")
        self.rbr_reparam.weight = nn.Parameter(kernel.detach())  # new tensors: sums of the branches, nobody's weights
        self.rbr_reparam.bias = nn.Parameter(bias.detach())
        self.rbr_reparam.train(conv.training)
        del self.rbr_dense, self.rbr_1x1, self.rbr_identity
        if self.kind == "qarepvgg":
            del self.bn
        self.deploy = True

    def reparameterize(self) -> None:
        """timm's name for :meth:`switch_to_deploy`, so that ``timm.utils.reparameterize_model`` converts the block."""
        self.switch_to_deploy()


def small_batchnorm_init(model: nn.Module) -> nn.Module:
    """Start every BatchNorm inside the RepVGG blocks of ``model`` small, as timm's RepVGG does: weight ~ N(0.1, 0.1),
    bias ~ N(0, 0.1), drawn from torch's global generator (PyTorch's and the official code's start is weight 1, bias 0).
    Returns ``model``; blocks in deploy form hold no BatchNorm and are left as they are."""
    with torch.no_grad():
        for block in model.modules():
            if not isinstance(block, RepVGGBlock):
                continue
            for bn in block.modules():
                if is_batchnorm(bn) and bn.affine:
                    bn.weight.normal_(0.1, 0.1)
                    bn.bias.normal_(0.0, 0.1)
    return model


def is_int(value: object) -> bool:
    """True for an integer of any kind (Python's, NumPy's), not for a bool or a float."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_int(name: str, value: object, minimum: int) -> None:
    """Raise :class:`RepVGGError` naming ``name`` unless ``value`` is an integer of at least ``minimum``."""
    if not is_int(value) or value < minimum:
        raise RepVGGError(f"{name} must be an integer of at least {minimum}, got {value!r}")


def _check_block_options(in_channels: object, out_channels: object, stride: object, groups: object, se: object,
                         se_reduction: object, branches: object, kind: object) -> None:
    check_int("in_channels", in_channels, 1)
    check_int("out_channels", out_channels, 1)
    check_int("groups", groups, 1)
    if in_channels % groups or out_channels % groups:
        raise RepVGGError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
    if se not in (None, "pre", "post"):
        raise RepVGGError(f"se must be None, 'pre' or 'post', got {se!r}")
    check_int("se_reduction", se_reduction, 1)
    if se is not None and out_channels < se_reduction:
        raise RepVGGError(f"se_reduction={se_reduction} leaves squeeze-excitation of {out_channels} channels with "
                          f"no hidden channel")
    if not is_int(stride) or stride not in (1, 2):
        raise RepVGGError(f"stride must be 1 or 2, got {stride!r}")
    if branches not in BRANCHES:
        raise RepVGGError(f"branches must be one of {', '.join(map(repr, BRANCHES))}, got {branches!r}")
    if kind not in BLOCK_KINDS:
        raise RepVGGError(f"kind must be one of {', '.join(map(repr, BLOCK_KINDS))}, got {kind!r}")
