"""Plots (matplotlib, the ``repvgg[plot]`` extra): a run's training curves and a confusion matrix, each built as a
figure (:func:`run_figure`, :func:`confusion_figure`) and written atomically (:func:`plot_run`,
:func:`plot_confusion`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from ..files import atomic_write
from ..optional import require
from .metrics import read_metrics

__all__ = ["run_figure", "plot_run", "confusion_figure", "plot_confusion"]


def _pyplot() -> Any:
    require("matplotlib").use("Agg")
    return require("matplotlib.pyplot")


def _save(fig: Any, path: str | os.PathLike) -> None:
    suffix = Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=suffix, dpi=120, bbox_inches="tight"))


def _lr_series(rows: list[dict[str, Any]]) -> tuple[list[float], list[float], str]:
    """(x, learning rate, x label): per optimizer step when the rows carry ``lr_steps`` ([global step, lr] pairs,
    so warm-up shows), else the end-of-epoch ``lr``."""
    steps = [pair for r in rows for pair in r.get("lr_steps") or []]
    if steps:
        return [s for s, _ in steps], [lr for _, lr in steps], "step"
    pts = [(r["epoch"], r["lr"]) for r in rows if r.get("lr") is not None]
    return [e for e, _ in pts], [v for _, v in pts], "epoch"


def run_figure(rows: list[dict[str, Any]], title: str = "") -> Any:
    """Loss (log scale), top-1 and learning rate of a run's metrics rows: epochs on integer ticks, the learning
    rate per step when the rows carry it; laid out so that no title overlaps."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        return [e for e, _ in pts], [v for _, v in pts]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), layout="constrained")
    axes[0].plot(*series("train_loss"), label="train", marker=".")
    axes[0].plot(*series("val_loss"), label="val", marker=".")
    if all(v > 0 for v in series("train_loss")[1] + series("val_loss")[1]):
        axes[0].set_yscale("log")
    axes[1].plot(*series("val_top1"), label="val", marker=".")
    if any("ema_val_top1" in r for r in rows):
        axes[1].plot(*series("ema_val_top1"), label="val (EMA)", marker=".")
    lr_x, lr, lr_unit = _lr_series(rows)
    axes[2].plot(lr_x, lr, marker="." if len(lr) <= 50 else None)
    titles = ("loss", "top-1 (%)", "learning rate" + (" (per step)" if lr_unit == "step" else " (end of epoch)"))
    for ax, name, unit in zip(axes, titles, ("epoch", "epoch", lr_unit), strict=True):
        ax.set_title(name)
        ax.set_xlabel(unit)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    if title:
        fig.suptitle(title)
    return fig


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, title: str | None = None) -> Path:
    """Draw a training run's curves (:func:`run_figure`) to a PNG (default ``run_dir/curves.png``), titled with
    ``title`` (default: the run folder as given)."""
    plt = _pyplot()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig = run_figure(read_metrics(run_dir), str(run_dir) if title is None else title)
    _save(fig, out)
    plt.close(fig)
    return out


def confusion_figure(confusion: Tensor, class_names: Sequence[str]) -> Any:
    """A confusion matrix (rows: true class, columns: predicted), normalized per row, with a labelled colour bar;
    counts are written in the cells for up to 20 classes, names on the axes for up to 50."""
    plt = _pyplot()
    counts = confusion.double()
    rates = counts / counts.sum(1, keepdim=True).clamp_min(1)
    n = len(class_names)
    side = min(40.0, max(5.0, 0.35 * n))
    fig, ax = plt.subplots(figsize=(side, side), layout="constrained")
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 50:
        ax.set_xticks(range(n), class_names, rotation=90)
        ax.set_yticks(range(n), class_names)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046).set_label("fraction of the true class's images")
    return fig


def plot_confusion(confusion: Tensor, class_names: Sequence[str], out: str | os.PathLike) -> Path:
    """Draw :func:`confusion_figure` to an image file."""
    plt = _pyplot()
    fig = confusion_figure(confusion, class_names)
    _save(fig, out)
    plt.close(fig)
    return Path(out)
