"""More layouts users carry: files saved by the official training script (a yacs config beside the weights),
state dicts without ``num_batches_tracked``, mmpretrain's RepVGG; and files the weights-only reader refuses."""

from __future__ import annotations

import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import trained_looking
from repvgg import (
    RepVGG,
    RepVGGConfig,
    RepVGGError,
    create_model,
    load_checkpoint,
    model_from_checkpoint,
    read_checkpoint,
    reparameterize,
)
from repvgg.models.architectures import get_config

X = torch.randn(2, 3, 64, 64)


def save_with_fake_yacs(obj_factory, path: Path) -> None:
    """torch.save an object holding yacs ``CfgNode``s, with a stand-in yacs module that is gone afterwards."""

    class CfgNode(dict):
        def __init__(self, init: dict | None = None) -> None:
            super().__init__(init or {})
            self.__dict__["__immutable__"] = False

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module = types.ModuleType("yacs.config")
    module.CfgNode = CfgNode
    saved = {name: sys.modules.get(name) for name in ("yacs", "yacs.config")}
    sys.modules.update({"yacs": types.ModuleType("yacs"), "yacs.config": module})
    try:
        torch.save(obj_factory(CfgNode), path)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def test_official_training_script_file(tmp_path: Path) -> None:
    model = trained_looking(create_model("repvgg_a0", num_classes=5))
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    save_with_fake_yacs(lambda cfg: {
        "model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "lr_scheduler": {"last_epoch": 3}, "max_accuracy": 71.2, "epoch": 3,
        "config": cfg({"MODEL": cfg({"ARCH": "RepVGG-A0", "LABEL_SMOOTHING": 0.1}), "DATA": cfg({"IMG_SIZE": 224}),
                       "TRAIN": cfg({"EPOCHS": 120, "BASE_LR": 0.1, "MILESTONES": (30, 60)})}),
    }, tmp_path / "ckpt_epoch_3.pth")
    assert "yacs.config" not in sys.modules
    loaded, ckpt = model_from_checkpoint(tmp_path / "ckpt_epoch_3.pth")
    assert ckpt.format == "official" and loaded.config.official_name == "RepVGG-A0"
    assert torch.equal(loaded(X), model(X))
    assert "yacs.config" not in sys.modules  # read without yacs: nothing imported, no code from the file run


def test_state_dict_without_num_batches_tracked() -> None:
    model = trained_looking(create_model("repvgg_a0", num_classes=3))
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    fresh = create_model("repvgg_a0", num_classes=3).eval()
    load_checkpoint(fresh, old)
    assert torch.equal(fresh(X), model(X))
    with pytest.raises(RepVGGError, match=r"missing keys: stage1\.0\.rbr_dense\.bn\.running_mean"):
        load_checkpoint(fresh, {k: v for k, v in old.items() if k != "stage1.0.rbr_dense.bn.running_mean"})


class MMConvModule(nn.Module):
    """mmcv's ConvModule without norm: ``conv`` (with bias) then ``activate``."""

    def __init__(self, cin: int, cout: int, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.activate = nn.Conv2d(cin, cout, 1), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.conv(x))


