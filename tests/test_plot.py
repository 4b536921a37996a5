"""Training curves and the confusion matrix: integer epoch ticks, log-scale loss, the learning rate per step when
the metrics carry it, no overlapping titles, a labelled colour bar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from repvgg.cli import main
from repvgg.training.plot import confusion_figure, run_figure

ConstrainedLayoutEngine = pytest.importorskip("matplotlib.layout_engine").ConstrainedLayoutEngine


def rows(lr_steps: bool) -> list[dict]:
    """Three epochs of four steps each: linear warm-up over the first epoch, then decay."""
    out = []
    for epoch in range(1, 4):
        row = {"epoch": epoch, "train_loss": 2.0 / epoch, "val_loss": 2.2 / epoch, "val_top1": 30.0 * epoch,
               "lr": 0.1 / epoch}
        if lr_steps:
            row["lr_steps"] = [[(epoch - 1) * 4 + s, 0.1 * min(1.0, ((epoch - 1) * 4 + s + 1) / 4) / epoch]
                               for s in range(4)]
        out.append(row)
    return out


def test_curves_per_step_lr_log_loss_and_integer_epochs() -> None:
    fig = run_figure(rows(lr_steps=True), "runs/x")
    loss, top1, lr = fig.axes
    assert loss.get_yscale() == "log" and top1.get_yscale() == "linear"
    assert lr.get_xlabel() == "step" and len(lr.lines[0].get_xdata()) == 12 and lr.lines[0].get_ydata()[0] == 0.025
    for ax in (loss, top1, lr):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert all(float(t).is_integer() for t in ticks)
    assert isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine) and fig.get_suptitle() == "runs/x"


def test_curves_fall_back_to_the_epoch_lr(tmp_path: Path) -> None:
    lr = run_figure(rows(lr_steps=False)).axes[2]
    assert lr.get_xlabel() == "epoch" and list(lr.lines[0].get_ydata()) == pytest.approx([0.1, 0.05, 0.1 / 3])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(lr_steps=True)))
    assert main(["plot", str(tmp_path)]) == 0 and (tmp_path / "curves.png").stat().st_size > 1000


def test_confusion_matrix_has_a_labelled_colour_bar() -> None:
    fig = confusion_figure(torch.tensor([[3, 1], [0, 4]]), ["cat", "dog"])
    colour_bar = fig.axes[1]
    assert colour_bar.get_ylabel() == "fraction of the true class's images"
    assert isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)
