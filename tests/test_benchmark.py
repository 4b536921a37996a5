"""``repvgg bench`` smoke run at tiny sizes: the JSON holds every configuration, batch size, latency percentile,
peak memory, the matmul reference and the summary ratios; the table and chart are written. Trained checkpoints and
exported (float32 or int8) files are timed as they are: their own strides, input size and engines."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

from folders import add_results_arguments, rerun_command, results_folder, shown_path
from imagefolders import PYTHON, REPO, TINY_ARCH, make_dataset, subprocess_env
from repvgg import RepVGGError, create_model, model_from_checkpoint, reparameterize, save_checkpoint
from repvgg.cli import main
from repvgg.commands.exits import run_command
from repvgg.deploy.benchmark import (
    BenchConfig,
    _peak_memory,
    default_configs,
    format_table,
    report_figure,
    run_benchmark,
)
from repvgg.hardware import measure_throughput
from repvgg.models.profile import architecture_stats
from repvgg.optional import is_installed

CIFAR_STRIDES = (1, 1, 2, 2, 2)
TINY = dict(batch_sizes=(1, 2), rounds=1, images_per_round=1, baselines=(), memory=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training-time network of the tests' own architecture for 16x16 images with the small-image strides, as a run
    would save it."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(create_model(TINY_ARCH, num_classes=3, strides=CIFAR_STRIDES), path,
                    class_names=["a", "b", "c"], preprocess={"resize": 16, "crop": 16})
    return path


def test_bench_smoke(tmp_path, capsys) -> None:
    engines = ["torch", "torch-channels-last"] + [e for e in ("onnxruntime", "openvino") if is_installed(e)]
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "--img-size", "32", "32", "--batch-sizes", "1", "2", "--rounds", "1",
                 "--images-per-round", "2", "--engines", *engines, "--baselines", "resnet18",
                 "--no-memory", "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "float32 matmul" in printed and "vs ResNet-18" in printed
    assert "of f32 mm" in printed.splitlines()[0] and "over that float32 rate" in printed
    assert "target" not in printed and "met" not in printed  # measurements only; targets are benchmarks/' business
    report = json.loads(out.read_text())
    threads = report["machine"]["torch_threads"]
    assert threads == torch.get_num_threads()
    assert f"RepVGG-A0 at 32x32, float32; {threads} thread{'s' if threads != 1 else ''}," in printed
    labels = [r["label"] for r in report["results"]]
    assert labels == ["RepVGG-A0 train (torch)"] + [f"RepVGG-A0 deploy ({e})" for e in engines] + ["ResNet-18 (torch)"]
    assert report["img_size"] == [32, 32] and report["batch_sizes"] == [1, 2] and report["matmul"]["gflops"] > 0
    assert report["precisions"] == ["float32"] and report["source"] is None
    for row in report["results"]:
        assert set(row["batch"]) == {"1", "2"}
        assert row["batch"]["1"]["calls"] == 2 and row["batch"]["2"]["calls"] == 1
        for stats in row["batch"].values():
            assert stats["images_per_s"] > 0 and stats["latency_ms_p50"] <= stats["latency_ms_p90"]
            assert stats["gflops"] > 0
        assert row["peak_rss_mib"] is None
        assert row["gmacs"] > 0 and row["params_m"] > 0
    summary = report["summary"]
    assert summary["batch_size"] == 2 and summary["fastest_deploy"] in labels
    assert summary["deploy_vs_train"] > 0 and summary["deploy_vs_resnet18"] > 0 and "targets_met" not in summary
    if is_installed("matplotlib"):
        assert png.read_bytes().startswith(b"\x89PNG")
    assert {p.name for p in tmp_path.iterdir()} <= {"bench.json", "bench.png"}  # no temporary files left


def test_deploy_speed_script_checks_the_targets(tmp_path) -> None:
    out = tmp_path / "bench_a0.json"
    result = subprocess.run([PYTHON, str(REPO / "benchmarks" / "deploy_speed.py"), "--img-size", "32", "32",
                             "--batch-sizes", "1", "2", "--rounds", "1", "--images-per-round", "2", "--engines",
                             "torch", "--baselines", "resnet18", "--no-memory", "--results", str(tmp_path),
                             "--no-plot"],
                            capture_output=True, text=True, timeout=300, env=subprocess_env())
    targets = json.loads(out.read_text())["targets"]
    assert {"deploy_vs_train", "deploy_vs_resnet18"} <= set(targets)  # default_vs_fastest: only if it ran
    assert result.returncode == (0 if all(t["met"] for t in targets.values()) else 1), result.stderr
    assert "deploy_vs_train:" in result.stdout and "target >= 2.0x" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_a0.json"]


def test_benchmarks_write_into_the_users_folder_unless_asked_and_name_missing_data(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A user's run does not write over the committed results, and a checkout without the default data set is told
    which option to pass."""
    parser = argparse.ArgumentParser()
    add_results_arguments(parser)
    assert results_folder(parser.parse_args([])) == REPO / "runs" / "results"
    assert results_folder(parser.parse_args(["--update-results"])) == REPO / "benchmarks" / "results"
    assert results_folder(parser.parse_args(["--results", "x"])) == Path("x")
    for name in ("cifar10", "ablation", "quantization", "segmentation", "train_speed"):
        spec = importlib.util.spec_from_file_location(f"{name}_data", REPO / "benchmarks" / f"{name}.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        capsys.readouterr()
        assert run_command(f"{name}.py", lambda s=script: s.main(["--data", str(tmp_path / "none")])) == 2
        error = f"{name}.py: error: CIFAR-10 not found at {tmp_path / 'none'}; pass --data DIR\n"
        assert capsys.readouterr().err == error


def test_a_report_names_no_folder_of_the_machine_it_ran_on() -> None:
    argv = ["--steps", "4", "--data", "/somewhere/cifar10", "--update-results", "--results=out", "--rounds", "5",
            "--data=/elsewhere"]
    assert rerun_command("train_speed.py", argv) == "python benchmarks/train_speed.py --steps 4 --rounds 5"
    assert rerun_command("ablation.py", []) == "python benchmarks/ablation.py"
    assert shown_path(REPO / "runs" / "ablation") == "runs/ablation" and shown_path("/elsewhere/x") == "/elsewhere/x"


def test_peak_memory_is_measured_in_a_fresh_process() -> None:
    config = BenchConfig("A0 deploy", "repvgg_a0", "deploy", "torch")
    peak = _peak_memory([config], (32, 32), [1, 4], None, threads=1)["A0 deploy"]
    weights_mib = 8.3e6 * 4 / 2**20  # the deploy model's float32 parameters
    assert peak is None or peak > 0.9 * weights_mib


def test_bench_rejects_unknown_names() -> None:
    with pytest.raises(RepVGGError, match="unknown baseline"):
        default_configs(baselines=["vgg16"])
    with pytest.raises(RepVGGError, match="unknown model"):
        default_configs("repvgg_z9")


def test_measure_throughput_keeps_its_signature() -> None:
    x = torch.zeros(1)
    speed = measure_throughput({"a": lambda: x + 1, "b": lambda: x * 2}, batch_size=4, rounds=2, iters_per_round=1)
    assert set(speed) == {"a", "b"} and all(v["images_per_s"] > 0 and v["latency_ms"] > 0 for v in speed.values())


def test_bench_times_a_checkpoint_with_its_own_strides_and_size(trained: Path, tmp_path: Path, capsys) -> None:
    """`repvgg bench runs/x/model.pth` times that model, not the architecture's default-stride twin at 224x224."""
    reports = []
    for how in ([str(trained)], ["--checkpoint", str(trained)]):
        out = tmp_path / f"{len(reports)}.json"
        assert main(["bench", *how, "--batch-sizes", "1", "--rounds", "1", "--images-per-round", "1", "--engines",
                     "torch", "--baselines", "--no-memory", "--json", str(out)]) == 0
        reports.append(json.loads(out.read_text()))
    assert "tiny.pth (RepVGG-tiny) at 16x16, float32" in capsys.readouterr().out
    for report in reports:
        assert report["img_size"] == [16, 16] and report["source"] == str(trained) and report["model"] == "RepVGG-tiny"
        train, deploy = report["results"]
        assert (train["label"], deploy["label"]) == ("tiny.pth train (torch)", "tiny.pth deploy (torch)")
        stats = architecture_stats(TINY_ARCH, 3, (16, 16), strides=CIFAR_STRIDES)
        assert deploy["gmacs"] == pytest.approx(stats.macs / 1e9) and deploy["params_m"] == stats.deploy_params / 1e6
        assert deploy["gmacs"] > 3 * architecture_stats(TINY_ARCH, 3, (16, 16)).macs / 1e9  # stride 1 first


def test_a_deploy_checkpoint_has_no_training_time_row(trained: Path, tmp_path: Path) -> None:
    model, ckpt = model_from_checkpoint(trained)
    save_checkpoint(reparameterize(model), tmp_path / "d.pth", preprocess=ckpt.metadata["preprocess"])
    report = run_benchmark(source=tmp_path / "d.pth", engines=["torch"], **TINY)
    assert [r["label"] for r in report["results"]] == ["d.pth deploy (torch)"] and report["img_size"] == [16, 16]


def test_bench_times_exported_files_on_their_own_engines(trained: Path, tmp_path: Path, capsys) -> None:
    exported = {"torchscript": tmp_path / "tiny.pt"} | (
        {"onnx": tmp_path / "tiny.onnx"} if is_installed("onnx") else {})
    for fmt, path in exported.items():
        assert main(["export", str(trained), "--format", fmt, "--out", str(path)]) == 0
    capsys.readouterr()
    report = run_benchmark(source=exported["torchscript"], **TINY)
    assert [r["label"] for r in report["results"]] == ["tiny.pt deploy (torch)"]
    row = report["results"][0]
    assert report["img_size"] == [16, 16] and row["exported"] and row["fixed_batch"] is None
    assert row["gmacs"] == pytest.approx(architecture_stats(TINY_ARCH, 3, (16, 16), strides=CIFAR_STRIDES).macs
                                         / 1e9)
    with pytest.raises(RepVGGError, match="was exported for 16x16 images; leave --img-size out"):
        run_benchmark(source=exported["torchscript"], img_size=(32, 32), **TINY)
    with pytest.raises(RepVGGError, match="is an exported file: --int8 quantizes a checkpoint"):
        run_benchmark(source=exported["torchscript"], int8=True, **TINY)
    if "onnx" in exported:
        engines = [e for e in ("onnxruntime", "openvino") if is_installed(e)]
        report = run_benchmark(source=exported["onnx"], **TINY)
        assert [r["label"] for r in report["results"]] == [f"tiny.onnx deploy ({e})" for e in engines]
        assert all(r["fixed_batch"] == 1 for r in report["results"])  # exported for batch 1: said under the table
        assert "the file was exported for batch 1; larger batches run as calls of 1" in format_table(report)
        with pytest.raises(RepVGGError, match="it runs on onnxruntime or openvino, which --engines leaves out"):
            run_benchmark(source=exported["onnx"], engines=["torch"], **TINY)


@pytest.mark.skipif(not is_installed("onnxruntime") or not is_installed("matplotlib"),
                    reason="needs onnxruntime and matplotlib")
def test_an_int8_file_is_timed_and_drawn_as_int8(trained: Path, tmp_path: Path, capsys) -> None:
    """`repvgg bench model_int8.onnx`: int8 rows have no float32 yardstick, and the chart's title says int8 (not
    '224x224 float32') and has no empty memory panel under --no-memory."""
    data = make_dataset(tmp_path / "data", train=2, val=1)
    q = tmp_path / "tiny_int8.onnx"
    assert main(["quantize", str(trained), "--calib", str(data), "--out", str(q), "--engine", "onnxruntime",
                 "--calib-images", "4"]) == 0
    capsys.readouterr()
    report = run_benchmark(source=q, engines=["onnxruntime"], **TINY)
    (row,) = report["results"]
    assert row["label"] == "tiny_int8.onnx int8 (onnxruntime)" and row["precision"] == "int8"
    assert report["precisions"] == ["int8"] and row["batch"]["2"]["fraction_of_matmul"] is None
    table = format_table(report)
    assert table.splitlines()[2].split()[-2:] == ["-", "n/a"]  # 'of f32 mm' and peak memory
    assert "tiny_int8.onnx (RepVGG-tiny) at 16x16, int8;" in table and "float32;" not in table
    figure = report_figure(report)
    title = figure._suptitle.get_text()
    assert len(figure.axes) == 1 and "at 16x16, int8 on" in title and "224" not in title
    with_memory = {**report, "results": [{**row, "peak_rss_mib": 12.0}]}
    assert len(report_figure(with_memory).axes) == 2
