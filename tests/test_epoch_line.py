"""The epoch line a training run prints says what its speed is measured against."""

from __future__ import annotations

from types import SimpleNamespace

from repvgg.training.loop import _write_epoch


def epoch_line(**row: float) -> str:
    """The line ``_write_epoch`` logs for a metrics row (no evaluation: nothing but ``last.pt`` is saved)."""
    lines: list[str] = []
    run = SimpleNamespace(progress=SimpleNamespace(epoch=3, total_epochs=15, best_top1=0.0, skipped_total=0),
                          metrics=None, save_state=lambda: None, log=lines.append)
    _write_epoch(run, {"train_loss": 0.5, "train_images_per_s": 150.0, "epoch_time_s": 60.0, **row}, None)
    return lines[0]


def test_the_epoch_line_names_the_float32_matmul_rate() -> None:
    """bf16 steps can run faster than float32 matmul: "193% of matmul" read as an error; the yardstick is named."""
    assert epoch_line(train_of_matmul=1.93) == ("epoch 3/15: train loss 0.5000, 150 img/s (193% of the float32 matmul "
                                                "rate), 60s")
    assert "matmul" not in epoch_line(train_of_matmul=None)
