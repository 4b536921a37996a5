"""The in-memory data path: batches equal to the loader path's bit for bit (training augmentation and evaluation),
the decoded-image cache, the automatic choice and its limits, unreadable images, and training and resuming on it
(resume with signals sent from outside, switching paths between stops, is in test_resume.py)."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision.transforms.v2 import functional as v2f

from imagefolders import TINY_ARCH, TINY_TRAIN, make_dataset
from repvgg.cache import cache_dir
from repvgg.cli import main
from repvgg.errors import Interrupted, RepVGGError
from repvgg.models.preprocess import eval_transform
from repvgg.training import memory
from repvgg.training.data import ImageFolder, collate, train_transform
from repvgg.training.memory import InMemoryEval, InMemoryTrain, NotSquare, hold_in_memory, memory_batches
from repvgg.training.options import Callback, TrainOptions
from repvgg.training.recipes import Recipe, preprocess_of, recipe_with
from repvgg.training.sampling import SeededSamples, alternating_flip, fixed_subset
from repvgg.training.setup import load_datasets
from repvgg.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = recipe_with("cifar", epochs=2, batch_size=8, img_size=16, eval_resize=16, strides=(2, 2, 2, 2, 2),
                   warmup_epochs=0)


def _rgb(path: Path, width: int, height: int, seed: int = 0) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """16-pixel class folders plus a larger square image (resized to the recipe's size) and an unreadable file."""
    root = make_dataset(tmp_path / "data", train=6, val=3)
    _rgb(root / "train" / "class1" / "large.png", 24, 24)
    (root / "train" / "class2" / "broken.png").write_bytes(b"not an image")
    return root


def _folders(data: Path, recipe: Recipe = TINY) -> tuple[ImageFolder, ImageFolder]:
    """The loader path's datasets, as ``load_datasets`` builds them."""
    return (ImageFolder(data / "train", train_transform(recipe.img_size, recipe.crop, cutout=recipe.cutout,
                                                        flip=recipe.flip, crop_pad=recipe.crop_pad)),
            ImageFolder(data / "val", eval_transform(preprocess_of(recipe))))


def _held(data: Path, logs: list[str] | None = None, recipe: Recipe = TINY) -> tuple[InMemoryTrain, InMemoryEval]:
    held = hold_in_memory(*_folders(data, recipe), recipe, "memory", "skip", (logs if logs is not None else []).append)
    assert held is not None
    return held


def _same(loader_batches, memory_batches_) -> None:
    pairs = list(zip(loader_batches, memory_batches_, strict=True))
    assert pairs
    for a, b in pairs:
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
        assert [x.path for x in a.bad] == [x.path for x in b.bad]


@pytest.mark.parametrize(("cutout", "crop", "flip", "crop_pad"), [
    (0, "pad", "random", None), (5, "pad", "random", None), (0, "pad_reflect", "random", None),
    (5, "pad_reflect", "alternate", None), (0, "pad", "random", 0), (5, "pad_reflect", "random", 5)])
def test_batches_equal_the_loader_path_bit_for_bit(data: Path, cutout: int, crop: str, flip: str,
                                                   crop_pad: int | None) -> None:
    """Every sample's crop offset, flip and cutout place come from its own (seed, epoch, index) generator, so a batch
    built from memory is the loader's batch exactly, with either border, any padding and either flip, in every
    epoch, in any order, unreadable images set aside alike."""
    recipe = dataclasses.replace(TINY, cutout=cutout, crop=crop, flip=flip, crop_pad=crop_pad)
    folder, val_folder = _folders(data, recipe)
    held, held_val = _held(data, recipe=recipe)
    assert held.images.shape == (len(folder), 3, 16, 16) and held.classes == folder.classes
    first: list[torch.Tensor] = []
    alternate = flip == "alternate"
    for epoch in (0, 5):
        loaded, decoded = SeededSamples(folder, 3, alternate), SeededSamples(held, 3, alternate)
        loaded.set_epoch(epoch)
        decoded.set_epoch(epoch)
        order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(epoch)).tolist()
        _same(DataLoader(loaded, batch_size=5, sampler=order, collate_fn=collate),
              memory_batches(decoded, order, 5, drop_last=False))
        assert torch.equal(loaded[7][0], decoded[7][0])  # one sample alone, as a loader worker reads it
        first.append(next(memory_batches(decoded, range(8), 8, drop_last=True)).images)
    assert not torch.equal(*first)  # another epoch, other crops and flips
    erased = (first[0] == 0).all(dim=1).flatten(1).sum(1)  # pixels zero in every channel: the cutout square
    assert erased.tolist() == [cutout * cutout] * 8
    _same(DataLoader(val_folder, batch_size=4, collate_fn=collate), memory_batches(held_val, range(len(held_val)), 4,
                                                                                   drop_last=False))


