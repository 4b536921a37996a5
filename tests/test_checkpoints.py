"""Reading and writing checkpoints: this library's files, the official release layout and timm's layout."""

from __future__ import annotations

import dataclasses
import pickle
import re

import pytest
import torch

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
    save_checkpoint,
)
from repvgg.models.architectures import registered_name
from repvgg.models.checkpoints import describe_checkpoint, infer_config
from repvgg.models.convert import convert_checkpoint
from repvgg.models.pretrained import load_pretrained
from repvgg.models.reparam import relative_difference

X = torch.randn(2, 3, 64, 64)


def to_official_plus(state_dict: dict[str, torch.Tensor], n_first: int) -> dict[str, torch.Tensor]:
    """This library's RepVGGplus keys -> the official repvggplus.py layout (blocks infix, stage3 split, aux)."""
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"stage3\.(\d+)\.(.*)", key)
        if m:
            i = int(m.group(1))
            key = f"stage3_first.blocks.{i}.{m.group(2)}" if i < n_first else \
                f"stage3_second.blocks.{i - n_first}.{m.group(2)}"
        key = re.sub(r"^(stage[124])\.(\d+)\.", r"\1.blocks.\2.", key)
        key = re.sub(r"^aux\.(\w+?)\.fc\.", r"\1_aux.3.", key)
        key = re.sub(r"^aux\.(\w+?)\.(conv|bn)\.", r"\1_aux.0.\2.", key)
        out[key] = value
    return out


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("deploy", [False, True])
def test_own_format_round_trip(tmp_path, suffix: str, deploy: bool) -> None:
    model = trained_looking(create_model("repvgg_a0", num_classes=5, strides=(1, 2, 2, 2, 2)))
    if deploy:
        model = reparameterize(model)
    path = tmp_path / f"m{suffix}"
    save_checkpoint(model, path, class_names=list("abcde"))
    loaded, ckpt = model_from_checkpoint(path)
    assert ckpt.format == "repvgg" and ckpt.deploy == deploy and ckpt.metadata["class_names"] == list("abcde")
    assert ckpt.metadata["strides"] == [1, 2, 2, 2, 2] and ckpt.metadata["library_version"]
    assert torch.equal(model(X), loaded(X))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict"])
def test_official_repvgg_layout(tmp_path, wrap: str) -> None:
    model = trained_looking(create_model("repvgg_b1g4", num_classes=10))
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}  # saved from DataParallel
    torch.save(sd if wrap == "bare" else {wrap: sd, "epoch": 3}, tmp_path / "official.pth")
    loaded, ckpt = model_from_checkpoint(tmp_path / "official.pth")
    assert ckpt.format == "official" and loaded.config.official_name == "RepVGG-B1g4"
    assert torch.equal(model(X), loaded(X))
    deploy = reparameterize(model)
    torch.save(deploy.state_dict(), tmp_path / "official_deploy.pth")
    loaded, ckpt = model_from_checkpoint(tmp_path / "official_deploy.pth")
    assert ckpt.deploy and relative_difference(deploy(X), loaded(X)) == 0


def test_official_repvggplus_layout() -> None:
    model = trained_looking(create_model("repvggplus_l2pse", num_classes=6))
    official = to_official_plus(model.state_dict(), n_first=12)
    assert "stage3_second.blocks.11.post_se.up.weight" in official and "stage1_aux.3.weight" in official
    assert "stage2_aux.0.bn.running_var" in official
    loaded, _ = model_from_checkpoint(official)
    assert torch.equal(model(X), loaded(X))
    loaded.train()
    model.train()
    torch.manual_seed(1)
    a = loaded(X)
    torch.manual_seed(1)
    b = model(X)
    assert all(torch.allclose(a[k], b[k]) for k in b)  # auxiliary heads were loaded too


def timm_round_trip(reference: torch.nn.Module, load) -> None:
    """Load timm's training-time and re-parameterized weights via ``load``; both must reproduce timm's outputs."""
    from timm.utils.model import reparameterize_model

    trained_looking(reference)
    with torch.no_grad():
        loaded = load(reference.state_dict())
        assert relative_difference(reference(X), loaded(X)) < 1e-6
        timm_deploy = reparameterize_model(reference)
        deploy_sd = timm_deploy.state_dict()
        assert any(k.endswith("reparam_conv.weight") for k in deploy_sd)
        assert relative_difference(timm_deploy(X), load(deploy_sd)(X)) < 1e-6


