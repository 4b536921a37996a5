"""Data: the one image reader (and the file kinds it reads), image folders (plain or archived), bad-image handling,
and the preprocessing shared by training, evaluation and prediction.

Checkpoints carry their preprocessing as metadata under ``preprocess`` (see :data:`IMAGENET_PREPROCESS`),
so that evaluation and prediction see images exactly as training did.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import default_collate
from torchvision import datasets, transforms
from torchvision.transforms import v2

from ..errors import RepVGGError

__all__ = ["IMAGENET_PREPROCESS", "preprocess_settings", "eval_transform", "to_rgb", "train_transform",
           "resolve_split", "ImageFolder", "BadImage", "Batch", "collate", "check_bad", "unpack_archive",
           "default_cache_dir", "ARCHIVE_SUFFIXES", "IMAGE_EXTENSIONS", "READ_ERRORS", "is_image_file", "upright",
           "read_image"]

IMAGENET_PREPROCESS: dict[str, Any] = {
    "resize": 256,  # shorter side before the centre crop
    "crop": 224,  # the network's input side
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
# The file kinds read as images, alike by training, evaluation, calibration and prediction (case-insensitive).
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jfif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
# What decoding a damaged or unsupported file can raise.
READ_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)
BadImagePolicy = Literal["skip", "error"]
TrainCrop = Literal["random_resized", "pad"]
AutoAugment = Literal["none", "rand", "auto"]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any image becomes 3-channel 8-bit RGB; greyscale deeper than 8 bits is scaled first, which PIL's
    ``convert("RGB")`` does not do (it clips, so a 16-bit PNG would turn white)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """Modes ``I;16*`` span 0..65535; ``I`` and ``F`` are on PIL's 8-bit scale unless a value exceeds 255 (then
    16-bit), and ``F`` within [0, 1] is taken as normalized."""
    pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))
    peak = pixels.max(initial=0.0)
    if image.mode.startswith("I;16") or peak > 255:
        pixels = pixels * (255 / 65535)
    elif image.mode == "F" and peak <= 1:
        pixels = pixels * 255
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")


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


def _size_ok(value: Any) -> bool:
    """A positive integer, or [height, width] of positive integers."""
    if isinstance(value, list | tuple):
        return len(value) == 2 and all(_size_ok(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _stats_ok(value: Any, positive: bool) -> bool:
    """1 or 3 finite numbers (one per channel), all > 0 when ``positive``."""
    return isinstance(value, list | tuple) and len(value) in (1, 3) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
        for v in value)


def preprocess_settings(preprocess: Any = None) -> dict[str, Any]:
    """Checkpoint ``preprocess`` metadata over the ImageNet defaults, checked: the one place it is validated, so
    malformed metadata ends in a one-line :class:`RepVGGError` wherever it is used."""
    if preprocess is not None and not isinstance(preprocess, Mapping):
        raise RepVGGError(f"preprocess metadata must be a mapping (resize, crop, mean, std), got {preprocess!r:.60}")
    p = {**IMAGENET_PREPROCESS, **(preprocess or {})}
    for key in ("resize", "crop"):
        if not _size_ok(p[key]):
            raise RepVGGError(f"preprocess {key!r} must be a positive integer or [height, width], got {p[key]!r:.60}")
    for key in ("mean", "std"):
        if not _stats_ok(p[key], positive=key == "std"):
            raise RepVGGError(f"preprocess {key!r} must be 1 or 3 finite numbers{' > 0' if key == 'std' else ''}, "
                              f"got {p[key]!r:.60}")
    return p


def eval_transform(preprocess: dict[str, Any] | None = None) -> transforms.Compose:
    """PIL image -> normalized tensor: resize the shorter side, centre-crop, to tensor, normalize (RGB)."""
    p = preprocess_settings(preprocess)
    return transforms.Compose([
        transforms.Lambda(to_rgb),
        transforms.Resize(p["resize"]),
        transforms.CenterCrop(p["crop"]),
        transforms.ToTensor(),
        transforms.Normalize(p["mean"], p["std"]),
    ])


def train_transform(img_size: int, crop: TrainCrop = "random_resized", auto_augment: AutoAugment = "none",
                    mean: Sequence[float] = IMAGENET_PREPROCESS["mean"],
                    std: Sequence[float] = IMAGENET_PREPROCESS["std"]) -> v2.Compose:
    """Training augmentation: random-resized crop (ImageNet) or pad-4 random crop (small images), flip,
    optional RandAugment/AutoAugment, then a normalized float tensor."""
    steps: list[Callable] = [v2.Lambda(to_rgb), v2.ToImage()]
    if crop == "pad":
        steps += [v2.Resize(img_size, antialias=True), v2.RandomCrop(img_size, padding=img_size // 8)]
    else:
        steps.append(v2.RandomResizedCrop(img_size, antialias=True))
    steps.append(v2.RandomHorizontalFlip())
    if auto_augment == "rand":
        steps.append(v2.RandAugment())
    elif auto_augment == "auto":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def default_cache_dir() -> Path:
    """Where archives are unpacked: ``$REPVGG_CACHE_DIR``, else ``~/.cache/repvgg/datasets``."""
    return Path(os.environ.get("REPVGG_CACHE_DIR") or Path.home() / ".cache" / "repvgg" / "datasets")


def unpack_archive(archive: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Unpack a .tar/.tar.gz once into the cache and return the folder; safe when many processes race.

    One process holds a file lock and extracts into a temporary folder that is renamed into place when
    complete; the others wait on the lock and then reuse the result.
    """
    archive = Path(archive).resolve()
    stat = archive.stat()
    key = hashlib.sha1(f"{archive}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    stem = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        stem = stem.removesuffix(suffix)
    final = cache / f"{stem}-{key}"
    with open(cache / f".{stem}-{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not final.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache))
            try:
                with tarfile.open(archive) as tar:
                    tar.extractall(tmp, filter="data")
                os.rename(tmp, final)
            except (tarfile.TarError, OSError, EOFError) as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RepVGGError(f"cannot unpack {archive}: {e}") from None
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return final


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
        try:
            return super().__getitem__(index)
        except READ_ERRORS as e:
            return BadImage(self.samples[index][0], _reason(e))


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
            raise RepVGGError(f"cannot read image {bad.path}: {bad.reason} (use --bad-images skip to skip such files)")
        report(f"skipping unreadable image {bad.path}: {bad.reason}")
    return len(batch.bad)
