"""Exported files carry their metadata (ONNX metadata_props, OpenVINO rt_info, a TorchScript extra file), and
``repvgg predict`` / ``repvgg eval`` run them directly, as they run the checkpoint they came from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import trained_looking
from imagefolders import make_dataset
from repvgg import __version__, create_model, resolve_data_config, save_checkpoint
from repvgg.cli import main
from repvgg.deploy.artifacts import artifact_format, read_artifact_metadata
from repvgg.deploy.formats import onnx_bytes
from repvgg.deploy.predict import predict
from repvgg.deploy.sources import open_artifact
from repvgg.optional import is_installed

CLASSES = ["class0", "class1", "class2"]
PREPROCESS = {"resize": 16, "crop": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "openvino": ".xml"}
RUNTIME = {"onnx": "onnxruntime", "torchscript": "torch", "openvino": "openvino"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), train=1, val=4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "a0.pth"
    save_checkpoint(trained_looking(create_model("repvgg_a0", num_classes=3)), path, class_names=CLASSES,
                    preprocess=PREPROCESS)
    return path


@pytest.fixture(scope="module")
def artifacts(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The checkpoint exported to every format whose runtime is installed (ONNX with a fixed batch of 1)."""
    folder = tmp_path_factory.mktemp("export")
    paths = {}
    for fmt, suffix in SUFFIX.items():
        if is_installed(RUNTIME[fmt]) and (fmt != "onnx" or is_installed("onnx")):
            paths[fmt] = folder / f"model{suffix}"
            assert main(["export", str(ckpt), "--format", fmt, "--out", str(paths[fmt])]) == 0
    return paths


def top_classes(out: str) -> dict[str, str]:
    """``repvgg predict`` output -> {image: top class}."""
    lines = out.splitlines()[1:]
    return {line.rstrip(":"): lines[i + 1].split()[1] for i, line in enumerate(lines) if not line.startswith(" ")}


def test_every_format_carries_the_metadata(artifacts: dict[str, Path]) -> None:
    for fmt, path in artifacts.items():
        assert artifact_format(path) == fmt
        meta = read_artifact_metadata(path, fmt)
        assert meta["class_names"] == CLASSES and meta["architecture"] == "repvgg_a0" and meta["num_classes"] == 3
        assert meta["preprocess"]["crop"] == 16 and meta["preprocess"]["mean"] == [0.5, 0.5, 0.5]
        assert meta["library_version"] == __version__ and meta["deploy"] is True


def test_predict_runs_exported_files_like_the_checkpoint(ckpt: Path, artifacts: dict[str, Path], data: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    images = [str(p) for p in sorted((data / "val").rglob("*.png"))[::2]]
    assert main(["predict", str(ckpt), *images, "--engine", "torch"]) == 0
    reference = top_classes(capsys.readouterr().out)
    for fmt, path in artifacts.items():
        assert main(["predict", str(path), *images]) == 0  # three or more images through a batch-1 ONNX graph
        out = capsys.readouterr().out
        assert out.splitlines()[0].split()[1] in {"onnx": ("onnxruntime", "openvino"), "openvino": ("openvino",),
                                                  "torchscript": ("torch",)}[fmt]
        assert top_classes(out) == reference, fmt


def test_exported_file_needs_its_own_runtime(artifacts: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    if "onnx" not in artifacts:
        pytest.skip("onnx not installed")
    assert main(["predict", str(artifacts["onnx"]), "img.png", "--engine", "torch"]) == 2
    assert "runs on onnxruntime or openvino, not torch" in capsys.readouterr().err


def test_eval_runs_exported_files(ckpt: Path, artifacts: dict[str, Path], data: Path, tmp_path: Path) -> None:
    def evaluate(source: str) -> dict:
        out = tmp_path / "r.json"
        assert main(["eval", "--workers", "0", "--data", str(data), "--checkpoint", source, "--json", str(out),
                     "--overwrite"]) == 0
        return json.loads(out.read_text())

    reference = evaluate(str(ckpt))
    for fmt, path in artifacts.items():
        result = evaluate(str(path))
        assert result["format"] == fmt and result["form"] == "deploy" and result["images"] == reference["images"]
        assert result["top1"] == reference["top1"] and result["loss"] == pytest.approx(reference["loss"], rel=1e-3)


def test_files_exported_elsewhere_fall_back_to_defaults(tmp_path: Path) -> None:
    if not is_installed("onnxruntime"):
        pytest.skip("onnxruntime not installed")
    model = trained_looking(create_model("repvgg_a0", num_classes=4, deploy=True))
    (tmp_path / "plain.onnx").write_bytes(onnx_bytes(model, (224, 224)))
    artifact = open_artifact(tmp_path / "plain.onnx", "onnxruntime")
    assert artifact.metadata == {}
    from PIL import Image

    image = Image.new("RGB", (300, 260), (120, 30, 200))
    top = predict(artifact, [image, image], topk=2)
    assert len(top) == 2 and all(name.startswith("class ") for name, _ in top[0])


def test_export_and_eval_from_pretrained_weights(ckpt: Path, data: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "m.pt"
    assert main(["export", "--pretrained", str(ckpt), "--format", "torchscript", "--out", str(out)]) == 0
    assert read_artifact_metadata(out, "torchscript")["class_names"] == CLASSES
    assert main(["eval", "--workers", "0", "--data", str(data), "--pretrained", str(ckpt)]) == 0
    assert f"pretrained {ckpt}" in capsys.readouterr().out
    assert main(["export", "--format", "onnx", "--out", str(tmp_path / "x.onnx")]) == 2
    assert main(["eval", "--data", str(data), "--pretrained", str(ckpt), "--checkpoint", str(ckpt)]) == 2
    assert capsys.readouterr().err.count("one of the two") == 2


@pytest.mark.parametrize("suffix", [".onnx", ".xml"])
def test_a_corrupt_model_file_is_one_line(suffix: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Random bytes named like an exported model: predict (on any engine), eval and info say so in one line."""
    pytest.importorskip("onnxruntime" if suffix == ".onnx" else "openvino")
    bad = tmp_path / f"random{suffix}"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    (tmp_path / "val" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "val" / "a" / "0.png")
    runs = [["predict", str(bad), str(image)], ["eval", "--data", str(tmp_path), "--checkpoint", str(bad)],
            ["info", str(bad)]]
    if suffix == ".onnx":
        runs.append(["predict", str(bad), str(image), "--engine", "onnxruntime"])
    for argv in runs:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{bad} is not a readable" in err[0], (argv, err)


def test_info_tells_what_an_exported_file_carries(artifacts: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    """`repvgg info a0.onnx`: the file's own format (not the metadata's schema name) and the carried metadata."""
    for fmt, path in artifacts.items():
        assert main(["info", str(path)]) == 0
        rows = dict(line.strip().split(": ", 1) for line in capsys.readouterr().out.splitlines())
        assert rows["format"] == fmt and rows["architecture"] == "repvgg_a0" and rows["num_classes"] == "3"
        assert rows["class_names"] == str(CLASSES) and rows["library_version"] == __version__
        assert rows["files"] == str([str(path), str(path.with_suffix(".bin"))] if fmt == "openvino" else [str(path)])
        assert resolve_data_config(open_artifact(path)) == {**PREPROCESS, "crop": 16, "resize": 16}
