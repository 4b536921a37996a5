"""The core commands as a user runs them: list, info, convert, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import relative_error, trained_looking
from repvgg import create_model, list_models, model_from_checkpoint, save_checkpoint
from repvgg.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "repvgg.cli", *args], capture_output=True, text=True, timeout=300)


def test_list_prints_every_model_with_paper_counts(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_models())
    a0 = next(line for line in out.splitlines() if line.startswith("repvgg_a0 "))
    assert a0.split()[2:] == ["9.11M", "8.31M", "1.36"]


def test_convert_then_info(tmp_path, capsys) -> None:
    model = trained_looking(create_model("repvgg_a0", num_classes=4, strides=(1, 2, 2, 2, 2)))
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "official.pth")
    dst = tmp_path / "deploy.safetensors"
    assert main(["convert", str(tmp_path / "official.pth"), str(dst), "--model", "RepVGG-A0"]) == 0
    assert "max relative difference" in capsys.readouterr().out
    deploy, ckpt = model_from_checkpoint(dst)
    assert ckpt.deploy and ckpt.metadata["source_format"] == "official"
    x = torch.randn(1, 3, 64, 64)
    # the official file carries no strides: the converted model uses the defaults, as the file describes
    reference = create_model("repvgg_a0", num_classes=4).eval()
    reference.load_state_dict(model.state_dict())
    assert relative_error(reference(x), deploy(x)) < 1e-5
    assert main(["info", str(dst)]) == 0
    info = capsys.readouterr().out
    assert "repvgg_a0" in info and "deploy (re-parameterized)" in info and "classes: 4" in info


def test_convert_keeps_metadata_of_own_checkpoints(tmp_path) -> None:
    model = trained_looking(create_model("repvgg_a0", num_classes=2, strides=(1, 1, 2, 2, 2)))
    save_checkpoint(model, tmp_path / "train.pth", class_names=["cat", "dog"])
    assert main(["convert", str(tmp_path / "train.pth"), str(tmp_path / "deploy.pth")]) == 0
    deploy, ckpt = model_from_checkpoint(tmp_path / "deploy.pth")
    assert ckpt.metadata["class_names"] == ["cat", "dog"] and deploy.strides == (1, 1, 2, 2, 2)
    x = torch.randn(2, 3, 32, 32)
    assert relative_error(model(x), deploy(x)) < 1e-5


@pytest.mark.parametrize("args,message", [
    (["convert", "missing.pth", "out.pth"], "checkpoint not found: missing.pth"),
    (["convert", "a1.pth", "out.pth", "--model", "repvgg_q1"], "unknown model 'repvgg_q1'"),
    (["convert", "a1.pth", "out.pth", "--model", "repvgg_a0"], "checkpoint holds repvgg_a1, not repvgg_a0"),
    (["convert", "corrupt.pth", "out.pth"], "cannot read checkpoint corrupt.pth"),
    (["info", "corrupt.pth"], "cannot read checkpoint corrupt.pth"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, args: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    save_checkpoint(create_model("repvgg_a1", num_classes=3), "a1.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"garbage")
    result = run(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert not (tmp_path / "out.pth").exists()