def test_timm_layout_of_a_registered_model(tmp_path) -> None:
    timm = pytest.importorskip("timm")

    def load(sd):
        torch.save({"state_dict": sd}, tmp_path / "timm.pth")
        model, ckpt = model_from_checkpoint(tmp_path / "timm.pth")
        assert ckpt.format == "timm" and model.config.official_name == "RepVGG-A0"
        return model

    timm_round_trip(timm.create_model("repvgg_a0", pretrained=False, num_classes=10), load)


def test_timm_layout_with_se_and_groups() -> None:
    """timm's D2se-style SE (ratio 1/16) and grouped layers, on a small config both libraries can build."""
    pytest.importorskip("timm")
    from timm.models.byobnet import ByobNet, ByoModelCfg, _rep_vgg_bcfg

    widths = (0.5, 0.5, 0.5, 0.5)
    timm_cfg = ByoModelCfg(blocks=_rep_vgg_bcfg(d=(2, 2, 2, 1), wf=widths, groups=2), stem_type="rep", stem_chs=32,
                           attn_layer="se", attn_kwargs=dict(rd_ratio=1 / 16, rd_divisor=1))
    ours = RepVGGConfig("tiny", depths=(2, 2, 2, 1), widths=widths, groups=2, se="pre", se_reduction=16)

    def load(sd):
        deploy = any("reparam_conv" in k for k in sd)
        model = RepVGG(ours, num_classes=5, deploy=deploy)
        assert load_checkpoint(model, sd).format == "timm"
        return model.eval()

    timm_round_trip(ByobNet(timm_cfg, num_classes=5), load)


def test_strict_loading_names_the_problem(tmp_path) -> None:
    a0 = create_model("repvgg_a0")
    save_checkpoint(create_model("repvgg_a1"), tmp_path / "a1.pth")
    with pytest.raises(RepVGGError, match=r"shape mismatches .*stage0\.rbr_dense\.conv\.weight"):
        load_checkpoint(a0, tmp_path / "a1.pth")
    partial = {k: v for k, v in a0.state_dict().items() if not k.startswith("stage4")}
    with pytest.raises(RepVGGError, match=r"missing keys: stage4\.0\.rbr_dense"):
        load_checkpoint(a0, partial)
    load_checkpoint(a0, partial, strict=False)
    with pytest.raises(RepVGGError, match="deploy model but the model is training-time"):
        load_checkpoint(a0, reparameterize(a0).state_dict())


