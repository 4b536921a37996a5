"""Post-training int8 quantization: a tiny trained model calibrated on real images with each real engine, the
artifact's quantized ops and metadata, int8 vs float32 outputs, and int8 files through eval, predict and bench."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fit_colours
from imagefolders import PYTHON, make_dataset, subprocess_env
from repvgg import create_model, save_checkpoint
from repvgg.cache import ENGINE_PROBE_FILE
from repvgg.cli import main
from repvgg.deploy import formats as formats_module
from repvgg.deploy import quantize as quantize_module
from repvgg.deploy.artifacts import read_artifact_metadata
from repvgg.deploy.benchmark import format_table, run_benchmark
from repvgg.deploy.engines import INT8_ENGINES
from repvgg.deploy.probe import PROBE_BATCH_SIZES, engine_measurement
from repvgg.deploy.quantize import (
    METHODS,
    calibration_batches,
    fastest_int8_engine,
    int8_engine,
    int8_engines_installed,
    quantize_model,
)
from repvgg.deploy.sources import open_artifact
from repvgg.hardware import keep_speeds
from repvgg.models.preprocess import preprocess_settings

PREPROCESS = {"resize": 16, "crop": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
CLASSES = ["class0", "class1", "class2"]
ENGINES = [pytest.param(e, marks=pytest.mark.skipif(e not in int8_engines_installed(), reason=f"{e} int8 missing"))
           for e in INT8_ENGINES]
pytestmark = pytest.mark.usefixtures("one_thread")


def seed_int8_speeds(speeds: dict[int, dict[str, float]]) -> None:
    """Write int8 engine speeds into the probe cache for every thread count: no test times anything."""
    engines = int8_engines_installed()
    for threads in range(1, (os.cpu_count() or 1) + 1):
        keep_speeds(ENGINE_PROBE_FILE, engine_measurement(engines, threads, precision="int8"),
                    {str(b): v for b, v in speeds.items()})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, data folder): RepVGG-A0 with strides (2,2,2,2,2), trained a few steps on three colours."""
    root = tmp_path_factory.mktemp("quant")
    data = make_dataset(root / "data", train=8, val=4)
    model = fit_colours(create_model("repvgg_a0", num_classes=3, strides=(2, 2, 2, 2, 2)), data, PREPROCESS, 15)
    save_checkpoint(model, root / "a0.pth", class_names=CLASSES, preprocess=PREPROCESS)
    return root / "a0.pth", data


