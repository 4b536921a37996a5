"""More layouts users carry: files saved by the official training script (a yacs config beside the weights),
state dicts without ``num_batches_tracked``, mmpretrain's RepVGG; and files the weights-only reader refuses."""

from __future__ import annotations

import argparse
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
from repvgg.models.checkpoints import describe_checkpoint
from repvgg.models.reparam import relative_difference

# mmpretrain's 1x1 branch convolves with its stride, ours subsamples first: the same sums, done by other kernels, so
# outputs agree to rounding (bitwise only for some thread counts)
MM_TOLERANCE = 1e-6

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
        self.backbone.stem = MMRepVGGBlock(*shapes[0][1:5], **block)
        for i in range(1, 5):
            self.backbone.add_module(f"stage_{i}", nn.Sequential(*(MMRepVGGBlock(*s[1:5], **block)
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
        assert relative_difference(mm(X), model(X)) < MM_TOLERANCE


def test_mmpretrain_layout_with_se_groups_and_deploy_form() -> None:
    config = RepVGGConfig("tiny", depths=(2, 2, 2, 1), widths=(0.5, 0.5, 0.5, 0.5), groups=2, se="pre",
                          se_reduction=16)
    mm = trained_looking(MMClassifier(config, num_classes=5))
    assert "backbone.stage_2.0.se_layer.conv2.conv.bias" in mm.state_dict()
    ours = RepVGG(config, num_classes=5)
    assert load_checkpoint(ours, mm.state_dict()).format == "mmpretrain"
    with torch.no_grad():
        assert relative_difference(mm(X), ours.eval()(X)) < MM_TOLERANCE
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


def halved(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every floating-point tensor halved: a stand-in for its EMA copy."""
    return {k: v / 2 if v.is_floating_point() else v for k, v in model.state_dict().items()}


def test_timm_training_script_file(tmp_path: Path) -> None:
    """timm's train.py saves its argparse ``args`` beside the weights and, with EMA, ``state_dict_ema``: read without
    unpickling the Namespace's class, the plain weights taken (the EMA copy named as not read)."""
    model = trained_looking(create_model("repvgg_a0", num_classes=4))
    args = argparse.Namespace(model="repvgg_a0", lr=0.05, epochs=3, model_ema=True, input_size=None, aa=["rand"])
    torch.save({"epoch": 2, "arch": "repvgg_a0", "state_dict": model.state_dict(),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.05, "params": [0, 1]}]}, "version": 2,
                "args": args, "amp_scaler": {"scale": 65536.0}, "state_dict_ema": halved(model), "metric": 61.5},
               tmp_path / "last.pth.tar")
    loaded, ckpt = model_from_checkpoint(tmp_path / "last.pth.tar")
    assert (ckpt.format, ckpt.entry, ckpt.unread) == ("official", "state_dict", ("state_dict_ema",))
    assert torch.equal(loaded(X), model(X))
    assert describe_checkpoint(tmp_path / "last.pth.tar")["weights"] == "'state_dict' ('state_dict_ema' not read)"


@pytest.mark.parametrize("entry", ["ema", "net", "state_dict_ema", "model_ema"])
def test_weights_under_other_common_entries(tmp_path: Path, entry: str) -> None:
    model = trained_looking(create_model("repvgg_a0", num_classes=3))
    torch.save({entry: model.state_dict(), "epoch": 7}, tmp_path / "w.pth")
    loaded, ckpt = model_from_checkpoint(tmp_path / "w.pth")
    assert ckpt.entry == entry and torch.equal(loaded(X), model(X))


def test_no_tensors_names_the_entries_found(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "weights": [torch.zeros(1)], "config": {"lr": 0.1}}, tmp_path / "odd.pth")
    with pytest.raises(RepVGGError, match=r"no tensors found in the checkpoint \(its entries: epoch, weights, config"):
        read_checkpoint(tmp_path / "odd.pth")


@pytest.mark.parametrize("prefix", ["module.module.", "_orig_mod.module.", "module._orig_mod.",
                                    "_orig_mod._orig_mod.module."])
def test_repeated_wrapper_prefixes_are_stripped(prefix: str) -> None:
    model = trained_looking(create_model("repvgg_a0", num_classes=3))
    loaded, ckpt = model_from_checkpoint({"model": {prefix + k: v for k, v in model.state_dict().items()}})
    assert ckpt.format == "official" and torch.equal(loaded(X), model(X))


def tiny_onnx(path: Path) -> None:
    """A one-node ONNX model (Relu), written by the onnx package."""
    onnx = pytest.importorskip("onnx")
    x, y = (onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1]) for name in "xy")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, producer_name="test"), path)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")
def test_files_that_are_not_checkpoints_are_named(tmp_path: Path) -> None:
    """Exported models and other files given where a checkpoint is expected: one line saying what they are."""
    tiny_onnx(tmp_path / "m.onnx")
    tiny_onnx(tmp_path / "renamed.pth")
    (tmp_path / "ir.xml").write_text('<?xml version="1.0"?>\n<net name="repvgg" version="11">\n<layers/>\n</net>\n')
    (tmp_path / "ir.bin").write_bytes(bytes(range(7, 200)))
    (tmp_path / "noise.pth").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.jit.trace(nn.Linear(2, 2), torch.zeros(1, 2)).save(tmp_path / "script.pt")
    use = "not a checkpoint: use eval or predict with"
    for name, message in (("m.onnx", f"is an ONNX model, {use} it"), ("renamed.pth", f"is an ONNX model, {use} it"),
                          ("ir.xml", f"is an OpenVINO model \\(IR\\), {use} it"),
                          ("ir.bin", f"is the weights file of the OpenVINO model .*ir\\.xml, {use} .*ir\\.xml$"),
                          ("noise.pth", r"is not a checkpoint \(neither a torch zip archive, a pickle nor safetensors"),
                          ("empty.pth", "is empty, not a checkpoint"),
                          ("script.pt", f"is a TorchScript model, {use} it")):
        with pytest.raises(RepVGGError, match=rf"^\S*{name} {message}") as info:
            read_checkpoint(tmp_path / name)
        assert "pickle opcode" not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("in_chans", "3", r"in_chans must be an integer of at least 1, got '3'"),
    ("in_chans", [3], r"in_chans must be an integer of at least 1, got \[3\]"),
    ("in_chans", 0, r"in_chans must be an integer of at least 1, got 0"),
    ("num_classes", "3", r"num_classes must be an integer of at least 0, got '3'"),
    ("groups", "x", r"groups must be an integer of at least 1, got 'x'"),
    ("architecture", 5, r"metadata architecture must be a model name, got 5"),
])
def test_malformed_model_metadata_is_named(tmp_path: Path, key: str, value: object, message: str) -> None:
    model = create_model("repvgg_a0", num_classes=3)
    meta = {"architecture": "repvgg_a0", "num_classes": 3, key: value}
    torch.save({"repvgg": meta, "state_dict": model.state_dict()}, tmp_path / "bad.pth")
    with pytest.raises(RepVGGError, match=rf"bad\.pth: {message}$"):
        model_from_checkpoint(tmp_path / "bad.pth")
