"""Every published architecture: structure, parameter counts, options, and exact conversion."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
from torch import nn

from conftest import trained_looking
from repvgg import (
    RepVGG,
    RepVGGBlock,
    RepVGGError,
    SqueezeExcite,
    create_model,
    list_models,
    reparameterize,
    save_checkpoint,
)
from repvgg.models.architectures import AuxHead, get_config
from repvgg.models.profile import count_params
from repvgg.models.reparam import relative_difference

PAPER_DEPLOY_PARAMS_M = {"repvgg_a0": 8.30, "repvgg_a1": 12.78, "repvgg_a2": 25.49, "repvgg_b0": 14.33,
                         "repvgg_b1": 51.82, "repvgg_b1g2": 41.36, "repvgg_b1g4": 36.12, "repvgg_b2": 80.31,
                         "repvgg_b2g4": 55.77, "repvgg_b3": 110.96}
# the smallest model of each kind of fusion (dense, 2 and 4 groups; SE and RepVGGplus's heads are not fused): float64
# exactness, which checks the fusion arithmetic rather than the sizes, is asserted on these; every model in float32
FLOAT64_CHECKED = ("repvgg_a0", "repvgg_b1g2", "repvgg_b1g4")
# one model of each kind of block layout (dense, 2 and 4 groups, SE, RepVGGplus): the QARepVGG block's fusion depends
# on the layout, not on the widths and depths that tell the other models apart
LAYOUTS = (*FLOAT64_CHECKED, "repvgg_d2se", "repvggplus_l2pse")
ALLOWED_DEPLOY_MODULES = (RepVGG, nn.Conv2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Linear, nn.Identity, nn.Sequential,
                          nn.ModuleDict, RepVGGBlock, SqueezeExcite)


def test_registry_lists_all_published_models() -> None:
    assert list_models() == ["repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_b0", "repvgg_b1", "repvgg_b1g2",
                             "repvgg_b1g4", "repvgg_b2", "repvgg_b2g2", "repvgg_b2g4", "repvgg_b3", "repvgg_b3g2",
                             "repvgg_b3g4", "repvgg_d2se", "repvggplus_l2pse"]


@pytest.mark.parametrize("name", list_models())
def test_conversion_is_exact_and_plain(name: str) -> None:
    """float32 within 1e-5 (and float64 within 1e-10 for :data:`FLOAT64_CHECKED`) of the output scale; batch 1,
    non-square input."""
    with torch.device("meta"):
        meta = create_model(name)
    expected_deploy = count_params(reparameterize(meta))
    deploy = _assert_exact(trained_looking(create_model(name, num_classes=10, strides=(2, 2, 2, 2, 1))),
                           float64=name in FLOAT64_CHECKED)
    for m in deploy.modules():
        assert isinstance(m, ALLOWED_DEPLOY_MODULES), f"{type(m).__name__} left in deploy model"
        if isinstance(m, nn.Conv2d) and not any(m is c for s in deploy.modules() if isinstance(s, SqueezeExcite)
                                                 for c in s.children()):
            assert m.kernel_size == (3, 3) and m.bias is not None
    if name in PAPER_DEPLOY_PARAMS_M:  # the paper truncates to two decimals
        assert math.floor(expected_deploy / 1e4) / 100 == PAPER_DEPLOY_PARAMS_M[name]


def _assert_exact(model: nn.Module, float64: bool = True) -> nn.Module:
    """float32 within 1e-5 and (with ``float64``) float64 within 1e-10 of the output scale (batch 1, non-square
    input); returns the float32 deploy model."""
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        deploy = reparameterize(model)
        assert relative_difference(model(x), deploy(x)) < 1e-5
        if float64:
            model.double()
            assert relative_difference(model(x.double()), reparameterize(model)(x.double())) < 1e-10
    return deploy


@pytest.mark.parametrize("name", LAYOUTS)
def test_qarepvgg_block_converts_exactly_in_every_block_layout(name: str) -> None:
    model = trained_looking(create_model(name, num_classes=10, strides=(2, 2, 2, 2, 1), block="qarepvgg"))
    assert all(b.kind == "qarepvgg" and hasattr(b, "bn") for b in model.modules() if isinstance(b, RepVGGBlock))
    deploy = _assert_exact(model, float64=name in FLOAT64_CHECKED)
    assert all(b.deploy for b in deploy.modules() if isinstance(b, RepVGGBlock))


@pytest.mark.parametrize("name", ["repvgg_a0", "repvgg_b1g4"])
@pytest.mark.parametrize("branches", ["3x3", "3x3+1x1", "3x3+identity"])
def test_branch_variants_convert_exactly(name: str, branches: str) -> None:
    model = trained_looking(create_model(name, num_classes=10, strides=(2, 2, 2, 2, 1), branches=branches))
    blocks = [b for b in model.modules() if isinstance(b, RepVGGBlock)]
    assert any(b.rbr_1x1 is not None for b in blocks) == ("1x1" in branches)
    assert any(b.rbr_identity is not None for b in blocks) == ("identity" in branches)
    deploy = _assert_exact(model)
    full = reparameterize(create_model(name, num_classes=10, strides=(2, 2, 2, 2, 1)))
    assert count_params(deploy) == count_params(full)  # every variant deploys to the same plain network


def test_block_options_are_rejected_clearly_and_kept_in_checkpoints(tmp_path) -> None:
    from repvgg import model_from_checkpoint, save_checkpoint

    with pytest.raises(RepVGGError, match="branches must be one of"):
        create_model("repvgg_a0", branches="1x1")
    with pytest.raises(RepVGGError, match="block one of"):
        create_model("repvgg_a0", block="acnet")
    model = create_model("repvgg_a0", num_classes=3, block="qarepvgg", branches="3x3+identity")
    save_checkpoint(model, tmp_path / "qa.pth")
    loaded, ckpt = model_from_checkpoint(tmp_path / "qa.pth")
    assert ckpt.metadata["block"] == "qarepvgg" and ckpt.metadata["branches"] == "3x3+identity"
    assert (loaded.block, loaded.branches) == ("qarepvgg", "3x3+identity")
    save_checkpoint(reparameterize(model), tmp_path / "qa_deploy.pth")
    deploy, ckpt = model_from_checkpoint(tmp_path / "qa_deploy.pth")
    assert ckpt.deploy and ckpt.metadata["block"] == "qarepvgg" and deploy.stage1[0].deploy


def test_widths_groups_and_se_follow_the_paper() -> None:
    assert get_config("RepVGG-A0").stage_channels == (48, 48, 96, 192, 1280)
    assert get_config("repvgg-b3").stage_channels == (64, 192, 384, 768, 2560)
    b1g4 = create_model("repvgg_b1g4", deploy=True)
    groups = [b.groups for s in b1g4.stages[1:] for b in s]
    assert groups == [1 if layer % 2 else 4 for layer in range(1, 28)]
    d2se = create_model("RepVGG-D2se", deploy=True)
    assert d2se.stage0.se.down.out_channels == 4 and isinstance(d2se.stage0.post_se, nn.Identity)
    l2 = create_model("RepVGGplus-L2pse", deploy=True)
    assert l2.stage4[0].post_se.down.out_channels == 640 and isinstance(l2.stage4[0].se, nn.Identity)
    assert all(b.groups == 1 for s in l2.stages for b in (s if isinstance(s, nn.Sequential) else [s]))


def test_unknown_model_and_bad_options_are_rejected() -> None:
    with pytest.raises(RepVGGError, match="unknown model 'repvgg_z9'"):
        create_model("repvgg_z9")
    with pytest.raises(RepVGGError, match="strides"):
        create_model("repvgg_a0", strides=(1, 1))
    with pytest.raises(RepVGGError, match="out_indices"):
        create_model("repvgg_a0", out_indices=(5,))
    with pytest.raises(RepVGGError, match=r"unknown option\(s\) for create_model: colour"):
        create_model("repvgg_a0", colour="blue")


@pytest.mark.parametrize(("name", "options", "message"), [
    (None, {}, "model name must be a string, got None"),
    (3, {}, "model name must be a string, got 3"),
    ("repvgg_a0", {"num_classes": -1}, "num_classes must be an integer of at least 0, got -1"),
    ("repvgg_a0", {"num_classes": 2.5}, "num_classes must be an integer of at least 0, got 2.5"),
    ("repvgg_a0", {"in_chans": 0}, "in_chans must be an integer of at least 1, got 0"),
    ("repvgg_a0", {"in_chans": "3"}, "in_chans must be an integer of at least 1, got '3'"),
    ("repvgg_a0", {"groups": 0}, "groups must be an integer of at least 1, got 0"),
    ("repvgg_a0", {"groups": 2.5}, "groups must be an integer of at least 1, got 2.5"),
    ("repvgg_b1g4", {"groups": 5}, "groups=5 must divide the channels of every grouped layer"),
    ("repvgg_a0", {"strides": (2, 2, 2, 2, 0)}, "strides must be five values of 1 or 2"),
    ("repvgg_a0", {"strides": (2, 2, 2, 2, -2)}, "strides must be five values of 1 or 2"),
    ("repvgg_a0", {"strides": (2, 2, 2, 2, 2.0)}, "strides must be five values of 1 or 2"),
    ("repvgg_a0", {"strides": None}, "strides must be five values of 1 or 2"),
    ("repvgg_a0", {"out_indices": (1.0, 2)}, "out_indices must be stage numbers in 0..4"),
    ("repvgg_a0", {"aux_weight": -0.1}, "aux_weight must be a finite number of at least 0"),
    ("repvgg_a0", {"aux_weight": float("nan")}, "aux_weight must be a finite number of at least 0"),
])
def test_bad_arguments_raise_one_error_naming_the_argument(name: object, options: dict, message: str) -> None:
    with pytest.raises(RepVGGError, match=re.escape(message)):
        create_model(name, **options)


@pytest.mark.parametrize(("fields", "message"), [
    ({"widths": (0.75, 0.75, 0.0, 2.5)}, "widths must be four positive width multipliers"),
    ({"widths": (-1, 1, 1, 2.5)}, "widths must be four positive width multipliers"),
    ({"widths": (0.001, 1, 1, 2.5)}, "leave a stage with no channel"),
    ({"widths": (1, 1, 1)}, "widths must be four"),
    ({"depths": (2, 0, 14, 1)}, "depths must be four block counts of at least 1"),
    ({"groups": 0}, "groups must be an integer of at least 1"),
    ({"se": "pre", "se_reduction": 64}, "se_reduction=64 leaves the squeeze-excitation of 48 channels"),
    ({"se_reduction": 0}, "se_reduction must be an integer of at least 1"),
])
def test_configs_that_build_nonsense_are_rejected(fields: dict, message: str) -> None:
    with pytest.raises(RepVGGError, match=message):
        replace(get_config("repvgg_a0"), **fields)


def test_reset_classifier_rejects_a_negative_class_count() -> None:
    model = create_model("repvgg_a0", num_classes=10)
    with pytest.raises(RepVGGError, match="num_classes must be an integer of at least 0, got -3"):
        model.reset_classifier(-3)
    assert model.linear.out_features == 10


def test_small_images_channels_and_classifier_options() -> None:
    model = create_model("repvgg_a0", num_classes=10, in_chans=1, strides=(1, 1, 2, 2, 2)).eval()
    x = torch.randn(2, 1, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 1280, 4, 4)
    assert torch.allclose(model.forward_head(features), model(x))
    assert model.forward_head(features, pre_logits=True).shape == (2, 1280)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 1280)


def test_backbone_outputs_for_dense_prediction() -> None:
    model = create_model("repvgg_b1g2", out_indices=(1, 2, 3, 4)).eval()
    feats = model(torch.randn(1, 3, 64, 96))
    info = [model.feature_info[i] for i in (1, 2, 3, 4)]
    assert [f.shape[1] for f in feats] == [i["num_chs"] for i in info] == [128, 256, 512, 2048]
    assert [96 // f.shape[-1] for f in feats] == [i["reduction"] for i in info] == [4, 8, 16, 32]


def test_repvggplus_aux_heads_in_training_only() -> None:
    model = create_model("repvggplus_l2pse", num_classes=7, strides=(2, 2, 2, 2, 1))
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    out = model.train()(x)
    assert set(out) == {"main", "stage1_aux", "stage2_aux", "stage3_first_aux"}
    assert all(v.shape == (2, 7) for v in out.values())
    criterion = nn.CrossEntropyLoss()
    expected = criterion(out["main"], target) + 0.1 * sum(criterion(out[k], target) for k in out if k != "main")
    assert torch.allclose(model.loss(out, target, criterion), expected)
    assert isinstance(model.eval()(x), torch.Tensor)
    deploy = reparameterize(model)
    assert not any(isinstance(m, AuxHead) for m in deploy.modules())
    assert isinstance(deploy.train()(x), torch.Tensor)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    model = create_model("repvgg_a0", num_classes=4, strides=(1, 1, 2, 2, 2)).train()
    x = torch.randn(2, 3, 16, 16)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).sum().backward()
        grads.append(model.stage1[0].rbr_dense.conv.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_list_models_filters_like_timm() -> None:
    assert list_models("*b1*") == ["repvgg_b1", "repvgg_b1g2", "repvgg_b1g4"]
    assert list_models("*b1*", pretrained=True) == ["repvgg_b1", "repvgg_b1g4"]  # B1g2: official release file only
    assert list_models(["RepVGG-A*", "*d2se"]) == ["repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_d2se"]
    assert list_models(pretrained=True) == [n for n in list_models() if n not in
                                           ("repvgg_b1g2", "repvgg_b2g2", "repvgg_b3g2", "repvggplus_l2pse")]
    assert list_models("resnet*") == []


@pytest.mark.parametrize("deploy", [False, True])
def test_features_only_returns_every_stage_or_out_indices(deploy: bool) -> None:
    model = create_model("repvgg_a0", features_only=True, deploy=deploy).eval()
    feats = model(torch.randn(1, 3, 64, 96))
    assert [f.shape[1] for f in feats] == model.feature_info.channels() == [48, 48, 96, 192, 1280]
    assert [96 // f.shape[-1] for f in feats] == model.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert model.num_classes == 0 and isinstance(model.get_classifier(), nn.Identity)
    picked = create_model("repvgg_a0", features_only=True, out_indices=(2, 4), deploy=deploy).eval()
    picked.load_state_dict(model.state_dict())
    out = picked(torch.randn(1, 3, 64, 96))
    assert picked.feature_info.channels() == [96, 1280] and [f.shape[1] for f in out] == [96, 1280]
    assert len(picked.feature_info) == 5 and picked.feature_info[3]["num_chs"] == 192  # every stage, as before


def test_features_only_loads_pretrained_weights_into_the_backbone(tmp_path) -> None:
    source = trained_looking(create_model("repvgg_a0", num_classes=5))
    save_checkpoint(source, tmp_path / "a0.pth")
    backbone = create_model("repvgg_a0", pretrained=str(tmp_path / "a0.pth"), features_only=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone(x)[-1], source.forward_features(x))


def test_get_classifier_is_the_linear_head() -> None:
    model = create_model("repvgg_a0", num_classes=7)
    assert model.get_classifier() is model.linear and model.get_classifier().out_features == 7
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3


def test_drop_path_and_dropout_are_refused_not_ignored() -> None:
    with pytest.raises(RepVGGError, match=r"drop_path_rate=0\.1 is not supported: RepVGG has no drop-path"):
        create_model("repvgg_a0", drop_path_rate=0.1)
    with pytest.raises(RepVGGError, match=r"drop_rate=0\.2 is not supported: RepVGG has no dropout"):
        create_model("repvgg_a0", drop_rate=0.2)
    model = create_model("repvgg_a0", num_classes=2, drop_path_rate=0.0, drop_rate=0)  # asking for nothing is fine
    assert model.num_classes == 2
