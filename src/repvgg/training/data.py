"""Data: the one image reader (and the file kinds it reads), image folders (plain or archived), bad-image handling,
and training augmentation. What the network sees at evaluation (resize, crop, mean/std) is model metadata:
:mod:`repvgg.models.preprocess`."""

from __future__ import annotations

import fcntl
import hashlib
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import default_collate
from torchvision import datasets
from torchvision.transforms import v2

from ..cache import DATASETS, cache_dir, mark_used
from ..errors import RepVGGError
from ..files import atomic_folder, atomic_write, file_sha256
from ..models.preprocess import IMAGENET_PREPROCESS, to_rgb

__all__ = ["train_transform", "PADDING_MODES", "crop_padding",
           "resolve_split", "ImageFolder", "BadImage", "Batch", "collate", "check_bad", "unreadable", "unpack_archive",
           "default_cache_dir", "ARCHIVE_SUFFIXES", "IMAGE_EXTENSIONS", "READ_ERRORS", "is_image_file", "upright",
           "read_image"]

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
# The file kinds read as images, alike by training, evaluation, calibration and prediction (case-insensitive).
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jfif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
# What decoding a damaged or unsupported file can raise.
READ_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)
BadImagePolicy = Literal["skip", "error"]
DataPath = Literal["auto", "memory", "loader"]  # decoded images held in memory, or per-image loading processes
TrainCrop = Literal["random_resized", "pad", "pad_reflect"]
# The pad-and-crop kinds and the border each pads with (torchvision's padding_mode): zeros, or the image mirrored.
PADDING_MODES: dict[str, str] = {"pad": "constant", "pad_reflect": "reflect"}
AutoAugment = Literal["none", "rand", "auto"]
# Horizontal flip: drawn per image and epoch, or alternating (each image mirrored every other epoch, see
# repvgg.training.sampling.alternating_flip).
Flip = Literal["random", "alternate"]


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a file of a kind in :data:`IMAGE_EXTENSIONS`."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def upright(image: Image.Image) -> Image.Image:
    """``image`` as it is meant to be seen, in RGB: its EXIF orientation applied (cameras store photos as the sensor
    saw them and tag the rotation), as every viewer does."""
    return to_rgb(ImageOps.exif_transpose(image))


def read_image(path: str | os.PathLike) -> Image.Image:
    """The one image reader of training, evaluation, calibration and prediction: the file decoded, upright and RGB.

    Raises :class:`RepVGGError` for a file name outside :data:`IMAGE_EXTENSIONS` and one of :data:`READ_ERRORS`
    for a file that does not decode."""
    if not is_image_file(path):
        raise RepVGGError(f"{path} is not an image file: the kinds read are {', '.join(IMAGE_EXTENSIONS)}")
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
    return upright(image)


def crop_padding(img_size: int, crop_pad: int | None = None) -> int:
    """The border of the pad crops: ``crop_pad`` pixels, or an eighth of the side when None (4 for 32x32 images, as
    ResNet's CIFAR-10 crop); at least 0 and smaller than the side."""
    padding = img_size // 8 if crop_pad is None else crop_pad
    if not 0 <= padding < img_size:
        raise RepVGGError(f"crop padding {padding} must be at least 0 and smaller than the training crop side "
                          f"{img_size}")
    return padding


def train_transform(img_size: int, crop: TrainCrop = "random_resized", auto_augment: AutoAugment = "none",
                    mean: Sequence[float] = IMAGENET_PREPROCESS["mean"],
                    std: Sequence[float] = IMAGENET_PREPROCESS["std"], cutout: int = 0,
                    flip: Flip = "random", crop_pad: int | None = None) -> v2.Compose:
    """Training augmentation: random-resized crop (ImageNet) or a random crop of the image padded by
    :func:`crop_padding` (small images; zero or mirrored border), a random flip (the alternating one is
    SeededSamples'), optional RandAugment/AutoAugment, then a normalized float tensor with an optional cutout
    square."""
    if not 0 <= cutout < img_size:
        raise RepVGGError(f"cutout {cutout} must be at least 0 and smaller than the training crop side {img_size}")
    if crop_pad is not None and crop not in PADDING_MODES:
        raise RepVGGError(f"crop padding {crop_pad} applies to the pad crops ({', '.join(PADDING_MODES)}), not {crop}")
    steps: list[Callable] = [v2.Lambda(to_rgb), v2.ToImage()]
    if crop in PADDING_MODES:
        steps += [v2.Resize(img_size, antialias=True),
                  v2.RandomCrop(img_size, padding=crop_padding(img_size, crop_pad), padding_mode=PADDING_MODES[crop])]
    else:
        steps.append(v2.RandomResizedCrop(img_size, antialias=True))
    if flip == "random":
        steps.append(v2.RandomHorizontalFlip())
    if auto_augment == "rand":
        steps.append(v2.RandAugment())
    elif auto_augment == "auto":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if cutout:
        steps.append(cutout_transform(img_size, cutout))
    return v2.Compose(steps)


