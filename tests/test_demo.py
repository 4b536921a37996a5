"""The demo's embedded data set: scikit-learn's digits as normalized 3-channel tensors, split per class."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from repvgg.commands import demo
from repvgg.training import digits
from repvgg.training.digits import digits_datasets


def test_digits_datasets() -> None:
    pytest.importorskip("sklearn")
    train, test, classes = digits_datasets()
    assert (len(train), len(test), classes) == (1437, 360, [str(d) for d in range(10)])
    image, target = train[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and 0 <= target < 10
    assert test.images.min() >= -1 and test.images.max() <= 1
    assert torch.bincount(test.targets).min() >= 35  # stratified
    train5, test5, classes5 = digits_datasets(classes=5)  # the demo's pre-training subset
    assert classes5 == ["0", "1", "2", "3", "4"] and int(train5.targets.max()) == 4 and len(test5) < len(test)


def test_interrupted_demo_does_not_point_into_its_deleted_folder(monkeypatch, capsys) -> None:
    """Training saves on Ctrl-C and names the file; the demo's folder is gone by then, so the demo says so instead."""
    folders = []

    def interrupted(out_dir: str, epochs: int, log, **options) -> None:
        folders.append(out_dir)
        log(f"interrupted; saved epoch 1 step 3 to {out_dir}/last.pt (continue with --resume)")
        raise KeyboardInterrupt

    monkeypatch.setattr(digits, "train_digits", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.run(None, None)
    out = capsys.readouterr().out
    assert folders and str(folders[0]) not in out and not Path(folders[0]).exists()
    assert "demo interrupted: it keeps no files" in out


def test_demo_hides_lines_about_its_temporary_files(monkeypatch, capsys) -> None:
    """Files written into the demo's temporary folder are deleted at its end: no line may name them."""
    def quick(out_dir: str, epochs: int, log, **options) -> dict:
        log(f"wrote {out_dir}/model.pth and {out_dir}/model_deploy.pth")
        log("epoch 1/1: train loss 0.5")
        raise KeyboardInterrupt

    monkeypatch.setattr(digits, "train_digits", quick)
    with pytest.raises(KeyboardInterrupt):
        demo.run(None, None)
    out = capsys.readouterr().out
    assert "epoch 1/1: train loss 0.5" in out and "model.pth" not in out