def test_the_crop_padding_bounds_the_shift(data: Path) -> None:
    """``crop_pad`` is the largest shift of the pad crop: with 0 each training image is the decoded one or its
    mirror image; with 1 a crop's every pixel lies at most one pixel from where it was."""
    for crop_pad in (0, 1):
        held, _ = _held(data, recipe=dataclasses.replace(TINY, crop="pad_reflect", cutout=0, crop_pad=crop_pad))
        seeded = SeededSamples(held, 3)
        plain = v2f.normalize_image(v2f.to_dtype_image(held.images, torch.float32, scale=True), held.mean, held.std)
        for i in (i for i in range(len(held)) if i not in held.bad):
            image = seeded[i][0]
            shifted = [torch.roll(view, (dy, dx), (1, 2))[:, 1:-1, 1:-1] for view in (plain[i], plain[i].flip(-1))
                       for dy in range(-crop_pad, crop_pad + 1) for dx in range(-crop_pad, crop_pad + 1)]
            assert any(torch.equal(image[:, 1:-1, 1:-1], view) for view in shifted)


def test_the_alternating_flip_mirrors_each_image_every_other_epoch(data: Path) -> None:
    """A random half of the images (another half for another seed) come mirrored in even epochs, the other half in
    odd ones: the finished image of the per-image transform, which itself draws no flip then."""
    assert [alternating_flip(0, e, 5) for e in range(4)] in ([True, False, True, False], [False, True, False, True])
    first = [alternating_flip(0, 0, i) for i in range(2000)]
    assert 900 < sum(first) < 1100 and first != [alternating_flip(1, 0, i) for i in range(2000)]
    assert [alternating_flip(0, 1, i) for i in range(2000)] == [not m for m in first]
    recipe = dataclasses.replace(TINY, crop="pad_reflect", flip="alternate")
    held, _ = _held(data, recipe=recipe)
    seeded = SeededSamples(held, 3, alternate_flip=True)
    unseeded = SeededSamples(held, 3)
    for epoch in (0, 1):
        seeded.set_epoch(epoch)
        unseeded.set_epoch(epoch)
        for i in range(8):
            image, own = seeded[i][0], unseeded[i][0]
            assert torch.equal(image, own.flip(-1) if alternating_flip(3, epoch, i) else own)


def test_a_subset_of_a_held_set_keeps_each_samples_seed(data: Path) -> None:
    """A study's fixed subset (``fixed_subset``) of a set held in memory is batched from memory, seeded by the
    index within the subset as a loader would seed it."""
    folder, _ = _folders(data)
    held, _ = _held(data)
    loaded = SeededSamples(fixed_subset(folder, 9, seed=1), seed=0)
    decoded = SeededSamples(fixed_subset(held, 9, seed=1), seed=0)
    assert isinstance(decoded.dataset, Subset)
    _same(DataLoader(loaded, batch_size=4, sampler=range(9), collate_fn=collate),
          memory_batches(decoded, range(9), 4, drop_last=False))


