"""Data loading: plain and archived image folders (unpacked once, even by racing processes; unsafe archives refused
wherever they are), colour modes, EXIF orientation and the kinds of image file read alike everywhere, unreadable
images skipped or fatal, class folders without a readable image refused."""

from __future__ import annotations

import io
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from imagefolders import make_dataset, make_split
from repvgg import create_model, save_checkpoint
from repvgg.cli import main
from repvgg.deploy.predict import predict
from repvgg.deploy.quantize import calibration_batches
from repvgg.errors import RepVGGError
from repvgg.files import TMP_SUFFIX
from repvgg.models.preprocess import eval_transform, to_rgb
from repvgg.training.data import (
    BadImage,
    ImageFolder,
    check_bad,
    collate,
    read_image,
    resolve_split,
    train_transform,
    unpack_archive,
)

PREPROCESS = {"resize": 16, "crop": 16}


def _tar(src: Path, archive: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz" if archive.name.endswith("gz") else "w") as tar:
        tar.add(src, arcname=arcname)
    return archive


def test_resolve_split_plain_folders(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "d", train=2, val=1)
    assert resolve_split(data, ("train",)) == data / "train"
    assert resolve_split(data, ("val", "test")) == data / "val"
    with pytest.raises(RepVGGError, match="no test folder"):
        resolve_split(data, ("test",))
    with pytest.raises(RepVGGError, match="data not found"):
        resolve_split(tmp_path / "missing", ("train",))


def test_split_archives_unpack_once_into_cache(tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src", train=2, val=1)
    data = tmp_path / "archives"
    data.mkdir()
    _tar(src / "train", data / "train.tar.gz", "train")
    _tar(src / "val", data / "test.tar", "test")
    cache = tmp_path / "cache"
    train = resolve_split(data, ("train",), cache)
    test = resolve_split(data, ("val", "test"), cache)
    assert train.name == "train" and test.name == "test" and cache in train.parents
    assert len(ImageFolder(train).samples) == 6 and ImageFolder(test).classes == ["class0", "class1", "class2"]
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.rglob("*") if p.is_file() or p.is_dir()}
    assert resolve_split(data, ("train",), cache) == train
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.rglob("*") if p.is_file() or p.is_dir()}
    renewed = {p for p in before if before[p] != after[p]}
    assert after.keys() == before.keys() and renewed == {train.parent}  # not unpacked again; its use recorded


