"""The metrics log: rows written per epoch are read back, a row cut short by a kill is skipped, the latest row of
an epoch wins after a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from repvgg.errors import RepVGGError
from repvgg.training.metrics import MetricsLog, read_metrics


def test_rows_round_trip_and_the_latest_row_of_an_epoch_wins(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, tensorboard=False)
    for epoch, loss in ((1, 2.0), (2, 1.5), (2, 1.4)):
        log.write({"epoch": epoch, "train_loss": loss, "lr": 0.1})
    log.close()
    assert [(r["epoch"], r["train_loss"]) for r in read_metrics(tmp_path)] == [(1, 2.0), (2, 1.4)]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0].startswith("epoch,train_loss,lr")


def test_a_half_written_or_odd_line_is_skipped(tmp_path: Path) -> None:
    rows = [json.dumps({"epoch": 1, "train_loss": 2.0}), "[1, 2]", json.dumps({"loss": 3}), "",
            json.dumps({"epoch": 2, "train_loss": 1.0})[:15]]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows))
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1]
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "tr')
    with pytest.raises(RepVGGError, match="holds no epoch rows yet"):
        read_metrics(tmp_path)
