"""The re-parameterization math and the model-level switch, on single blocks and on foreign containers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import trained_looking
from repvgg import RepVGGBlock, RepVGGError, create_model, reparameterize, small_batchnorm_init
from repvgg.models.blocks import BLOCK_KINDS, BRANCHES
from repvgg.models.reparam import fuse_bn, identity_kernel, is_deploy, pad_to_3x3, relative_difference


def test_fuse_bn_equals_conv_then_bn() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).double()
    bn = trained_looking(nn.BatchNorm2d(6).double())
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    kernel, bias = fuse_bn(conv.weight, bn)
    assert torch.allclose(F.conv2d(x, kernel, bias, padding=1), bn(conv(x)), atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_identity_kernel_copies_every_channel(groups: int) -> None:
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    kernel = identity_kernel(8, groups, dtype=torch.float64)
    assert kernel.shape == (8, 8 // groups, 3, 3)
    assert torch.equal(F.conv2d(x, kernel, padding=1, groups=groups), x)


def test_pad_to_3x3_centres_the_1x1_weight() -> None:
    k = torch.randn(3, 2, 1, 1)
    padded = pad_to_3x3(k)
    assert padded.shape == (3, 2, 3, 3)
    assert torch.equal(padded[:, :, 1, 1], k[:, :, 0, 0]) and padded.abs().sum() == k.abs().sum()


@pytest.mark.parametrize("in_ch,out_ch,stride,groups,se", [
    (8, 8, 1, 1, None),   # identity branch present
    (8, 8, 2, 1, None),   # stride 2: no identity
    (8, 16, 1, 1, None),  # in != out: no identity
    (8, 8, 1, 2, None),   # groups with identity
    (16, 16, 1, 4, "pre"),
    (16, 32, 2, 4, "post"),
])
@pytest.mark.parametrize("kind", BLOCK_KINDS)
@pytest.mark.parametrize("branches", BRANCHES)
def test_block_conversion_is_exact(in_ch: int, out_ch: int, stride: int, groups: int, se: str | None,
                                   branches: str, kind: str) -> None:
    block = trained_looking(RepVGGBlock(in_ch, out_ch, stride, groups, se=se, se_reduction=4, branches=branches,
                                        kind=kind))
    has_identity = in_ch == out_ch and stride == 1 and branches in ("full", "3x3+identity")
    assert (block.rbr_identity is not None) == has_identity
    assert (block.rbr_1x1 is not None) == (branches in ("full", "3x3+1x1"))
    x = torch.randn(1, in_ch, 11, 7)
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        ref_block = copy.deepcopy(block).to(dtype)
        fused = reparameterize(ref_block)
        assert relative_difference(ref_block(x.to(dtype)), fused(x.to(dtype))) < tol
    assert not hasattr(fused, "rbr_dense") and fused.rbr_reparam.bias is not None


def test_equivalent_kernel_is_differentiable() -> None:
    block = RepVGGBlock(4, 4)
    kernel, bias = block.equivalent_kernel_bias()
    (kernel.square().sum() + bias.sum()).backward()
    for p in (block.rbr_dense.conv.weight, block.rbr_1x1.bn.weight, block.rbr_identity.weight,
              block.rbr_identity.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_switch_to_deploy_is_idempotent_and_in_place() -> None:
    block = trained_looking(RepVGGBlock(4, 4))
    block.switch_to_deploy()
    weight = block.rbr_reparam.weight.clone()
    block.switch_to_deploy()
    assert torch.equal(weight, block.rbr_reparam.weight) and block.deploy


class SegNet(nn.Module):
    """A stand-in for a user's segmentation network with a RepVGG backbone and its own head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = create_model("repvgg_a0", out_indices=(2, 3, 4), strides=(2, 2, 2, 2, 1))
        self.head = nn.Sequential(nn.Conv2d(1280, 5, 1), nn.BatchNorm2d(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c2, c3, c4 = self.backbone(x)
        return F.interpolate(self.head(c4), size=x.shape[-2:], mode="bilinear") + c2.mean() + c3.mean()


def test_reparameterize_any_module_without_touching_the_original() -> None:
    net = trained_looking(SegNet())
    x = torch.randn(1, 3, 64, 48)
    deploy = reparameterize(net)
    assert not is_deploy(net) and is_deploy(deploy) and not deploy.training
    assert relative_difference(net(x), deploy(x)) < 1e-5
    assert isinstance(deploy.head[1], nn.BatchNorm2d)  # foreign modules are left alone
    assert reparameterize(net, inplace=True) is net and is_deploy(net)


def test_qarepvgg_block_is_bn_after_the_sum_of_conv_branches() -> None:
    """QARepVGG: 3x3 conv+BN, a bare 1x1 conv, a bare identity, one BN over their sum, then ReLU."""
    block = trained_looking(RepVGGBlock(8, 8, kind="qarepvgg"))
    assert isinstance(block.rbr_1x1, nn.Conv2d) and isinstance(block.rbr_identity, nn.Identity)
    assert isinstance(block.bn, nn.BatchNorm2d)
    x = torch.randn(2, 8, 6, 6)
    expected = torch.relu(block.bn(block.rbr_dense(x) + block.rbr_1x1(x) + x))
    assert torch.equal(block(x), expected)
    fused = reparameterize(block)
    assert not hasattr(fused, "bn") and relative_difference(expected, fused(x)) < 1e-5


def test_fuse_bn_folds_into_a_conv_with_bias() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True).double()
    bn = trained_looking(nn.BatchNorm2d(6).double())
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    kernel, bias = fuse_bn(conv.weight, bn, conv.bias)
    assert torch.allclose(F.conv2d(x, kernel, bias, padding=1), bn(conv(x)), atol=1e-12)


@pytest.mark.parametrize(("options", "message"), [({"se": "bogus"}, "se must be None, 'pre' or 'post'"),
                                                  ({"stride": 3}, "stride must be 1 or 2"),
                                                  ({"stride": 0}, "stride must be 1 or 2"),
                                                  ({"branches": "1x1"}, "branches must be one of"),
                                                  ({"kind": "acnet"}, "kind must be one of"),
                                                  ({"groups": 0}, "groups must be an integer of at least 1, got 0"),
                                                  ({"groups": 3}, "groups=3 must divide in_channels=8"),
                                                  ({"groups": 2.0}, "groups must be an integer"),
                                                  ({"stride": 2.0}, "stride must be 1 or 2"),
                                                  ({"in_channels": 0}, "in_channels must be an integer of at least 1"),
                                                  ({"se": "pre", "se_reduction": 16}, "se_reduction=16 leaves"),
                                                  ({"se_reduction": 0}, "se_reduction must be an integer")])
def test_block_rejects_bad_options_naming_them(options: dict, message: str) -> None:
    with pytest.raises(RepVGGError, match=message):
        RepVGGBlock(**{"in_channels": 8, "out_channels": 8, **options})


def test_reparameterize_rejects_what_is_not_a_module() -> None:
    with pytest.raises(RepVGGError, match=r"reparameterize needs a torch\.nn\.Module, got str"):
        reparameterize("x")


def test_relative_difference_on_tensors_and_arrays() -> None:
    ref = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    out = ref + torch.tensor([[0.0, 0.02], [0.0, 0.0]])
    assert relative_difference(ref, out) == pytest.approx(0.005)
    assert relative_difference(ref.numpy(), out.numpy()) == pytest.approx(0.005)
    assert relative_difference(ref, ref) == 0.0 and relative_difference(torch.zeros(2), torch.zeros(2)) == 0.0
    assert math.isnan(relative_difference(ref, out * float("nan")))


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_a_strided_block_on_three_channels_trains_alike_in_either_memory_format(kind: str, one_thread: None) -> None:
    """The stem's 1x1 branch (3 channels in, stride 2) in channels-last training: on AVX2 CPUs oneDNN's weight
    gradient for that conv corrupts memory, so the branch subsamples first; values and gradients equal the strided
    conv's."""
    block = RepVGGBlock(3, 48, stride=2, kind=kind)
    pointwise = block.rbr_1x1.conv if kind == "repvgg" else block.rbr_1x1
    reference = nn.Conv2d(3, 48, 1, 2, bias=False)
    reference.weight = pointwise.weight
    x = torch.randn(4, 3, 32, 33)
    assert torch.equal(pointwise(x), reference(x)) and pointwise(x).shape == (4, 48, 16, 17)
    x, grads = x[..., :32], []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        block.zero_grad()
        block.to(memory_format=memory_format)(x.contiguous(memory_format=memory_format)).square().mean().backward()
        grads.append([p.grad.clone() for p in block.parameters()])
    for nchw, channels_last in zip(*grads, strict=True):
        torch.testing.assert_close(channels_last, nchw, rtol=1e-4, atol=1e-6)


def test_small_batchnorm_init_draws_the_blocks_batchnorm_weights_and_biases_only() -> None:
    """timm's start: every block BN (3x3, 1x1 and identity branches) weight ~ N(0.1, 0.1), bias ~ N(0, 0.1); nothing
    else moves, and a model in deploy form, which holds no BatchNorm, is left as it is."""
    torch.manual_seed(0)
    model = create_model("repvgg_a0", num_classes=10, strides=(1, 1, 2, 2, 2))
    before = copy.deepcopy(model.state_dict())
    assert small_batchnorm_init(model) is model
    after = model.state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if k.endswith(("bn.weight", "bn.bias", "rbr_identity.weight",
                                                        "rbr_identity.bias"))}
    weights = torch.cat([after[k] for k in sorted(changed) if k.endswith("weight")])
    biases = torch.cat([after[k] for k in sorted(changed) if k.endswith("bias")])
    assert len(weights) > 5000 and abs(weights.mean() - 0.1) < 0.01 and abs(weights.std() - 0.1) < 0.01
    assert abs(biases.mean()) < 0.01 and abs(biases.std() - 0.1) < 0.01
    plain = reparameterize(model)
    kept = copy.deepcopy(plain.state_dict())
    small_batchnorm_init(plain)
    assert all(torch.equal(v, kept[k]) for k, v in plain.state_dict().items())
