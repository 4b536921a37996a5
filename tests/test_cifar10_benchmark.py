"""The CIFAR-10 benchmark command on a tiny image folder: it trains, reports both forms, TTA, the per-epoch table
and both target verdicts, and ``--report-only`` rebuilds the same report (the speed probe included) from the run
without training."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from imagefolders import PYTHON, REPO, make_split, subprocess_env
from repvgg.errors import RepVGGError

spec = importlib.util.spec_from_file_location("cifar10_benchmark", REPO / "benchmarks" / "cifar10.py")
cifar10 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cifar10)


@pytest.mark.usefixtures("one_thread")
def test_cifar10_benchmark_on_a_tiny_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_split(tmp_path / "data", "train", 4, size=32)
    make_split(tmp_path / "data", "test", 2, size=32, seed=1)
    argv = ["--data", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "4", "--workers", "0",
            "--run-dir", str(tmp_path / "run"), "--results", str(tmp_path / "results")]
    cifar10.main(argv)
    result = json.loads((tmp_path / "results" / "cifar10_a0.json").read_text())
    assert result["epochs"] == 1 and len(result["per_epoch"]) == 1
    assert 0 <= result["reloaded_deploy_top1_tta"] <= 100 and result["tta"] == "flip-translate"
    assert result["target"]["met"] is (result["deploy_top1"] >= 90)
    assert result["target"]["met_with_tta"] is (result["reloaded_deploy_top1_tta"] >= 90)
    assert "--resume" not in result["command"] and "--report-only" not in result["command"]
    assert result["probe"]["chosen"] in result["probe"]["images_per_s"]
    md = (tmp_path / "results" / "cifar10_a0.md").read_text()
    assert "| epoch | lr (end) |" in md and "with flip-translate TTA" in md
    assert f"evaluated in the run's step mode ({result['probe']['chosen']})" in md
    assert (tmp_path / "results" / "cifar10_a0.png").stat().st_size > 1000
    capsys.readouterr()
    cifar10.main([*argv, "--report-only"])
    assert "starting a new run" not in capsys.readouterr().out
    again = json.loads((tmp_path / "results" / "cifar10_a0.json").read_text())
    assert again["reloaded_deploy_top1"] == result["reloaded_deploy_top1"] and again["per_epoch"] == result["per_epoch"]
    assert again["probe"] == result["probe"]  # the training invocation's probe, kept in the run, not a new one
    (tmp_path / "run" / "speed_probe.json").unlink()
    with pytest.raises(RepVGGError, match=r"speed_probe\.json not found"):
        cifar10.main([*argv, "--report-only"])


def test_a_stopped_benchmark_run_ends_with_one_line_and_the_signals_exit_code(tmp_path: Path) -> None:
    """SIGTERM mid-epoch: the run saves its step and says how to continue, the script exits 128 + 15 with one line
    on stderr, no traceback (as ``repvgg train`` does)."""
    make_split(tmp_path / "data", "train", 4, size=32)
    make_split(tmp_path / "data", "test", 2, size=32, seed=1)
    ready = tmp_path / "paused"
    argv = [str(REPO / "benchmarks" / "cifar10.py"), "--data", str(tmp_path / "data"), "--epochs", "1",
            "--batch-size", "4", "--workers", "0", "--run-dir", str(tmp_path / "run"), "--results",
            str(tmp_path / "results")]
    proc = subprocess.Popen([PYTHON, str(REPO / "tests" / "paused_run.py"), "0", "1", str(ready), *argv],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.strip().splitlines()[-1] == "cifar10.py: interrupted" and "Traceback" not in err, err[-3000:]
    assert "saved epoch 1 step 1" in out and "continue with --resume" in out
    assert not (tmp_path / "results").exists()