def test_decoded_images_are_cached_by_file_contents_and_settings(data: Path) -> None:
    logs: list[str] = []
    first, _ = _held(data, logs)
    assert sum("decoding the" in line for line in logs) == 2
    logs.clear()
    again, _ = _held(data, logs)  # the cache: nothing decoded
    assert not any("decoding the" in line for line in logs) and torch.equal(first.images, again.images)
    assert again.bad.keys() == first.bad.keys() and next(iter(again.bad.values())).path.endswith("broken.png")
    changed = data / "train" / "class0" / "000.png"
    _rgb(changed, 16, 16, seed=9)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    logs.clear()
    third, _ = _held(data, logs)
    assert sum("decoding the" in line for line in logs) == 1  # the training folder changed, the validation one not
    assert not torch.equal(third.images, first.images)
    for cached in (cache_dir("decoded")).glob("train-*.pt"):
        cached.write_bytes(b"truncated")
    logs.clear()
    assert torch.equal(_held(data, logs)[0].images, third.images)
    assert sum("decoding the" in line for line in logs) == 1  # a broken cache file is decoded again


def test_a_cache_that_cannot_be_written_is_only_noted(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(path: Path, write: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(memory, "atomic_write", full_disk)
    for _ in range(2):  # nothing was cached: the second time decodes again
        logs: list[str] = []
        assert len(_held(data, logs)[0]) == 20
        assert sum("decoding the" in line for line in logs) == 2
        assert any(line.startswith("note: the decoded images could not be cached (") and "No space left on device"
                   in line and line.endswith("the next run decodes them again") for line in logs)


def test_auto_chooses_memory_when_the_recipe_and_the_memory_allow(data: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    folders = _folders(data)
    logs: list[str] = []
    assert hold_in_memory(*folders, TINY, "auto", "skip", logs.append) is not None
    assert "data: in memory" in logs[-1]
    assert hold_in_memory(*folders, TINY, "loader", "skip", logs.append) is None
    for recipe, why in ((dataclasses.replace(TINY, crop="random_resized"), "random-resized crop"),
                        (dataclasses.replace(TINY, auto_augment="rand"), "RandAugment")):
        logs.clear()
        assert hold_in_memory(*folders, recipe, "auto", "skip", logs.append) is None
        assert logs == [f"data: loading processes, as the recipe's {why} runs per image"]
        with pytest.raises(RepVGGError, match=f"--data-path memory: the recipe's {why} runs per image"):
            hold_in_memory(*folders, recipe, "memory", "skip", logs.append)
    needed = memory.decoded_bytes(TINY, len(folders[0]), len(folders[1]))
    assert needed == 3 * 16 * 16 * (len(folders[0]) + len(folders[1]))
    monkeypatch.setattr(memory, "available_memory", lambda: int(needed / memory.MEMORY_SHARE) - 1)
    logs.clear()
    assert hold_in_memory(*folders, TINY, "auto", "skip", logs.append) is None
    assert "exceed 25% of the available memory" in logs[0]
    assert hold_in_memory(*folders, TINY, "memory", "skip", logs.append) is not None  # forced: past the share
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this machine each hold a copy
    monkeypatch.setattr(memory, "available_memory", lambda: int(needed / memory.MEMORY_SHARE) + 1)
    assert hold_in_memory(*folders, TINY, "auto", "skip", logs.append) is None


def test_available_memory_is_read_from_the_system() -> None:
    assert 0 < memory.available_memory() < os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_non_square_training_images_go_to_the_loader(data: Path) -> None:
    """The loader crops a non-square image at a random place along its longer side, which a square store cannot
    reproduce: auto falls back to the loader, a forced memory path says why."""
    _rgb(data / "train" / "class0" / "wide.png", 32, 16)
    logs: list[str] = []
    assert hold_in_memory(*_folders(data), TINY, "auto", "skip", logs.append) is None
    assert "wide.png is 32x16 pixels at the recipe's size 16" in logs[-1] and "loading processes" in logs[-1]
    with pytest.raises(NotSquare, match="the in-memory path holds square training images"):
        hold_in_memory(*_folders(data), TINY, "memory", "skip", logs.append)


def test_unreadable_images_are_known_before_training(data: Path) -> None:
    with pytest.raises(RepVGGError, match=r"cannot read image .*broken\.png: .* --bad-images skip"):
        hold_in_memory(*_folders(data), TINY, "memory", "error", lambda s: None)


def _opts(data: Path, out: Path, **kw) -> TrainOptions:
    kw = {"model": TINY_ARCH, "workers": 0, "amp": "none", "channels_last": False, "probe": False,
          "tensorboard": False, "log": lambda s: None, "recipe": TINY, **kw}
    return TrainOptions(data=str(data), out_dir=str(out), **kw)


class StopAt(Callback):
    """Sends this process SIGTERM after optimizer step ``step`` (1-based) of ``epoch`` (0-based)."""

    def __init__(self, epoch: int, step: int) -> None:
        self.at = (epoch, step)

    def on_step_end(self, epoch: int, step: int) -> None:
        if (epoch, step) == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "last.pt", weights_only=True)["model"]


def test_both_paths_train_to_the_same_weights_and_a_resume_is_exact(data: Path, tmp_path: Path) -> None:
    """The same run on either path ends bit-identical, the unreadable image skipped alike; stopped mid-epoch and
    resumed in memory, it ends there too (stops and resumes that switch paths: test_resume.py)."""
    recipe = dataclasses.replace(TINY, mixup=0.4, ema_decay=0.5)
    logs: list[str] = []
    train(_opts(data, tmp_path / "memory", recipe=recipe, data_path="memory", log=logs.append))
    assert any(line.startswith("data: in memory") for line in logs)
    train(_opts(data, tmp_path / "loader", recipe=recipe, data_path="loader"))
    reference = _weights(tmp_path / "loader")
    assert all(torch.equal(reference[k], v) for k, v in _weights(tmp_path / "memory").items())
    rows = {d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("memory", "loader")}
    assert [r["skipped_images"] for r in rows["memory"]] == [r["skipped_images"] for r in rows["loader"]] == [1, 2]
    split = tmp_path / "split"
    with pytest.raises(Interrupted):
        train(_opts(data, split, recipe=recipe, data_path="memory", callbacks=[StopAt(1, 1)]))
    assert torch.load(split / "last.pt", weights_only=True)["progress"]["step"] == 1
    train(_opts(data, split, recipe=recipe, data_path="memory", resume="auto"))
    assert all(torch.equal(reference[k], v) for k, v in _weights(split).items())


def test_datasets_loaded_by_load_datasets_train_from_memory(data: Path, tmp_path: Path) -> None:
    """Studies and ``qat`` load the sets first and pass them to train(); a forced memory path refuses other sets."""
    opts = _opts(data, tmp_path / "run", data_path="memory")
    train_set, val_set, classes = load_datasets(opts)
    assert isinstance(train_set, InMemoryTrain) and isinstance(val_set, InMemoryEval)
    assert train(opts, fixed_subset(train_set, 16), val_set, classes)["epochs"] == 2
    folders = _folders(data)
    with pytest.raises(RepVGGError, match="--data-path memory decodes the image folders of --data"):
        train(_opts(data, tmp_path / "other", data_path="memory"), *folders, classes)


def test_the_command_line_flag(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (data / "train" / "class2" / "broken.png").unlink()
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "a"), "--epochs", "1", "--data-path",
                 "memory", *TINY_TRAIN]) == 0
    assert "data: in memory" in capsys.readouterr().out
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "b"), "--epochs", "1", "--data-path",
                 "memory", "--crop", "random_resized", *TINY_TRAIN]) == 2
    assert "--data-path memory: the recipe's random-resized crop runs per image" in capsys.readouterr().err
