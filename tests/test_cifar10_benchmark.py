"""The CIFAR-10 benchmark command on a tiny image folder: stopped by SIGTERM it saves its run and ends with one line
and exit code 143 (as ``repvgg train`` does); resumed (with its own seed only), it trains on, reports both forms, TTA,
the per-epoch table, both target verdicts and the seed, and ``--report-only`` rebuilds the same report (the speed
probe included) from the run without training; a new run into that folder is refused before it writes anything."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imagefolders import REPO, make_split
from repvgg.commands.exits import run_command
from repvgg.errors import RepVGGError
from repvgg.training import train as train_module
from repvgg.training.loop import Run
from repvgg.training.options import Callback

spec = importlib.util.spec_from_file_location("cifar10_benchmark", REPO / "benchmarks" / "cifar10.py")
cifar10 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cifar10)


def stopping_after_step_1(setup_run: Callable[..., Run]) -> Callable[..., Run]:
    """``setup_run`` whose run sends its own process SIGTERM after its first optimizer step, as ``kill`` would."""

    class Stop(Callback):
        def on_step_end(self, epoch: int, step: int) -> None:
            if (epoch, step) == (0, 1):
                os.kill(os.getpid(), signal.SIGTERM)

    def setup(*args: Any, **kwargs: Any) -> Run:
        run = setup_run(*args, **kwargs)
        run.opts.callbacks = [*run.opts.callbacks, Stop()]
        return run

    return setup


@pytest.mark.usefixtures("one_thread")
def test_cifar10_benchmark_on_a_tiny_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_split(tmp_path / "data", "train", 4, size=32)
    make_split(tmp_path / "data", "test", 2, size=32, seed=1)
    argv = ["--data", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "4", "--cutout", "4", "--workers", "0",
            "--run-dir", str(tmp_path / "run"), "--results", str(tmp_path / "results"), "--device", "cpu",
            "--seed", "3"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "setup_run", stopping_after_step_1(train_module.setup_run))
        assert run_command("cifar10.py", lambda: cifar10.main(argv)) == 128 + signal.SIGTERM
    printed = capsys.readouterr()
    assert printed.err.strip().splitlines()[-1] == "cifar10.py: interrupted" and "Traceback" not in printed.err
    assert "saved epoch 1 step 1" in printed.out and "continue with --resume" in printed.out
    assert not (tmp_path / "results").exists()
    probed = (tmp_path / "run" / "speed_probe.json").read_bytes()
    with pytest.raises(RepVGGError, match="seed: 3 -> 0"):
        cifar10.main([*argv[:-2], "--resume"])  # another seed would change every sample's augmentation from here on
    cifar10.main([*argv, "--resume"])
    assert "speed probe:" not in capsys.readouterr().out  # the run's own probe chose its step mode
    result = json.loads((tmp_path / "results" / "cifar10_a0.json").read_text())
    assert result["epochs"] == 1 and len(result["per_epoch"]) == 1
    assert 0 <= result["reloaded_deploy_top1_tta"] <= 100 and result["tta"] == "flip-translate"
    assert result["target"]["met"] is (result["deploy_top1"] >= 90)
    assert result["target"]["met_with_tta"] is (result["reloaded_deploy_top1_tta"] >= 90)
    assert result["command"] == "python benchmarks/cifar10.py --epochs 1 --batch-size 4 --cutout 4 --seed 3"
    assert result["seed"] == 3
    assert result["recipe_values"]["epochs"] == 1 and result["recipe_values"]["cutout"] == 4
    assert result["probe"]["chosen"] in result["probe"]["images_per_s"] and result["machine"]["device"] == "cpu"
    md = (tmp_path / "results" / "cifar10_a0.md").read_text()
    assert "| epoch | lr (end) |" in md and "with flip-translate TTA" in md
    assert f"evaluated in the run's step mode ({result['probe']['chosen']})" in md
    assert (tmp_path / "results" / "cifar10_a0.png").stat().st_size > 1000
    capsys.readouterr()
    titles = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cifar10, "plot_run", lambda run, out, title: titles.append(title))
        cifar10.main([*argv, "--report-only"])
    assert titles == [f"RepVGG-A0 on CIFAR-10: {result['command']}"]  # the command, not the user's run folder
    assert "starting a new run" not in capsys.readouterr().out
    again = json.loads((tmp_path / "results" / "cifar10_a0.json").read_text())
    assert again["reloaded_deploy_top1"] == result["reloaded_deploy_top1"] and again["per_epoch"] == result["per_epoch"]
    assert again["probe"] == result["probe"]  # the training invocation's probe, kept in the run, not a new one
    with pytest.raises(RepVGGError, match="holds a training run already"):
        cifar10.main(argv)  # a new run is refused in the finished run's folder, and changes none of its files
    assert (tmp_path / "run" / "speed_probe.json").read_bytes() == probed
    (tmp_path / "run" / "speed_probe.json").unlink()
    with pytest.raises(RepVGGError, match=r"speed_probe\.json not found"):
        cifar10.main([*argv, "--report-only"])


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("busy", [0.6, 0.1])
def test_a_probe_on_busy_cores_is_flagged(tmp_path: Path, busy: float, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    make_split(tmp_path / "data", "train", 4, size=32)
    make_split(tmp_path / "data", "test", 2, size=32, seed=1)
    monkeypatch.setattr(cifar10, "busy_elsewhere", lambda run: (run(), busy))  # as if other work held the cores
    opts = cifar10.TrainOptions(data=str(tmp_path / "data"), out_dir=str(tmp_path / "run"),
                                recipe=cifar10.RECIPES["cifar"], workers=0)
    train_set, _, classes = cifar10.load_datasets(opts)
    result = cifar10.probe(opts, train_set, len(classes), cifar10.torch.device("cpu"))
    out = capsys.readouterr().out
    assert result["busy_elsewhere"] == busy and result["chosen"] in result["images_per_s"]
    assert ("warning: other processes kept" in out) is (busy > 0.2)  # any busy-cores warning, at whatever share
    if busy > 0.2:
        assert (f"warning: other processes kept 60% of the cores busy during the speed probe; this run keeps its "
                f"choice ({result['chosen']}) to the end, resumes included") in out