class MMSELayer(nn.Module):
    """mmpretrain's SELayer: pool, conv1 (ReLU), conv2 (Sigmoid), scale."""

    def __init__(self, channels: int, ratio: int = 16) -> None:
        super().__init__()
        self.conv1 = MMConvModule(channels, channels // ratio, nn.ReLU())
        self.conv2 = MMConvModule(channels // ratio, channels, nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv2(self.conv1(x.mean((2, 3), keepdim=True)))


class MMRepVGGBlock(nn.Module):
    """mmpretrain's RepVGGBlock, training form: act(se(branch_3x3 + branch_1x1 + branch_norm))."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, se: bool) -> None:
        super().__init__()

        def conv_norm(k: int) -> nn.Sequential:
            branch = nn.Sequential()
            branch.add_module("conv", nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False))
            branch.add_module("norm", nn.BatchNorm2d(cout))
            return branch

        self.branch_norm = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.branch_3x3, self.branch_1x1 = conv_norm(3), conv_norm(1)
        self.se_layer = MMSELayer(cout) if se else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch_3x3(x) + self.branch_1x1(x) + (self.branch_norm(x) if self.branch_norm else 0)
        return self.act(self.se_layer(out) if self.se_layer else out)


class MMClassifier(nn.Module):
    """mmpretrain's ImageClassifier around a RepVGG backbone (stem, stage_1..stage_4), GAP neck, LinearClsHead."""

    def __init__(self, config: RepVGGConfig, num_classes: int) -> None:
        super().__init__()
        self.backbone = nn.Module()
        shapes = config.block_shapes()
        block = dict(se=config.se is not None)
        self.backbone.stem = MMRepVGGBlock(*shapes[0][1:], **block)
        for i in range(1, 5):
            self.backbone.add_module(f"stage_{i}", nn.Sequential(*(MMRepVGGBlock(*s[1:], **block)
                                                                  for s in shapes if s.stage == i)))
        self.head = nn.Module()
        self.head.fc = nn.Linear(shapes[-1].out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone.stem(x)
        for i in range(1, 5):
            x = getattr(self.backbone, f"stage_{i}")(x)
        return self.head.fc(x.mean((2, 3)))


def test_mmpretrain_layout_gives_the_same_outputs(tmp_path: Path) -> None:
    mm = trained_looking(MMClassifier(get_config("repvgg_a0"), num_classes=7))
    keys = list(mm.state_dict())
    assert "backbone.stem.branch_3x3.conv.weight" in keys and "backbone.stage_1.1.branch_norm.running_var" in keys
    assert "backbone.stage_4.0.branch_1x1.norm.weight" in keys and "head.fc.weight" in keys
    torch.save({"meta": {"epoch": 100, "dataset_meta": {"classes": ["a"] * 7}}, "state_dict": mm.state_dict()},
               tmp_path / "mm.pth")
    model, ckpt = model_from_checkpoint(tmp_path / "mm.pth")
    assert ckpt.format == "mmpretrain" and model.config.official_name == "RepVGG-A0" and not ckpt.deploy
    with torch.no_grad():
        assert torch.equal(model(X), mm(X))


def test_mmpretrain_layout_with_se_groups_and_deploy_form() -> None:
    config = RepVGGConfig("tiny", depths=(2, 2, 2, 1), widths=(0.5, 0.5, 0.5, 0.5), groups=2, se="pre",
                          se_reduction=16)
    mm = trained_looking(MMClassifier(config, num_classes=5))
    assert "backbone.stage_2.0.se_layer.conv2.conv.bias" in mm.state_dict()
    ours = RepVGG(config, num_classes=5)
    assert load_checkpoint(ours, mm.state_dict()).format == "mmpretrain"
    with torch.no_grad():
        assert torch.equal(ours.eval()(X), mm(X))
        deploy = RepVGG(config, num_classes=5, deploy=True)
        mm_deploy = {}  # mmpretrain's deploy keys: its switch_to_deploy names the fused conv branch_reparam
        for key, value in reparameterize(ours).state_dict().items():
            key = key.replace("rbr_reparam.", "branch_reparam.").replace("se.down.", "se_layer.conv1.conv.")
            key = key.replace("se.up.", "se_layer.conv2.conv.").replace("linear.", "head.fc.")
            key = key.replace("stage0.", "backbone.stem.")
            mm_deploy[key if key.startswith(("backbone.", "head.")) else "backbone.stage_" + key[5:]] = value
        assert "backbone.stage_1.0.branch_reparam.weight" in mm_deploy
        ckpt = load_checkpoint(deploy, mm_deploy)
        assert ckpt.deploy and torch.allclose(deploy.eval()(X), mm(X), rtol=0, atol=1e-5 * mm(X).abs().max().item())


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_refusals_are_explained_in_our_words(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(RepVGGError, match=r"refusing to read .*evil\.pth: it holds a pickled Python object "
                                          r"\(print\).*can run arbitrary code") as info:
        read_checkpoint(tmp_path / "evil.pth")
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)
    with open(tmp_path / "raw.pth", "wb") as f:
        pickle.dump({"state_dict": Evil()}, f, protocol=4)
    with pytest.raises(RepVGGError, match=r"pickle protocol 4 or later"):
        read_checkpoint(tmp_path / "raw.pth")


def test_protocol_4_file_gives_one_line_and_no_warnings(tmp_path: Path) -> None:
    torch.save(create_model("repvgg_a0", num_classes=2).state_dict(), tmp_path / "p4.pth", pickle_protocol=4)
    result = subprocess.run([sys.executable, "-m", "repvgg.cli", "info", str(tmp_path / "p4.pth")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "UserWarning" not in result.stderr and "weights_only" not in result.stderr
    assert "save it again with torch.save's default protocol" in result.stderr
