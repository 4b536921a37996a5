"""A run's per-epoch metrics: written to metrics.jsonl, metrics.csv and TensorBoard; read back for plots."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import RepVGGError
from ..files import appending
from ..optional import is_installed

__all__ = ["MetricsLog", "read_metrics", "CSV_FIELDS", "METRICS_FILES"]

METRICS_FILES = ("metrics.jsonl", "metrics.csv")

CSV_FIELDS = ("epoch", "train_loss", "lr", "train_images_per_s", "train_time_s", "val_loss", "val_top1", "val_top5",
              "ema_val_top1", "ema_val_loss", "epoch_time_s", "skipped_images")


class MetricsLog:
    """Appends one row per epoch to metrics.jsonl and metrics.csv, and TensorBoard scalars when installed."""

    def __init__(self, out_dir: Path, tensorboard: bool, log: Callable[[str], None] = print) -> None:
        self.out_dir = out_dir
        self.writer = None
        if tensorboard and not is_installed("tensorboard"):
            log("TensorBoard is not installed: metrics go to metrics.jsonl and metrics.csv only "
                "(pip install 'repvgg[tensorboard]', or pass --no-tensorboard to silence this)")
        elif tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        with appending(self.out_dir / "metrics.jsonl") as f:
            f.write(json.dumps(row) + "\n")
        csv_path = self.out_dir / "metrics.csv"
        new = not csv_path.exists()
        with appending(csv_path, newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
        if self.writer:
            for k, v in row.items():
                if isinstance(v, int | float) and k != "epoch":
                    self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch rows of ``run_dir/metrics.jsonl``, one per epoch (the latest wins after a resume).

    A line cut short by a kill mid-write, or one that is not an epoch row, is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RepVGGError(f"no metrics.jsonl in {run_dir} (is it a `repvgg train` run directory?)")
    rows: dict[int, dict[str, Any]] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows[row["epoch"]] = row
    if not rows:
        raise RepVGGError(f"{path} holds no epoch rows yet")
    return [rows[e] for e in sorted(rows)]
