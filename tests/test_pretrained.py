"""Published weights through the Hugging Face Hub client, offline: a cache laid out as the hub lays it out, the real
download code path reading it, files by path, and one-line errors when neither cache nor network has the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import trained_looking
from repvgg import RepVGGConfig, RepVGGError, create_model, save_checkpoint
from repvgg.models.architectures import MODEL_CONFIGS
from repvgg.models.pretrained import (
    PUBLISHED,
    imagenet_class_names,
    load_pretrained,
    pretrained_source,
    read_pretrained,
)

timm = pytest.importorskip("timm")
COMMIT = "0123456789abcdef0123456789abcdef01234567"
X = torch.randn(2, 3, 64, 64)


def add_to_hub_cache(cache: Path, repo_id: str, filename: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Lay a file out as ``huggingface_hub`` caches it: refs/main names a snapshot holding the file."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True, exist_ok=True)
    path = repo / "snapshots" / COMMIT / filename
    if filename.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    else:
        torch.save(state_dict, path)


@pytest.fixture(scope="module")
def timm_a0() -> torch.nn.Module:
    """timm's RepVGG-A0 with trained-looking BatchNorms: what its Hub repository holds, in its own key layout."""
    torch.manual_seed(0)
    return trained_looking(timm.create_model("repvgg_a0", pretrained=False))


