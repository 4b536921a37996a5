"""Every kind of BatchNorm a RepVGG can hold (torch's SyncBatchNorm after ``convert_sync_batchnorm``, a frozen BN
for fine-tuning) is one BN to conversion, fake quantization, the training recipes and freezing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from conftest import trained_looking
from repvgg import RepVGGBlock, create_model, reparameterize
from repvgg.models.fakequant import prepare_qat
from repvgg.models.reparam import relative_difference
from repvgg.training.distributed import plain_bn
from repvgg.training.recipes import custom_l2_penalty, param_groups
from repvgg.training.setup import freeze_stages


def _sync(model: nn.Module) -> nn.Module:
    """``model``'s copy with SyncBatchNorm in place of every BatchNorm, as multi-GPU training holds it."""
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in sync.modules())
    return sync


def _frozen(model: nn.Module) -> nn.Module:
    """``model``'s copy with torchvision's FrozenBatchNorm2d (detection fine-tuning) in place of every BatchNorm."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, child.eps)
                frozen.load_state_dict(child.state_dict())
                setattr(parent, name, frozen)
    return model


@pytest.mark.parametrize("convert", [_sync, _frozen], ids=["sync", "frozen"])
@pytest.mark.parametrize("block", ["repvgg", "qarepvgg"])
@pytest.mark.parametrize("name", ["repvgg_a0", "repvgg_b1g4"])
def test_every_batchnorm_kind_converts_exactly(name: str, block: str, convert) -> None:
    """float32 within 1e-5 and float64 within 1e-10 of the output scale, and the same deploy model as plain BN's."""
    plain = trained_looking(create_model(name, num_classes=10, strides=(2, 2, 2, 2, 1), block=block))
    model = convert(plain).eval()
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        reference = plain(x)
        assert relative_difference(reference, model(x)) < 1e-6
        deploy = reparameterize(model)
        assert relative_difference(reference, deploy(x)) < 1e-5
        assert relative_difference(reparameterize(plain)(x), deploy(x)) < 1e-6
        model.double()
        assert relative_difference(model(x.double()), reparameterize(model)(x.double())) < 1e-10


def test_block_with_sync_bn_fuses_its_identity_branch() -> None:
    block = trained_looking(RepVGGBlock(8, 8, groups=2))
    sync = _sync(block).eval()
    assert isinstance(sync.rbr_identity, nn.SyncBatchNorm)
    for kernel, expected in zip(sync.equivalent_kernel_bias(), block.equivalent_kernel_bias(), strict=True):
        torch.testing.assert_close(kernel, expected, rtol=0, atol=0)


def test_trained_looking_statistics_reach_every_batchnorm_kind() -> None:
    model = trained_looking(_sync(create_model("repvgg_a0", num_classes=10)))
    bns = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(bns) == sum(isinstance(m, nn.BatchNorm2d) for m in create_model("repvgg_a0").modules())
    assert all(not torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in bns)


def test_training_recipes_and_fake_quantization_treat_sync_bn_as_bn() -> None:
    plain = trained_looking(create_model("repvgg_a0", num_classes=10))
    sync = trained_looking(_sync(plain))
    sync.load_state_dict(plain.state_dict())
    for custom_l2 in (False, True):
        groups = [[p.shape for p in g["params"]] for g in param_groups(plain, 1e-4, custom_l2)]
        assert [[p.shape for p in g["params"]] for g in param_groups(sync, 1e-4, custom_l2)] == groups
    torch.testing.assert_close(custom_l2_penalty(sync), custom_l2_penalty(plain))
    x = torch.randn(2, 3, 32, 32)
    qat_plain, qat_sync = prepare_qat(copy.deepcopy(plain)).eval(), prepare_qat(sync).eval()
    with torch.no_grad():
        assert relative_difference(qat_plain(x), qat_sync(x)) < 1e-6
        assert relative_difference(qat_plain(x), plain(x)) > 1e-4  # the fake quantization is really on


def test_frozen_stages_keep_their_sync_bn_statistics() -> None:
    """Frozen before the SyncBatchNorm conversion (as training does it), the stages stay frozen after it."""
    model = create_model("repvgg_a0", num_classes=10)
    frozen = freeze_stages(model, 2)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.train()
    for module in frozen:
        module.eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    changed = {k for k, v in model.state_dict().items() if "running_mean" in k and not torch.equal(v, before[k])}
    assert changed and not any(k.startswith(("stage0.", "stage1.")) for k in changed)
    assert any(k.startswith("stage2.") for k in changed)
    assert all(p.grad is None for m in frozen for p in m.parameters())


def test_plain_bn_gives_back_the_same_batchnorms() -> None:
    """SyncBatchNorm to BatchNorm2d keeps the very parameters and statistics: dtype, frozen state, training mode."""
    model = trained_looking(create_model("repvgg_a0", num_classes=10)).double()
    freeze_stages(model, 1)
    sync = _sync(model)
    sync.stage1.train()
    weight = sync.stage1[1].rbr_identity.weight
    back = plain_bn(sync)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in back.modules())
    assert back.stage1[1].rbr_identity.weight is weight and back.stage1[1].rbr_identity.training
    assert not back.stage0.training and back.linear.weight.dtype == torch.float64
    assert not back.stage0.rbr_dense.bn.weight.requires_grad and back.stage1[0].rbr_dense.bn.weight.requires_grad
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), model(x))
