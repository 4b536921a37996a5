"""The int8 quantization study command on a tiny budget: two tiny trained runs laid out like the ablation's, every
accuracy row and speed setting of both models measured and reported; and a missing run named with the ablation
command that makes it (the command exits with that one line)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from conftest import fit_colours
from imagefolders import REPO, TINY_ARCH, make_split
from repvgg import create_model, reparameterize, save_checkpoint
from repvgg.deploy.quantize import int8_engines_installed
from repvgg.errors import RepVGGError

spec = importlib.util.spec_from_file_location("quantization", REPO / "benchmarks" / "quantization.py")
quantization = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quantization)

PREPROCESS = {"resize": 16, "crop": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
CLASSES = ["class0", "class1", "class2"]
# one int8 engine (ONNX Runtime where installed: its QAT needs no NNCF) keeps the test short; tests/test_qat.py and
# tests/test_quantize.py cover every engine
STUDIED = ["onnxruntime"] if "onnxruntime" in int8_engines_installed() else int8_engines_installed()[:1]
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not int8_engines_installed(), reason="no int8 engine installed")]


def make_run(folder: Path, block: str, data: Path) -> None:
    """``model.pth``, ``model_deploy.pth`` and ``summary.json`` of RepVGG-A0 (strides 2 everywhere) trained a few
    steps on the three colours, as the ablation leaves them."""
    model = fit_colours(create_model(TINY_ARCH, num_classes=3, strides=(2, 2, 2, 2, 2), block=block), data,
                        PREPROCESS, 10)
    meta = dict(class_names=CLASSES, preprocess=PREPROCESS, recipe="cifar", epochs=1)
    save_checkpoint(model, folder / "model.pth", **meta)
    save_checkpoint(reparameterize(model), folder / "model_deploy.pth", **meta)
    (folder / "summary.json").write_text(json.dumps({"epochs": 1, "train_top1": 60.0, "deploy_top1": 60.0}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data (train/, test/) and the two runs (runs/), made once: each test works on its own copy."""
    root = tmp_path_factory.mktemp("study")
    make_split(root / "data", "train", 8)
    make_split(root / "data", "test", 4, seed=1)
    for entry, block in (("full", "repvgg"), ("qarepvgg", "qarepvgg")):
        make_run(root / "runs" / f"{entry}-seed0", block, root / "data")
    return root


def _copy_of(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    return tmp_path / "data"


def test_quantization_study_on_a_tiny_budget(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _copy_of(trained, tmp_path)
    quantization.main(["--data", str(data), "--run-root", str(tmp_path / "runs"), "--results", str(tmp_path / "out"),
                       "--qat-epochs", "1", "--batch-size", "8", "--train-subset", "16", "--calib-images", "16",
                       "--test-limit", "9", "--rounds", "1", "--workers", "0", "--threads", "1",
                       "--methods", "minmax", "--speed-sizes", "16", "--engines", *STUDIED])
    result = json.loads((tmp_path / "out" / "quantization.json").read_text())
    assert list(result["models"]) == ["full", "qarepvgg"] and result["test_images"] == 9
    assert result["recipe"] == "cifar" and result["strides"] == [2, 2, 2, 2, 2]
    assert result["machine"]["model"] and "features" in result["machine"]
    engines = STUDIED
    for m in result["models"].values():
        assert list(m["top1"]) == list(quantization.ROWS)
        assert set(m["top1"]["int8_naive_ptq"]) == set(m["top1"]["int8_best_ptq"]) == set(m["top1"]["int8_qat"]) \
            == set(engines) and "torch" in m["top1"]["float32_deploy"]
        assert all(0 <= v <= 100 for row in m["top1"].values() for v in row.values())
        assert m["best_ptq_method"] == {e: "minmax" for e in engines} and all(len(m["ptq"][e]) == 2 for e in engines)
        assert list(m["speed"]) == ["16"] and all(list(s) == ["1", "16"] for s in m["speed"].values())
        for setting in (s for by_batch in m["speed"].values() for s in by_batch.values()):
            assert all(v > 0 for v in setting["images_per_s"].values())
            assert {f"int8 {e}" for e in engines} <= set(setting["images_per_s"])
        assert list(m["targets"]["speed"]) == ["16"] and "loss_points" in m["targets"]["accuracy"]
    assert m["name"] == "QARepVGG-tiny" and m["block"] == "qarepvgg"
    md = (tmp_path / "out" / "quantization.md").read_text()
    assert "int8 naive PTQ" in md and "int8 / fastest float32" in md and result["machine"]["model"] in md
    assert (tmp_path / "out" / "quantization.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert printed.count("QAT step mode for every model") == 1 and "speed probe" not in printed  # no probe per model
    assert result["qat_step_mode"] in printed and result["qat_step_mode"].endswith("1 thread")
    assert "\nRepVGG-tiny accuracy" in printed and "\nQARepVGG-tiny accuracy" in printed
    assert "naive PTQ loss (as measured)" in printed


def test_missing_run_names_the_ablation_command(tmp_path: Path) -> None:
    with pytest.raises(RepVGGError, match=r"no finished full run in .*full-seed0 .*python benchmarks/ablation.py "
                                         r"--epochs 4 --seeds 0 1 2 .*--run-root"):
        quantization.main(["--data", str(tmp_path), "--run-root", str(tmp_path / "runs")])


def test_an_extra_run_must_be_a_finished_training_run(trained: Path, tmp_path: Path) -> None:
    data = _copy_of(trained, tmp_path)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.pth").write_bytes(b"")
    with pytest.raises(RepVGGError, match=r"half is not a finished training run \(model_deploy.pth, summary.json"):
        quantization.main(["--data", str(data), "--run-root", str(tmp_path / "runs"), "--extra-runs",
                           str(tmp_path / "half")])