@pytest.mark.parametrize("engine", ENGINES)
def test_quantize_end_to_end(engine: str, trained: tuple[Path, Path], tmp_path: Path,
                             capsys: pytest.CaptureFixture) -> None:
    """``repvgg quantize`` with real calibration, the engine chosen by the output's suffix: quantized ops, metadata,
    int8 close to float32, --val top-1 (for OpenVINO, in a fresh process that must print no CUDA warning); then the
    file through ``eval`` and ``predict``."""
    ckpt, data = trained
    out = tmp_path / "out" / ("a0_int8.xml" if engine == "openvino" else "a0_int8.onnx")
    argv = ["quantize", str(ckpt), "--calib", str(data), "--out", str(out), "--calib-images", "16", "--val", str(data)]
    printed = _quantize_in_fresh_process(argv, tmp_path) if engine == "openvino" else _quantize_here(argv, capsys)
    assert "top-1 on" in printed and "int8" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name] + ([out.with_suffix(".bin").name]
                                                                            if engine == "openvino" else []))
    fmt = "openvino" if engine == "openvino" else "onnx"
    meta = read_artifact_metadata(out, fmt)
    assert meta["precision"] == "int8" and meta["class_names"] == CLASSES and meta["preprocess"]["crop"] == 16
    assert meta["quantization"]["method"] == METHODS[engine][0] and meta["quantization"]["calibration_images"] == 16
    if engine == "onnxruntime":
        import onnx

        ops = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    else:
        import openvino as ov

        model = ov.Core().read_model(str(out))
        assert "FakeQuantize" in {op.get_type_name() for op in model.get_ops()}
        assert any(op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8 for op in model.get_ops())
    from repvgg.deploy.sources import load_deploy_model

    float_model, _ = load_deploy_model(ckpt)
    x = np.concatenate(calibration_batches(data, preprocess_settings(PREPROCESS), 36))
    reference = float_model(torch.from_numpy(x)).detach().numpy()
    output = open_artifact(out, engine, len(x)).run(x)
    assert np.abs(output - reference).max() <= 0.1 * np.abs(reference).max()
    assert (output.argmax(1) == reference.argmax(1)).mean() >= 0.9
    capsys.readouterr()
    assert main(["eval", "--data", str(data), "--checkpoint", str(out), "--workers", "0"]) == 0
    assert "top-1" in capsys.readouterr().out
    image = next((data / "val" / "class1").iterdir())
    assert main(["predict", str(out), str(image), "--top", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"engine: {engine}" in printed and printed.count("%") == 2


def _quantize_here(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def _quantize_in_fresh_process(argv: list[str], tmp_path: Path) -> str:
    """``argv`` run where a CUDA toolkit folder exists: NNCF loads torch's C++-extension helpers, which warn about a
    missing CUDA runtime there; a CPU-only quantization must not show it (a fresh process: the warning comes once, at
    import)."""
    (tmp_path / "cuda").mkdir()
    done = subprocess.run([PYTHON, "-m", "repvgg.cli", *argv], capture_output=True, text=True,
                          env=subprocess_env(CUDA_HOME=str(tmp_path / "cuda")), timeout=300)
    assert done.returncode == 0 and "CUDA" not in done.stderr, done.stderr
    return done.stdout


def test_every_method(trained: tuple[Path, Path]) -> None:
    """Each engine's other calibration methods quantize too (the defaults run end to end above)."""
    ckpt, data = trained
    from repvgg.deploy.sources import load_deploy_model

    model, _ = load_deploy_model(ckpt)
    batches = calibration_batches(data, preprocess_settings(PREPROCESS), 8)
    for engine in int8_engines_installed():
        for method in METHODS[engine][1:]:
            out = int8_engine(quantize_model(model, engine, batches, method, (16, 16)), engine, 8)(batches[0])
            assert out.shape == (8, 3) and np.isfinite(out).all(), (engine, method)


@pytest.mark.skipif(len(int8_engines_installed()) < 2, reason="needs both int8 engines")
def test_default_int8_engine_is_the_faster(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """Injected timings decide: the faster engine at each batch size; ``--out`` without a suffix gets its suffix."""
    small, large = PROBE_BATCH_SIZES
    seed_int8_speeds({small: {"onnxruntime": 5.0, "openvino": 2.0}, large: {"onnxruntime": 1.0, "openvino": 4.0}})
    assert fastest_int8_engine(batch_size=1) == "onnxruntime"
    assert fastest_int8_engine(batch_size=16) == "openvino"
    ckpt, data = trained
    assert main(["quantize", str(ckpt), "--calib", str(data), "--out", str(tmp_path / "m"), "--calib-images",
                 "4"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.skipif(not int8_engines_installed(), reason="no int8 engine installed")
def test_bench_int8_rows_beside_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Float32 and int8 rows of every int8 engine; OpenVINO's float32 IR and its int8 model come from one
    conversion."""
    seed_int8_speeds({b: {"onnxruntime": 1.0, "openvino": 2.0} for b in PROBE_BATCH_SIZES})
    engines = int8_engines_installed()
    conversions, convert = [], formats_module.to_openvino

    def counted(*args, **kwargs):
        conversions.append(args)
        return convert(*args, **kwargs)

    for module in (formats_module, quantize_module):
        monkeypatch.setattr(module, "to_openvino", counted)
    report = run_benchmark("repvgg_a0", (32, 32), (2,), rounds=1, images_per_round=1, engines=engines,
                           baselines=(), train=False, memory=False, int8=True)
    labels = [r["label"] for r in report["results"]]
    expected = [label for e in engines for label in (f"RepVGG-A0 deploy ({e})", f"RepVGG-A0 deploy int8 ({e})")]
    assert labels == expected
    assert all(r["batch"]["2"]["images_per_s"] > 0 for r in report["results"])
    assert report["default_int8_engine"] == ("openvino" if "openvino" in engines else "onnxruntime")
    assert "deploy int8 (" in format_table(report)
    assert len(conversions) == ("openvino" in engines)