@pytest.fixture
def hub_cache(tmp_path: Path, timm_a0: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hub client (no network is ever tried) whose cache holds timm/repvgg_a0.rvgg_in1k."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "timm/repvgg_a0.rvgg_in1k", "model.safetensors", timm_a0.state_dict())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_every_model_has_published_data() -> None:
    assert set(PUBLISHED) == set(MODEL_CONFIGS)
    hub = {name: p.hub_id for name, p in PUBLISHED.items() if p.hub_id}
    assert len(hub) == 11 and hub["repvgg_d2se"] == "timm/repvgg_d2se.rvgg_in1k"
    assert all(hub_id == f"timm/{name}.rvgg_in1k" for name, hub_id in hub.items())
    assert pretrained_source("RepVGG-B1g2") is None and PUBLISHED["repvgg_a0"].top1 == 72.41


def test_published_weights_load_from_the_hub_cache(hub_cache: Path, timm_a0: torch.nn.Module) -> None:
    model = create_model("repvgg_a0", pretrained=True).eval()
    with torch.no_grad():
        reference = timm_a0(X)
        assert torch.allclose(model(X), reference, rtol=0, atol=1e-5 * reference.abs().max().item())
        deploy = create_model("RepVGG-A0", deploy=True, pretrained="timm/repvgg_a0.rvgg_in1k")
        assert deploy.deploy and torch.allclose(deploy(X), reference, rtol=0, atol=1e-4 * reference.abs().max().item())
    ckpt = read_pretrained("repvgg_a0")
    assert ckpt.format == "timm" and ckpt.metadata["architecture"] == "repvgg_a0"


def test_fine_tuning_keeps_a_new_classifier(hub_cache: Path, timm_a0: torch.nn.Module) -> None:
    model = create_model("repvgg_a0", num_classes=10, strides=(1, 1, 2, 2, 2), pretrained=True)
    assert model.linear.out_features == 10 and model.stage1[0].rbr_identity is not None  # stride 1: a new branch
    assert torch.equal(model.stage4[0].rbr_dense.conv.weight, timm_a0.stages[3][0].conv_kxk.conv.weight)
    other = create_model("repvgg_a0", num_classes=10)
    loaded = load_pretrained(other, True)
    assert not loaded.classifier_loaded and loaded.checkpoint.format == "timm" and not loaded.new_identity_branches
    cifar = load_pretrained(create_model("repvgg_a0", num_classes=10, strides=(1, 1, 2, 2, 2)), "repvgg_a0")
    assert cifar.new_identity_branches == ["stage1.0"]
    assert load_pretrained(create_model("repvgg_a0"), "repvgg_a0").classifier_loaded


def test_older_bin_file_and_local_paths(hub_cache: Path, tmp_path: Path) -> None:
    b0 = trained_looking(timm.create_model("repvgg_b0", pretrained=False, num_classes=3))
    add_to_hub_cache(hub_cache, "timm/repvgg_b0.rvgg_in1k", "pytorch_model.bin", b0.state_dict())
    model = create_model("repvgg_b0", num_classes=3, pretrained=True).eval()
    with torch.no_grad():
        assert torch.allclose(model(X), b0(X), rtol=0, atol=1e-5 * b0(X).abs().max().item())
    ours = trained_looking(create_model("repvgg_a0", num_classes=4))
    save_checkpoint(ours, tmp_path / "mine.safetensors")
    loaded = create_model("repvgg_a0", num_classes=4, pretrained=str(tmp_path / "mine.safetensors")).eval()
    assert torch.equal(loaded(X), ours(X))
    own = RepVGGConfig("RepVGG-narrow", (1, 1, 2, 1), (0.25, 0.25, 0.25, 0.5))  # an architecture of one's own
    save_checkpoint(trained_looking(create_model(own, num_classes=4)), tmp_path / "narrow.pth")
    assert create_model(own, num_classes=4, pretrained=str(tmp_path / "narrow.pth")).config == own
    with pytest.raises(RepVGGError, match="registered architecture, and this model is not one: pass a checkpoint"):
        create_model(own, pretrained=True)


@pytest.mark.parametrize(("name", "spec", "message"), [
    ("repvgg_a1", True, r"timm/repvgg_a1.rvgg_in1k are not in the Hugging Face cache .*HF_HUB_OFFLINE is set"
                        r".*https://huggingface.co/timm/repvgg_a1.rvgg_in1k/resolve/main/model.safetensors"),
    ("repvgg_b1g2", True, r"RepVGG-B1g2 weights are not on the Hugging Face Hub; download RepVGG-B1g2-train.pth"),
    ("repvggplus_l2pse", True, r"RepVGGplus-L2pse weights are not on the Hugging Face Hub"),
    ("repvgg_a0", "weights/a0.pth", r"pretrained weights not found: weights/a0.pth"),
    ("repvgg_a0", "someone/missing-repo", r"someone/missing-repo are not in the Hugging Face cache"),
])
def test_missing_weights_are_one_clear_line(hub_cache: Path, name: str, spec: bool | str, message: str) -> None:
    with pytest.raises(RepVGGError, match=message) as info:
        create_model(name, pretrained=spec)
    assert "\n" not in str(info.value)


def test_published_weights_carry_the_imagenet_class_names(hub_cache: Path, tmp_path: Path) -> None:
    """Published classifiers name their 1000 classes (in checkpoints read, and in what export writes)."""
    names = read_pretrained("repvgg_a0").metadata["class_names"]
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish" and names[-1] == "toilet tissue"
    pytest.importorskip("onnxruntime")
    from repvgg.cli import main
    from repvgg.deploy.artifacts import read_artifact_metadata

    out = tmp_path / "a0.onnx"
    assert main(["export", "--pretrained", "repvgg_a0", "--format", "onnx", "--out", str(out)]) == 0
    assert read_artifact_metadata(out, "onnx")["class_names"] == names


def test_cli_uses_the_standard_cache_and_offline_mode(tmp_path: Path, timm_a0: torch.nn.Module) -> None:
    """A fresh process configured only by the hub's own environment variables."""
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "timm/repvgg_a0.rvgg_in1k", "model.safetensors", timm_a0.state_dict())
    image = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    ok = subprocess.run([sys.executable, "-m", "repvgg.cli", "predict", "--pretrained", "repvgg_a0", str(image),
                         "--engine", "torch", "--top", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0] == "engine: torch" and "class " not in ok.stdout
    shown = [line.split("%", 1)[1].strip() for line in ok.stdout.splitlines()[2:]]
    assert len(shown) == 2 and set(shown) <= set(imagenet_class_names())


def test_cli_names_weights_missing_from_the_cache_in_one_line(hub_cache: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    from repvgg.cli import main

    image = tmp_path / "cat.png"
    Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(image)
    assert main(["predict", "--pretrained", "repvgg_a2", str(image), "--engine", "torch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "timm/repvgg_a2.rvgg_in1k are not in the Hugging Face cache" in err
    assert "HF_HUB_OFFLINE is set" in err