def test_whole_dataset_archive(tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src", train=2, val=1)
    archive = _tar(src, tmp_path / "mydata.tar.gz", "mydata")
    assert resolve_split(archive, ("train",), tmp_path / "cache").parts[-2:] == ("mydata", "train")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(RepVGGError, match=r"folder or a \.tar"):
        resolve_split(tmp_path / "notes.txt", ("train",))


def test_corrupt_archive_is_reported_and_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "train.tar.gz"
    bad.write_bytes(b"not a tar file at all")
    cache = tmp_path / "cache"
    with pytest.raises(RepVGGError, match="cannot unpack"):
        unpack_archive(bad, cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def _unsafe_tar(archive: Path, images: Path, arcname: str) -> Path:
    """A tar of ``images`` plus a member that would land outside the folder it is unpacked into."""
    with tarfile.open(archive, "w") as tar:
        tar.add(images, arcname=arcname)
        escape = tarfile.TarInfo("../escaped.txt")
        escape.size = 3
        tar.addfile(escape, io.BytesIO(b"bad"))
    return archive


def test_an_unsafe_split_archive_is_reported_not_taken_for_a_class_folder(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """A folder holding an unsafe train.tar (or val.tar): the unpacking error surfaces in quantize's calibration and
    in eval (it used to be swallowed, the folder then read as class folders: "Couldn't find any class folder")."""
    src = make_dataset(tmp_path / "src", train=2, val=1)
    calib = tmp_path / "calib"
    calib.mkdir()
    _unsafe_tar(calib / "train.tar", src / "train", "train")
    for call in (lambda: calibration_batches(calib, None, 4, str(tmp_path / "cache")),
                 lambda: resolve_split(calib, ("train", "val", "test"), tmp_path / "cache", fallback=True)):
        with pytest.raises(RepVGGError, match=r"cannot unpack .*train\.tar: '\.\./escaped\.txt' .* outside"):
            call()
    (calib / "train.tar").rename(calib / "val.tar")
    save_checkpoint(create_model("repvgg_a0", num_classes=3, deploy=True).eval(), tmp_path / "a0.pth")
    assert main(["eval", "--data", str(calib), "--checkpoint", str(tmp_path / "a0.pth"), "--workers", "0",
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    assert re.search(r"cannot unpack .*val\.tar: '\.\./escaped\.txt' .* outside", capsys.readouterr().err)
    assert not (tmp_path / "escaped.txt").exists()


def test_the_fallback_is_the_folder_or_archive_of_class_folders_itself(tmp_path: Path) -> None:
    src = make_split(tmp_path / "src", "train", 2)
    assert resolve_split(src, ("val", "test"), fallback=True) == src
    archive = _tar(src, tmp_path / "classes.tar", ".")
    root = resolve_split(archive, ("train", "val", "test"), tmp_path / "cache", fallback=True)
    assert ImageFolder(root).classes == ["class0", "class1", "class2"]
    assert len(calibration_batches(archive, None, 5, str(tmp_path / "cache"))[0]) == 5
    with pytest.raises(RepVGGError, match="no val or test folder"):
        resolve_split(src, ("val", "test"))


def _unpack(args: tuple[str, str]) -> str:
    return str(unpack_archive(*args))


def test_concurrent_unpack_is_safe(tmp_path: Path) -> None:
    src = make_split(tmp_path / "src", "train", 30)
    archive = _tar(src, tmp_path / "train.tar.gz", "train")
    copy = shutil.copy(archive, tmp_path / "src" / "train.tar.gz")  # same content, another path: another lock
    cache = tmp_path / "cache"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_unpack, [(str(archive), str(cache)), (str(copy), str(cache))] * 2)
    assert len(set(results)) == 1
    folders = [p for p in cache.iterdir() if p.is_dir()]
    assert folders == [Path(results[0])]  # one extraction, no temporary leftovers
    assert len(list(Path(results[0]).rglob("*.png"))) == 90


def test_an_unpack_killed_midway_leaves_debris_the_next_unpack_removes(tmp_path: Path) -> None:
    """A killed unpack's half-filled folder carries the temporary rule's name (never the final one), and the next
    unpack of that content removes it once its process is gone; a live process's is left alone."""
    archive = _tar(make_split(tmp_path / "src", "train", 2), tmp_path / "train.tar.gz", "train")
    cache = tmp_path / "cache"
    final = unpack_archive(archive, cache)
    shutil.rmtree(final)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = cache / f".{final.name}.{int(gone.stdout)}-ab12{TMP_SUFFIX}"
    live = cache / f".{final.name}.{os.getpid()}-cd34{TMP_SUFFIX}"
    for debris in (dead, live):
        (debris / "train" / "class0").mkdir(parents=True)
    assert unpack_archive(archive, cache) == final and final.is_dir()
    assert not dead.exists() and live.is_dir()
    assert [p.name for p in cache.iterdir() if TMP_SUFFIX in p.name] == [live.name]


def test_an_archive_copied_anew_reuses_its_unpacked_folder(tmp_path: Path) -> None:
    """The unpacked folder follows the archive's content: a new modification time or another path reuses it (it used
    to unpack again beside the old copy, and the decoded-image cache keyed by its files followed); new content does
    not; a damaged digest memo is read again from the archive."""
    archive = _tar(make_split(tmp_path / "src", "train", 2), tmp_path / "train.tar.gz", "train")
    cache = tmp_path / "cache"
    first = unpack_archive(archive, cache)
    os.utime(archive, ns=(1_000_000_000, 1_000_000_000))
    assert unpack_archive(archive, cache) == first
    copy = tmp_path / "elsewhere" / "train.tar.gz"
    copy.parent.mkdir()
    shutil.copy(archive, copy)
    assert unpack_archive(copy, cache) == first
    for memo in cache.glob("*.sha256"):
        memo.write_text("not a digest")
    assert unpack_archive(copy, cache) == first
    assert [p for p in cache.iterdir() if p.is_dir()] == [first]
    (tmp_path / "src" / "train" / "class0" / "000.png").unlink()
    changed = unpack_archive(_tar(tmp_path / "src" / "train", archive, "train"), cache)
    assert changed != first and len(list(changed.rglob("*.png"))) == len(list(first.rglob("*.png"))) - 1


def test_grayscale_rgba_palette_become_rgb(tmp_path: Path) -> None:
    folder = tmp_path / "split" / "a"
    folder.mkdir(parents=True)
    Image.new("L", (20, 16), 128).save(folder / "gray.png")
    Image.new("RGBA", (16, 20), (10, 20, 30, 40)).save(folder / "rgba.png")
    Image.new("P", (16, 16)).save(folder / "palette.png")
    Image.new("RGB", (16, 16)).save(folder / "cmyk.jpg")
    for transform in (eval_transform(PREPROCESS), train_transform(16, "pad"), train_transform(16, auto_augment="rand")):
        dataset = ImageFolder(tmp_path / "split", transform)
        for i in range(len(dataset)):
            image, target = dataset[i]
            assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and target == 0


def _with_bad_images(tmp_path: Path) -> Path:
    root = make_split(tmp_path, "train", 3)
    (root / "class1" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    good = (root / "class2" / "000.png").read_bytes()
    (root / "class2" / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


def test_bad_images_are_skipped_and_counted(tmp_path: Path) -> None:
    dataset = ImageFolder(_with_bad_images(tmp_path), eval_transform(PREPROCESS))
    reports: list[str] = []
    good = skipped = 0
    for batch in DataLoader(dataset, batch_size=4, collate_fn=collate):
        skipped += check_bad(batch, "skip", reports.append)
        good += len(batch)
        assert batch.images.shape[0] == len(batch.targets)
    assert (good, skipped) == (9, 2)
    assert any("garbage.png" in r for r in reports) and any("truncated.png" in r for r in reports)


def test_bad_images_can_be_fatal(tmp_path: Path) -> None:
    dataset = ImageFolder(_with_bad_images(tmp_path), eval_transform(PREPROCESS))
    with pytest.raises(RepVGGError, match=r"cannot read image .*(garbage|truncated)\.png"):
        for batch in DataLoader(dataset, batch_size=4, collate_fn=collate):
            check_bad(batch, "error")


def test_not_an_image_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RepVGGError, match="not an image folder"):
        ImageFolder(tmp_path / "empty")


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_deep_greyscale_is_scaled_not_clipped(tmp_path: Path, mode: str) -> None:
    """16-bit PNGs (and PIL's 32-bit int / float modes holding 16-bit values) keep their grey levels."""
    levels = np.linspace(0, 65535, 16 * 16).reshape(16, 16)
    if mode == "I;16B":
        image = Image.frombytes(mode, (16, 16), levels.astype(">u2").tobytes())
    else:
        image = Image.fromarray(levels.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    if mode == "I;16":
        image.save(tmp_path / "deep.png")
        image = Image.open(tmp_path / "deep.png")
    assert image.mode == mode
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    np.testing.assert_allclose(rgb[..., 0], levels / 257, atol=1)


def test_float_images_in_unit_range_and_8bit_scale() -> None:
    unit = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    np.testing.assert_allclose(np.asarray(to_rgb(Image.fromarray(unit)))[..., 1], unit * 255, atol=1)
    eight_bit = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    assert np.array_equal(np.asarray(to_rgb(eight_bit.convert("I"))), np.asarray(to_rgb(eight_bit)))


def test_symlink_cycle_counts_each_image_once(tmp_path: Path) -> None:
    root = make_split(tmp_path, "train", 3)
    (root / "class0" / "sub").mkdir()
    (root / "class0" / "sub" / "loop").symlink_to(root / "class0", target_is_directory=True)
    (root / "class1" / "again").symlink_to(root / "class1", target_is_directory=True)
    (root / "class2" / "copy.png").symlink_to(root / "class2" / "000.png")
    (root / "class2" / "elsewhere").symlink_to(root / "class0", target_is_directory=True)  # followed: no cycle
    samples = ImageFolder(root).samples
    assert [sum(t == c for _, t in samples) for c in range(3)] == [3, 3, 6]
    assert len({p for p, _ in samples}) == len(samples)


def test_a_class_folder_without_a_readable_image_is_refused(tmp_path: Path) -> None:
    """All of a class's files corrupt: the class used to vanish from training and scoring alike, so that a two-class
    run reported val top-1 100%. Now the folder is named."""
    root = make_split(tmp_path, "train", 3)
    for path in (root / "class1").iterdir():
        path.write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    with pytest.raises(RepVGGError, match=r"class folder .*train/class1 has no readable image: none of its 3 image "
                                          r"files decodes \(the first: .*class1/000\.png: cannot identify"):
        ImageFolder(root)
    (root / "class1" / "001.png").write_bytes((root / "class0" / "000.png").read_bytes())
    assert len(ImageFolder(root)) == 9  # one readable image is enough; the others are skipped when read
    for path in (root / "class2").iterdir():
        path.rename(path.with_suffix(".txt"))
    with pytest.raises(RepVGGError, match=r"class folder .*train/class2 holds no image file \(the kinds read are "
                                          r"\.bmp, \.gif"):
        ImageFolder(root)


def _exif_oriented(path: Path) -> np.ndarray:
    """Save a 16x16 image, red on top and blue below, tagged EXIF orientation 6 (shown turned 90 degrees clockwise,
    as a camera held upright stores it); returns the pixels as they are meant to be seen."""
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:8, :, 0] = 255
    pixels[8:, :, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif)
    return np.rot90(pixels, k=-1)


class RedSide(nn.Module):
    """Two logits: the mean red of the image's top half and of its right half."""

    num_classes = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 0, :8, :].mean((1, 2)), x[:, 0, :, 8:].mean((1, 2))], dim=1)


def test_exif_orientation_is_applied_by_every_reader(tmp_path: Path) -> None:
    (tmp_path / "split" / "a").mkdir(parents=True)
    upright = _exif_oriented(tmp_path / "split" / "a" / "photo.png")
    assert np.array_equal(np.asarray(read_image(tmp_path / "split" / "a" / "photo.png")), upright)
    image, _ = ImageFolder(tmp_path / "split", eval_transform(PREPROCESS))[0]
    expected = eval_transform(PREPROCESS)(Image.fromarray(upright))
    assert torch.equal(image, expected)
    meta = {"preprocess": PREPROCESS, "class_names": ["red on top", "red on the right"]}
    for source in (tmp_path / "split" / "a" / "photo.png", Image.open(tmp_path / "split" / "a" / "photo.png")):
        assert predict(RedSide(), [source], "torch", meta, topk=1)[0][0][0] == "red on the right"


def test_every_reader_reads_the_same_kinds_of_file(tmp_path: Path) -> None:
    """A .gif in a class folder used to be left out by train and eval while predict read it."""
    root = make_split(tmp_path, "train", 1)
    Image.new("P", (16, 16), 3).save(root / "class0" / "anim.gif")
    (root / "class0" / "notes.txt").write_text("not an image")
    dataset = ImageFolder(root, eval_transform(PREPROCESS))
    assert sorted(Path(p).name for p, _ in dataset.samples) == ["000.png", "000.png", "000.png", "anim.gif"]
    assert all(not isinstance(dataset[i], BadImage) for i in range(len(dataset)))
    meta = {"preprocess": PREPROCESS}
    assert len(predict(RedSide(), [root / "class0" / "anim.gif"], "torch", meta)[0]) == 2
    with pytest.raises(RepVGGError, match=r"notes\.txt is not an image file: the kinds read are \.bmp, \.gif"):
        predict(RedSide(), [root / "class0" / "notes.txt"], "torch", meta)


def test_an_error_in_a_transform_is_raised_not_counted_as_an_unreadable_image(tmp_path: Path) -> None:
    make_split(tmp_path, "val", 1)

    def broken(image):
        raise ValueError("a bug in the transform")

    dataset = ImageFolder(tmp_path / "val", broken)
    with pytest.raises(ValueError, match="a bug in the transform"):
        dataset[0]
