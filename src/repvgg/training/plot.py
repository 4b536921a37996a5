"""Plots (matplotlib, the ``repvgg[plot]`` extra): a run's training curves and a confusion matrix."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from ..files import atomic_write
from ..optional import require
from .metrics import read_metrics

__all__ = ["plot_run", "plot_confusion"]


def _pyplot() -> Any:
    require("matplotlib").use("Agg")
    return require("matplotlib.pyplot")


def _save(fig: Any, path: str | os.PathLike) -> None:
    suffix = Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=suffix, dpi=120, bbox_inches="tight"))


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw loss, top-1 and learning-rate curves of a training run to a PNG (default ``run_dir/curves.png``)."""
    plt = _pyplot()
    rows = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "curves.png"
    epochs = [r["epoch"] for r in rows]

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        return [e for e, _ in pts], [v for _, v in pts]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(epochs, [r["train_loss"] for r in rows], label="train", marker=".")
    axes[0].plot(*series("val_loss"), label="val", marker=".")
    axes[1].plot(*series("val_top1"), label="val", marker=".")
    if any("ema_val_top1" in r for r in rows):
        axes[1].plot(*series("ema_val_top1"), label="val (EMA)", marker=".")
    axes[2].plot(epochs, [r["lr"] for r in rows], marker=".")
    for ax, title in zip(axes, ("loss", "top-1 (%)", "learning rate (end of epoch)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.suptitle(str(run_dir))
    _save(fig, out)
    plt.close(fig)
    return out


def plot_confusion(confusion: Tensor, class_names: Sequence[str], out: str | os.PathLike) -> Path:
    """Draw a confusion matrix (rows: true class, columns: predicted), normalized per row, to an image file."""
    plt = _pyplot()
    counts = confusion.double()
    rates = counts / counts.sum(1, keepdim=True).clamp_min(1)
    n = len(class_names)
    side = min(40.0, max(5.0, 0.35 * n))
    fig, ax = plt.subplots(figsize=(side, side))
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
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, out)
    plt.close(fig)
    return Path(out)