def cutout_transform(img_size: int, side: int) -> v2.RandomErasing:
    """Cutout (DeVries & Taylor, 2017): a ``side`` x ``side`` square set to 0 (the mean, after normalization) at a
    uniformly random place wholly inside the image, as torchvision's RandomErasing with one fixed area and shape."""
    area = side * side / (img_size * img_size)
    return v2.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0), value=0)


def default_cache_dir() -> Path:
    """Where archives are unpacked: ``datasets`` in the user cache folder (:func:`repvgg.cache.cache_dir`)."""
    return cache_dir(DATASETS)


def unpack_archive(archive: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Unpack a .tar/.tar.gz once into the cache and return the folder; safe when many processes race.

    The folder is named by the archive's content (its SHA-256, read once per path, size and modification time), so
    an archive copied anew reuses it. One process holds a file lock and extracts into a temporary folder that is
    renamed into place when complete; the others wait on the lock and then reuse the result.
    """
    archive = Path(archive).resolve()
    stat = archive.stat()
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    stem = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        stem = stem.removesuffix(suffix)
    seen = hashlib.sha1(f"{archive}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    memo = cache / f".{stem}-{seen}.sha256"
    with open(cache / f".{stem}-{seen}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kept = _read_digest(memo)
        try:
            digest = kept or file_sha256(archive)
        except OSError as e:
            raise RepVGGError(f"cannot read {archive}: {e.strerror or e}") from None
        final = cache / f"{stem}-{digest[:16]}"
        if not final.is_dir():
            _extract(archive, final)
        mark_used(final)
        if kept != digest:
            atomic_write(memo, digest)
    return final


def _read_digest(memo: Path) -> str | None:
    """The hex SHA-256 kept in ``memo``; None when it is missing or not one."""
    try:
        text = memo.read_text().strip()
    except OSError:
        return None
    return text if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else None


def _extract(archive: Path, final: Path) -> None:
    """Unpack ``archive`` into a temporary folder beside ``final``, renamed to it when whole (or dropped when another
    process unpacking the same content got there first)."""
    try:
        with atomic_folder(final) as tmp, tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
            os.rename(tmp, final)
    except (tarfile.TarError, OSError, EOFError) as e:
        if not final.is_dir():
            raise RepVGGError(f"cannot unpack {archive}: {e}") from None


def _find_dir(root: Path, name: str) -> Path | None:
    """``root/name`` or ``root/<one folder>/name``."""
    if (root / name).is_dir():
        return root / name
    found = [p / name for p in sorted(root.iterdir()) if p.is_dir() and (p / name).is_dir()]
    return found[0] if found else None


def resolve_split(data: str | os.PathLike, names: Sequence[str], cache_dir: str | os.PathLike | None = None,
                  fallback: bool = False) -> Path:
    """The ImageFolder root of the first split in ``names`` (e.g. ``("val", "test")``) under ``data``.

    ``data`` is a folder holding the split folders or ``<split>.tar[.gz]`` archives, or an archive holding them;
    with ``fallback``, ``data`` itself (unpacked) when it holds none of them. An archive that cannot be unpacked
    is an error either way.
    """
    data = Path(data)
    if not data.exists():
        raise RepVGGError(f"data not found: {data}")
    if data.is_file():
        if not data.name.endswith(ARCHIVE_SUFFIXES):
            raise RepVGGError(f"--data must be a folder or a .tar/.tar.gz archive, got {data}")
        data = unpack_archive(data, cache_dir)
    for name in names:
        if (data / name).is_dir():
            return data / name
        for suffix in ARCHIVE_SUFFIXES:
            if (data / f"{name}{suffix}").is_file():
                root = unpack_archive(data / f"{name}{suffix}", cache_dir)
                found = _find_dir(root, name)
                return found if found else root
        found = _find_dir(data, name)
        if found:
            return found
    if fallback:
        return data
    raise RepVGGError(f"no {' or '.join(names)} folder (or .tar/.tar.gz archive) in {data}")


@dataclass(frozen=True)
class BadImage:
    """A sample that could not be decoded, in place of ``(image, target)``."""

    path: str
    reason: str


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder read with :func:`read_image` (files of :data:`IMAGE_EXTENSIONS`), whose
    undecodable images come back as :class:`BadImage` instead of raising; every class folder must hold at least one
    image that decodes."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None) -> None:
        try:
            super().__init__(str(root), transform=transform, loader=read_image, is_valid_file=is_image_file)
        except (FileNotFoundError, OSError) as e:
            raise RepVGGError(f"not an image folder (class sub-folders of images expected): {root}: {e}") from None
        self._check_classes_readable()

    @staticmethod
    def make_dataset(directory: str | os.PathLike, class_to_idx: dict[str, int],
                     extensions: tuple[str, ...] | None = None, is_valid_file: Callable[[str], bool] | None = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """torchvision's listing (symlinks followed), except that each real folder and file counts once per class:
        a symlink cycle cannot multiply the images."""
        samples = []
        for name, index in sorted(class_to_idx.items()):
            folders, files = set(), {}
            for root, dirs, names in os.walk(os.path.join(directory, name), followlinks=True):
                folders.add(os.path.realpath(root))
                dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) not in folders)
                for path in (os.path.join(root, n) for n in names):
                    if is_image_file(path):
                        files.setdefault(os.path.realpath(path), path)
            if not files and not allow_empty:
                raise RepVGGError(f"class folder {os.path.join(directory, name)} holds no image file (the kinds read "
                                  f"are {', '.join(IMAGE_EXTENSIONS)})")
            samples += [(path, index) for path in sorted(files.values())]
        return samples

    def _check_classes_readable(self) -> None:
        """Refuse a class folder none of whose images decodes: the class could be neither learnt nor scored, and
        top-1 over the other classes would look fine. Reads each class's files up to its first good one."""
        by_class: dict[int, list[str]] = {}
        for path, target in self.samples:
            by_class.setdefault(target, []).append(path)
        for target, paths in sorted(by_class.items()):
            first = _read_error(paths[0])
            if first is not None and all(_read_error(path) is not None for path in paths[1:]):
                raise RepVGGError(f"class folder {os.path.join(self.root, self.classes[target])} has no readable "
                                  f"image: none of its {len(paths)} image files decodes (the first: {first})")

    def __getitem__(self, index: int) -> tuple[Any, int] | BadImage:
        """The transformed image and its target, or a :class:`BadImage` for a file that does not decode (an error
        in a transform is a bug, raised as such, never counted as an unreadable image)."""
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except READ_ERRORS as e:
            return BadImage(path, _reason(e))
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def _reason(error: Exception) -> str:
    """The first line of an error's message, or its type when it has none."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _read_error(path: str) -> str | None:
    """Why ``path`` does not decode (None: it does)."""
    try:
        read_image(path)
    except READ_ERRORS as e:
        return f"{path}: {_reason(e)}"
    return None


@dataclass
class Batch:
    """A collated batch plus the images that had to be left out of it."""

    images: Tensor
    targets: Tensor
    bad: list[BadImage]

    def __len__(self) -> int:
        return len(self.targets)


def collate(samples: list[tuple[Any, int] | BadImage]) -> Batch:
    """Stack the good samples; keep the bad ones aside so the caller can report (or refuse) them."""
    good = [s for s in samples if not isinstance(s, BadImage)]
    bad = [s for s in samples if isinstance(s, BadImage)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), bad)
    images, targets = default_collate(good)
    return Batch(images, targets, bad)


def check_bad(batch: Batch, policy: BadImagePolicy, report: Callable[[str], None] = print) -> int:
    """Report each bad image in ``batch``; raise under the ``error`` policy; return how many were skipped."""
    for bad in batch.bad:
        if policy == "error":
            raise unreadable(bad)
        report(f"skipping unreadable image {bad.path}: {bad.reason}")
    return len(batch.bad)


def unreadable(bad: BadImage) -> RepVGGError:
    """The error for an unreadable image under ``--bad-images error``."""
    return RepVGGError(f"cannot read image {bad.path}: {bad.reason} (use --bad-images skip to skip such files)")
