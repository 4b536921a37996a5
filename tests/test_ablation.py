"""The branch-ablation study command on a tiny budget: every entry trained, measured and reported; a second run
reuses the finished runs instead of training again."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from imagefolders import REPO, make_split
from repvgg.training.speed import StepMode

spec = importlib.util.spec_from_file_location("ablation", REPO / "benchmarks" / "ablation.py")
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


@pytest.mark.usefixtures("one_thread")
def test_ablation_study_on_a_tiny_budget(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_split(tmp_path / "data", "train", 8)
    make_split(tmp_path / "data", "test", 2, seed=1)
    argv = ["--data", str(tmp_path / "data"), "--epochs", "1", "--seeds", "0", "--variants", "3x3", "resnet18",
            "--batch-size", "8", "--measure-batch", "4", "--img-size", "16", "--rounds", "1",
            "--run-root", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    ablation.main(argv)
    result = json.loads((tmp_path / "results" / "ablation.json").read_text())
    assert list(result["variants"]) == ["3x3", "resnet18"]
    for row in result["variants"].values():
        assert 0 <= row["deploy_top1_mean"] <= 100 and row["train_images_per_s"] > 0
        assert row["train_peak_mib"] > 0 and row["deploy_images_per_s"] > 0 and row["seeds"] == 1
    assert result["variants"]["3x3"]["paper_b0_imagenet_top1"] == 72.39
    assert "Ordering by deploy top-1" in (tmp_path / "results" / "ablation.md").read_text()
    assert (tmp_path / "results" / "ablation.png").stat().st_size > 1000
    capsys.readouterr()
    again = ablation.train_all(ablation.build_parser().parse_args(argv), StepMode())
    assert capsys.readouterr().out.count("already complete") == 2
    assert [s["deploy_top1"] for runs in again.values() for s in runs] == \
        [row["deploy_top1_mean"] for row in result["variants"].values()]