def test_drop_classifier_for_fine_tuning() -> None:
    source = create_model("repvgg_a0", num_classes=1000)
    target = create_model("repvgg_a0", num_classes=10)
    head = target.linear.weight.clone()
    with pytest.raises(RepVGGError, match=r"linear\.weight"):
        load_checkpoint(target, source.state_dict())
    load_checkpoint(target, source.state_dict(), drop_classifier=True)
    assert torch.equal(target.linear.weight, head)
    assert torch.equal(target.stage4[0].rbr_dense.conv.weight, source.stage4[0].rbr_dense.conv.weight)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_bad_files_fail_cleanly(tmp_path) -> None:
    with pytest.raises(RepVGGError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(RepVGGError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path / "corrupt.pth")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(RepVGGError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path / "corrupt.safetensors")
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(RepVGGError, match="refusing to read"):
        read_checkpoint(tmp_path / "evil.pth")  # weights_only refuses arbitrary objects
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(RepVGGError, match="unrecognised checkpoint layout"):
        read_checkpoint(tmp_path / "other.pth")


def test_architecture_is_inferred_from_shapes() -> None:
    for name in ("repvgg_a0", "repvgg_b2g4", "repvgg_d2se"):
        with torch.device("meta"):
            sd = create_model(name).state_dict()
        assert registered_name(infer_config(sd)) == name
        with torch.device("meta"):
            assert registered_name(infer_config(reparameterize(create_model(name)).state_dict())) == name


# architectures of one's own: layer 2 (the first grouped one) in stage2 when stage1 has one block; SE before and
# after the ReLU; RepVGGplus's auxiliary heads
OWN = [RepVGGConfig("tiny-g2", (1, 2, 1, 1), (0.25, 0.25, 0.25, 0.125), groups=2),
       RepVGGConfig("tiny-se", (3, 2, 1, 1), (0.5, 0.25, 1, 0.125), se="pre", se_reduction=8),
       RepVGGConfig("tiny-plus", (2, 2, 4, 1), (0.25, 0.25, 0.25, 0.25), se="post", se_reduction=4, aux_heads=True)]


@pytest.mark.parametrize("config", OWN, ids=lambda c: c.official_name)
def test_an_architecture_of_ones_own_is_saved_with_its_config_and_read_back_exactly(config, tmp_path) -> None:
    """Every file describes its architecture: one that is not registered travels as its whole config, in either
    kind of file, and rebuilds the same network; without metadata, its shapes reveal it."""
    model = trained_looking(RepVGG(config, num_classes=5)).eval()
    x = torch.randn(2, 3, 32, 32)
    for name in ("m.pth", "m.safetensors"):
        save_checkpoint(model, tmp_path / name)
        loaded, ckpt = model_from_checkpoint(tmp_path / name)
        assert loaded.config == config and ckpt.metadata["config"] == config.as_dict()
        assert torch.equal(loaded(x), model(x))
    assert describe_checkpoint(tmp_path / "m.pth")["architecture"].startswith(f"{config.official_name} (its own: ")
    assert infer_config(model.state_dict()) == dataclasses.replace(config, official_name="custom")
    assert infer_config(reparameterize(model).state_dict()).depths == config.depths
    with pytest.raises(RepVGGError, match=rf"m\.pth: checkpoint holds its own architecture '{config.official_name}', "
                                          "not repvgg_a0"):
        model_from_checkpoint(tmp_path / "m.pth", "repvgg_a0")


def test_registered_models_are_named_and_configs_checked_when_read() -> None:
    """A registered architecture (its groups overridable) is saved by name; a config read from a file is checked
    as a new one is, naming what is missing, unknown or wrong."""
    assert registered_name(create_model("repvgg_a0", groups=2).config) == "repvgg_a0"
    assert registered_name(RepVGGConfig("RepVGG-A0", (2, 4, 14, 1), (1, 1, 1, 2.5))) is None  # A1's widths
    with torch.device("meta"):
        inferred = infer_config(create_model("repvgg_a0", groups=2).state_dict())
    assert registered_name(inferred) == "repvgg_a0" and inferred.groups == 2
    with_se = RepVGG(OWN[1]).state_dict()
    with pytest.raises(RepVGGError, match=r"no RepVGG architecture has depths \(3, 2, 1, 1\)"):  # SE but not on stage0
        infer_config({k: v for k, v in with_se.items() if not k.startswith("stage0.se.")})
    with pytest.raises(RepVGGError, match=r"architecture config: missing depths; unknown width$"):
        RepVGGConfig.from_dict({"official_name": "x", "widths": [1, 1, 1, 1], "width": 2})
    with pytest.raises(RepVGGError, match=r"x: depths must be four block counts of at least 1, got \(1, 0, 1, 1\)"):
        RepVGGConfig.from_dict({"official_name": "x", "depths": [1, 0, 1, 1], "widths": [1, 1, 1, 1]})
    with pytest.raises(RepVGGError, match="official_name must be a string, got 3"):
        RepVGGConfig.from_dict({"official_name": 3, "depths": [1, 1, 1, 1], "widths": [1, 1, 1, 1]})
    with pytest.raises(RepVGGError, match="must be a mapping"):
        RepVGGConfig.from_dict([1, 2])


def test_pretrained_weights_must_be_finite(tmp_path) -> None:
    """A diverged run's weights are refused when loaded as pretrained weights, naming the file and a tensor."""
    state_dict = create_model("repvgg_a0", num_classes=3).state_dict()
    state_dict["stage4.0.rbr_dense.conv.weight"].view(-1)[7] = float("nan")
    torch.save(state_dict, tmp_path / "nan.pth")
    message = r"nan\.pth: weights are not finite \(NaN or inf\) in stage4\.0\.rbr_dense\.conv\.weight$"
    with pytest.raises(RepVGGError, match=message):
        create_model("repvgg_a0", num_classes=3, pretrained=str(tmp_path / "nan.pth"))
    with pytest.raises(RepVGGError, match=message):  # fine-tuning, for other classes, too
        load_pretrained(create_model("repvgg_a0", num_classes=10), str(tmp_path / "nan.pth"))


@pytest.mark.parametrize("spec", ["", "  "])
def test_empty_pretrained_spec_is_refused(spec: str) -> None:
    with pytest.raises(RepVGGError, match=r"pretrained must be True, a model name, a Hub id or a file path, got"):
        create_model("repvgg_a0", pretrained=spec)
    assert not create_model("repvgg_a0", pretrained=None).deploy  # None, like False: random weights


@pytest.mark.parametrize(("metadata", "message"), [
    (dict(architecture="repvgg_a1"),
     r"^checkpoint metadata architecture='repvgg_a1' contradicts the model saved, whose architecture is 'repvgg_a0'"),
    (dict(num_classes=5), r"num_classes=5 contradicts the model saved, whose num_classes is 3"),
    (dict(strides=[1, 1, 2, 2, 2]), r"strides=\[1, 1, 2, 2, 2\] contradicts the model saved"),
    (dict(class_names=["a", "b"]), r"lists 2 class names for a model with 3 classes"),
    (dict(class_names="abc"), r"class_names must be a list of strings, got 'abc'"),
    (dict(preprocess={"resize": 40, "crop": 0}), r"^checkpoint metadata preprocess 'crop' must be a positive integer"),
    (dict(preprocess="224"), r"preprocess metadata must be a mapping"),
])
def test_inconsistent_metadata_is_never_written(tmp_path, metadata: dict, message: str) -> None:
    model = create_model("repvgg_a0", num_classes=3)
    with pytest.raises(RepVGGError, match=message):
        save_checkpoint(model, tmp_path / "m.pth", **metadata)
    assert not list(tmp_path.iterdir())


def test_metadata_that_agrees_with_the_model_is_written(tmp_path) -> None:
    model = create_model("repvgg_a0", num_classes=3)
    save_checkpoint(model, tmp_path / "m.pth", architecture="RepVGG-A0", num_classes=3, strides=(2, 2, 2, 2, 2),
                    class_names=("a", "b", "c"), preprocess={"resize": 40, "crop": 32})
    meta = read_checkpoint(tmp_path / "m.pth").metadata
    assert (meta["architecture"], meta["strides"]) == ("repvgg_a0", [2, 2, 2, 2, 2])
    assert meta["class_names"] == ["a", "b", "c"]  # a list, as the safetensors header would hold it


def test_convert_never_writes_inconsistent_metadata(tmp_path) -> None:
    """A file from elsewhere whose class names do not match its classifier is not carried into a deploy file."""
    save_checkpoint(create_model("repvgg_a0", num_classes=3), tmp_path / "good.pth")
    saved = torch.load(tmp_path / "good.pth", weights_only=True)
    saved["repvgg"]["class_names"] = ["a", "b"]
    torch.save(saved, tmp_path / "old.pth")
    with pytest.raises(RepVGGError, match="lists 2 class names for a model with 3 classes"):
        convert_checkpoint(tmp_path / "old.pth", tmp_path / "deploy.pth", img_size=16)
    assert not (tmp_path / "deploy.pth").exists()


def test_a_checkpoint_without_classifier_needs_headless(tmp_path) -> None:
    """The API asks for headless=True as the CLI asks for --headless; half a classifier is named as such."""
    model = trained_looking(create_model("repvgg_a0", num_classes=3))
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("linear.")}, tmp_path / "bb.pth")
    save_checkpoint(create_model("repvgg_a0", num_classes=0), tmp_path / "ours.pth")
    for name in ("bb.pth", "ours.pth"):
        with pytest.raises(RepVGGError, match=rf"{name} has no classifier \(no linear\.\* weights\); pass --headless "
                                              r"\(headless=True\) to use it as a backbone"):
            model_from_checkpoint(tmp_path / name)
    backbone, _ = model_from_checkpoint(tmp_path / "bb.pth", headless=True)
    assert backbone.num_classes == 0
    backbone.linear = model.linear
    assert torch.equal(backbone(X), model(X))  # every weight but the classifier's was loaded
    torch.save({k: v for k, v in model.state_dict().items() if k != "linear.weight"}, tmp_path / "half.pth")
    with pytest.raises(RepVGGError, match=r"half\.pth has a partial classifier: linear\.bias without linear\.weight"):
        model_from_checkpoint(tmp_path / "half.pth", headless=True)


def test_checkpoint_repr_is_a_summary(tmp_path) -> None:
    """`repvgg.load_checkpoint(model, path)` in a notebook shows one line, not every tensor."""
    from repvgg import load_checkpoint

    model = create_model("repvgg_a0", num_classes=3)
    save_checkpoint(model, tmp_path / "a0.pth")
    text = repr(load_checkpoint(create_model("repvgg_a0", num_classes=3), tmp_path / "a0.pth"))
    assert "\n" not in text and len(text) < 200 and "repvgg_a0" in text and "training-time form" in text
