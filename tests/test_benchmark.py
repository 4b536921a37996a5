"""``repvgg bench`` smoke run at tiny sizes: the JSON holds every configuration, batch size, latency percentile,
peak memory, the matmul reference and the summary ratios; the table and chart are written."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from imagefolders import PYTHON, REPO, subprocess_env
from repvgg import RepVGGError
from repvgg.cli import main
from repvgg.deploy.benchmark import BenchConfig, _peak_memory, default_configs
from repvgg.hardware import measure_throughput
from repvgg.optional import is_installed


def test_bench_smoke(tmp_path, capsys) -> None:
    engines = ["torch", "torch-channels-last"] + (["onnxruntime"] if is_installed("onnxruntime") else [])
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "--img-size", "32", "32", "--batch-sizes", "1", "2", "--rounds", "1",
                 "--images-per-round", "2", "--engines", *engines, "--baselines", "resnet18",
                 "--no-memory", "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "float32 matmul" in printed and "vs ResNet-18" in printed
    assert "target" not in printed and "met" not in printed  # measurements only; targets are benchmarks/' business
    report = json.loads(out.read_text())
    labels = [r["label"] for r in report["results"]]
    assert labels == ["RepVGG-A0 train (torch)"] + [f"RepVGG-A0 deploy ({e})" for e in engines] + ["ResNet-18 (torch)"]
    assert report["img_size"] == [32, 32] and report["batch_sizes"] == [1, 2] and report["matmul"]["gflops"] > 0
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
    out = tmp_path / "speed.json"
    result = subprocess.run([PYTHON, str(REPO / "benchmarks" / "deploy_speed.py"), "--img-size", "32", "32",
                             "--batch-sizes", "1", "2", "--rounds", "1", "--images-per-round", "2", "--engines",
                             "torch", "--baselines", "resnet18", "--no-memory", "--json", str(out), "--plot", ""],
                            capture_output=True, text=True, timeout=300, env=subprocess_env())
    targets = json.loads(out.read_text())["targets"]
    assert {"deploy_vs_train", "deploy_vs_resnet18"} <= set(targets)  # default_vs_fastest: only if it ran
    assert result.returncode == (0 if all(t["met"] for t in targets.values()) else 1), result.stderr
    assert "deploy_vs_train:" in result.stdout and "target >= 2.0x" in result.stdout


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
