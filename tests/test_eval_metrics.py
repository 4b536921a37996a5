"""``repvgg eval --per-class``: recall, precision and F1 of every class, exact on a known confusion matrix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import trained_looking
from imagefolders import make_dataset
from repvgg import create_model, save_checkpoint
from repvgg.cli import main
from repvgg.training.evaluate import EvalResult


def test_per_class_metrics_are_exact() -> None:
    # rows: true class, columns: predicted; class 2 is never predicted, class 3 never present
    confusion = torch.tensor([[3, 1, 0, 0], [2, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    m = EvalResult(confusion=confusion).per_class_metrics()
    assert m["recall"][:3] == pytest.approx([75.0, 50.0, 0.0]) and math.isnan(m["recall"][3])
    assert m["precision"][:2] == pytest.approx([60.0, 50.0]) and math.isnan(m["precision"][2])
    assert m["f1"][0] == pytest.approx(2 * 75 * 60 / 135) and m["f1"][1] == pytest.approx(50.0)
    assert math.isnan(m["f1"][2]) and math.isnan(m["f1"][3])
    assert EvalResult(confusion=torch.tensor([[0, 1], [1, 0]])).per_class_metrics()["f1"] == [0.0, 0.0]


def test_eval_per_class_prints_and_saves_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_dataset(tmp_path / "data", train=1, val=3)
    save_checkpoint(trained_looking(create_model("repvgg_a0", num_classes=3)), tmp_path / "a0.pth",
                    class_names=["class0", "class1", "class2"], preprocess={"resize": 16, "crop": 16})
    out = tmp_path / "r.json"
    assert main(["eval", "--workers", "0", "--data", str(data), "--checkpoint", str(tmp_path / "a0.pth"),
                 "--per-class", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recall  precision      F1  images" in printed
    summary = json.loads(out.read_text())
    assert set(summary["per_class"]) == {"class0", "class1", "class2"}
    for name, row in summary["per_class"].items():
        assert row["images"] == 3 and row["recall"] == summary["per_class_top1"][name]
        assert row["precision"] is None or 0 <= row["precision"] <= 100
