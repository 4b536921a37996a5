"""Export to ONNX / TorchScript / OpenVINO with verification through each runtime, the ONNX node set, and
the message for a missing optional extra."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from conftest import trained_looking
from repvgg import RepVGG, RepVGGConfig, RepVGGError, create_model, relative_difference, save_checkpoint
from repvgg.cli import main
from repvgg.deploy.export import export_model
from repvgg.deploy.formats import onnx_bytes
from repvgg.optional import is_installed

RUNTIME = {"onnx": "onnxruntime", "torchscript": "torch", "openvino": "openvino"}
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "openvino": ".xml"}
PLAIN_OPS = {"Conv", "Relu", "GlobalAveragePool", "ReduceMean", "Flatten", "Reshape", "Gemm"}
SE_OPS = {"Mul", "Sigmoid"}


@pytest.fixture(scope="module")
def train_ckpt(tmp_path_factory) -> Path:
    """A training-time RepVGG-A0 checkpoint for 32x32 images with 5 named classes."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "a0_train.pth"
    model = trained_looking(create_model("repvgg_a0", num_classes=5))
    save_checkpoint(model, path, class_names=["ant", "bee", "cat", "dog", "eel"],
                    preprocess={"resize": 36, "crop": 32})
    return path


def tiny_repvgg(se: str | None = None) -> RepVGG:
    """A small deploy-form RepVGG (widths 16-64), for tests that need no registered architecture."""
    config = RepVGGConfig("tiny", (1, 1, 1, 1), (0.25, 0.25, 0.25, 0.125), se=se, se_reduction=4)
    return RepVGG(config, num_classes=4, deploy=True).eval()


@pytest.mark.parametrize(("fmt", "dynamic"), [("onnx", True), ("torchscript", False), ("openvino", True)])
def test_export_verifies_each_format(train_ckpt, tmp_path, capsys, fmt: str, dynamic: bool) -> None:
    if not is_installed(RUNTIME[fmt]):
        pytest.skip(f"{RUNTIME[fmt]} not installed")
    out = tmp_path / f"model{SUFFIX[fmt]}"
    args = ["export", str(train_ckpt), "--format", fmt, "--out", str(out)] + (["--dynamic-batch"] if dynamic else [])
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "max difference vs PyTorch" in printed and "32x32" in printed  # size from the checkpoint's preprocess
    expected = {out.name} | ({"model.bin"} if fmt == "openvino" else set())
    assert {p.name for p in tmp_path.iterdir()} == expected  # no temporaries left


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_failed_verification_leaves_nothing(tmp_path, fmt: str) -> None:
    if not is_installed(RUNTIME[fmt]):
        pytest.skip(f"{RUNTIME[fmt]} not installed")
    with pytest.raises(RepVGGError, match="differs from PyTorch"):
        export_model(tiny_repvgg(), tmp_path / f"m{SUFFIX[fmt]}", fmt, (32, 32), tolerance=0)
    assert list(tmp_path.iterdir()) == []


def test_export_model_api_reports_difference(tmp_path) -> None:
    if not is_installed("onnxruntime"):
        pytest.skip("onnxruntime not installed")
    result = export_model(tiny_repvgg(), tmp_path / "m.onnx", "onnx", (32, 32), dynamic_batch=True)
    assert result.input_shape == (2, 3, 32, 32) and result.rel_diff <= 1e-4
    assert result.files == [str(tmp_path / "m.onnx")]


def test_onnx_graph_holds_only_plain_ops() -> None:
    onnx = pytest.importorskip("onnx")
    model = create_model("repvgg_a0", num_classes=10, deploy=True)
    ops = {n.op_type for n in onnx.load_from_string(onnx_bytes(model, (32, 32))).graph.node}
    assert ops <= PLAIN_OPS and {"Conv", "Relu", "Gemm"} <= ops


def test_onnx_graph_of_se_model_adds_only_se_ops() -> None:
    onnx = pytest.importorskip("onnx")
    ops = {n.op_type for n in onnx.load_from_string(onnx_bytes(tiny_repvgg(se="pre"), (32, 32))).graph.node}
    assert ops <= PLAIN_OPS | SE_OPS and ops >= SE_OPS


def test_equal_weights_are_not_exported_as_identity_nodes() -> None:
    """An untrained SE model holds many equal biases, which the exporter stores once behind Identity nodes; the
    graph keeps only the listed node kinds, and still computes the model."""
    onnx, ort = pytest.importorskip("onnx"), pytest.importorskip("onnxruntime")
    config = RepVGGConfig("a0se", (2, 4, 14, 1), (0.75, 0.75, 0.75, 2.5), se="pre", se_reduction=16)
    model = RepVGG(config, num_classes=10, deploy=True).eval()
    data = onnx_bytes(model, (32, 32))
    ops = [n.op_type for n in onnx.load_from_string(data).graph.node]
    assert "Identity" not in ops and set(ops) <= PLAIN_OPS | SE_OPS and ops.count("Sigmoid") == 22
    x = torch.randn(2, 3, 32, 32)
    out = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert relative_difference(model(x), torch.from_numpy(out)) < 1e-5


@pytest.mark.parametrize(("fmt", "extra"), [("onnx", "onnx"), ("openvino", "openvino")])
def test_missing_extra_names_it(train_ckpt, tmp_path, monkeypatch, capsys, fmt: str, extra: str) -> None:
    real = importlib.import_module

    def fake(name: str, *args, **kwargs):
        if name.split(".")[0] in ("onnxruntime", "openvino"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    assert main(["export", str(train_ckpt), "--format", fmt, "--out", str(tmp_path / f"m{SUFFIX[fmt]}")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pip install 'repvgg[{extra}]'" in err
    assert list(tmp_path.iterdir()) == []


def test_bad_export_requests(train_ckpt, tmp_path, capsys) -> None:
    assert main(["export", str(tmp_path / "none.pth"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    if is_installed("openvino"):
        assert main(["export", str(train_ckpt), "--format", "openvino", "--out", str(tmp_path / "m.onnx")]) == 2
        assert "must end in .xml" in capsys.readouterr().err


def test_torchscript_archive_is_not_named_after_a_temporary_file(tmp_path) -> None:
    import zipfile

    export_model(tiny_repvgg(), tmp_path / "a0.pt", "torchscript", (32, 32))
    roots = {name.split("/")[0] for name in zipfile.ZipFile(tmp_path / "a0.pt").namelist()}
    assert len(roots) == 1 and not roots.pop().startswith(".")


def test_inconsistent_metadata_is_refused_before_writing(tmp_path, capsys) -> None:
    """A file written elsewhere with one class name for a 3-class model: export refuses it rather than writing an
    artifact that predict would refuse later."""
    pytest.importorskip("onnxruntime")
    model = create_model("repvgg_a0", num_classes=3)
    meta = {"format": "repvgg", "architecture": "repvgg_a0", "num_classes": 3, "class_names": ["only one"]}
    torch.save({"repvgg": meta, "state_dict": model.state_dict()}, tmp_path / "odd.pth")
    assert main(["export", str(tmp_path / "odd.pth"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "lists 1 class names for a model with 3 classes" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
