"""Image folders held in memory, for sets that fit (CIFAR-size and other small images): every image is decoded once
into a uint8 tensor, cached on disk under the user cache folder, and batches are built as whole tensors in the
training process, with no loading processes competing with the model for the cores.

A batch is the loader path's batch bit for bit. Training images are decoded and resized as ``train_transform`` does;
each sample's pad-crop offset, flip and cutout place are drawn, in torchvision's order, from a generator seeded by
(seed, epoch, index) as :class:`~repvgg.training.sampling.SeededSamples` seeds the per-image transforms, and an
alternating flip mirrors the finished images as SeededSamples mirrors them; evaluation
images are resized and centre-cropped by ``eval_crop`` and scaled and normalized as ``eval_transform`` does. A run may
therefore change paths between a stop and its resume and still end bit-identical.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL
import torch
import torchvision
from PIL import Image
from torch import Tensor
from torch.nn import functional as nnf
from torch.utils.data import Dataset, Subset
from torchvision import transforms
from torchvision.transforms.v2 import functional as v2f

from ..cache import DECODED, cache_dir, mark_used
from ..errors import RepVGGError
from ..files import atomic_write, os_error_message
from ..models.preprocess import eval_crop, input_size, preprocess_settings
from .data import (
    PADDING_MODES,
    BadImage,
    BadImagePolicy,
    Batch,
    DataPath,
    Flip,
    ImageFolder,
    TrainCrop,
    crop_padding,
    unreadable,
)
from .recipes import Recipe, preprocess_of
from .sampling import SeededSamples

__all__ = ["MEMORY_SHARE", "InMemoryImages", "InMemoryTrain", "InMemoryEval", "NotSquare", "available_memory",
           "unsupported", "decoded_bytes", "hold_in_memory", "in_memory", "memory_batches"]

MEMORY_SHARE = 0.25  # the share of the available memory that the decoded images of all local processes may take
CACHE_FORMAT = 1


class NotSquare(RepVGGError):
    """A training image that is not square at the recipe's size: its pad crop needs the loader path."""


@dataclass
class Decoded:
    """One split decoded: uint8 images (N x 3 x H x W; an unreadable image's row stays zero) and the unreadable."""

    images: Tensor
    bad: dict[int, BadImage]


class InMemoryImages(Dataset):
    """A decoded image folder; keeps ImageFolder's listing (``root``, ``samples``, ``classes``, ``targets``)."""

    def __init__(self, folder: ImageFolder, decoded: Decoded, mean: Sequence[float], std: Sequence[float]) -> None:
        self.root, self.samples, self.targets = folder.root, folder.samples, folder.targets
        self.classes, self.class_to_idx = folder.classes, folder.class_to_idx
        self.images, self.bad = decoded.images, decoded.bad
        self.mean, self.std = list(mean), list(std)
        self.target_tensor = torch.tensor(self.targets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | BadImage:
        """One sample as the per-image transform gives it (augmentation drawn from torch's global RNG)."""
        if index in self.bad:
            return self.bad[index]
        return self.tensors([index], [None])[0], self.targets[index]

    def tensors(self, rows: Sequence[int], generators: Sequence[torch.Generator | None]) -> Tensor:
        """The float images of ``rows`` (all readable), each augmented with its generator (None: torch's RNG)."""
        raise NotImplementedError

    def batch(self, rows: Sequence[int], generators: Sequence[torch.Generator | None],
              mirrored: Sequence[bool] | None = None) -> Batch:
        """The :class:`Batch` of ``rows``, in order, the unreadable ones set aside as ``collate`` does; the finished
        images of ``mirrored`` rows flipped (the alternating flip)."""
        good = [k for k, row in enumerate(rows) if row not in self.bad]
        bad = [self.bad[row] for row in rows if row in self.bad]
        if not good:
            return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), bad)
        good_rows = [rows[k] for k in good]
        images = self.tensors(good_rows, [generators[k] for k in good])
        if mirrored is not None and any(mirrored[k] for k in good):
            flip = torch.tensor([mirrored[k] for k in good])
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return Batch(images, self.target_tensor[good_rows], bad)


class InMemoryTrain(InMemoryImages):
    """Training images at the recipe's size, augmented as ``train_transform(size, crop, cutout=cutout, flip=flip,
    crop_pad=crop_pad)`` for a pad-and-crop ``crop``: a random crop of the image padded by
    ``crop_padding(size, crop_pad)`` (zero or mirrored border), then the random horizontal flip, then scaled and
    normalized, then the cutout square."""

    def __init__(self, folder: ImageFolder, decoded: Decoded, mean: Sequence[float], std: Sequence[float],
                 cutout: int = 0, crop: TrainCrop = "pad", flip: Flip = "random", crop_pad: int | None = None) -> None:
        super().__init__(folder, decoded, mean, std)
        self.size = decoded.images.shape[-1]
        self.padding = crop_padding(self.size, crop_pad)
        self.cutout = cutout
        self.padding_mode = PADDING_MODES[crop]
        self.random_flip = flip == "random"

    def _draw(self, generator: torch.Generator | None) -> tuple[int, int, bool, int, int]:
        """(top, left, flip, cutout top, cutout left) as RandomCrop, RandomHorizontalFlip and the cutout's
        RandomErasing (:func:`~repvgg.training.data.cutout_transform`) draw them."""
        span = 2 * self.padding + 1
        top, left = (int(torch.randint(0, span, size=(), generator=generator)),
                     int(torch.randint(0, span, size=(), generator=generator))) if self.padding else (0, 0)
        flip = self.random_flip and bool(torch.rand(1, generator=generator) < 0.5)
        if not self.cutout:
            return top, left, flip, 0, 0
        area = self.cutout ** 2 / self.size ** 2
        torch.rand(1, generator=generator)  # RandomErasing's p draw, then its area and log-ratio draws
        torch.empty(1).uniform_(area, area, generator=generator)
        torch.empty(1).uniform_(0.0, 0.0, generator=generator)
        places = self.size - self.cutout + 1
        return (top, left, flip, int(torch.randint(0, places, size=(1,), generator=generator)),
                int(torch.randint(0, places, size=(1,), generator=generator)))

    def tensors(self, rows: Sequence[int], generators: Sequence[torch.Generator | None]) -> Tensor:
        top, left, flip, cut_top, cut_left = (torch.tensor(v) for v in zip(*(self._draw(g) for g in generators),
                                                                             strict=True))
        images = self.images[list(rows)]
        if self.padding:
            images = nnf.pad(images, [self.padding] * 4, mode=self.padding_mode)
        n, size, steps = len(rows), self.size, torch.arange(self.size)
        ys, xs = top[:, None] + steps, left[:, None] + steps
        xs = torch.where(flip[:, None], xs.flip(1), xs)  # a flipped crop reads its columns right to left
        picked = torch.gather(images, 2, ys.view(n, 1, size, 1).expand(n, 3, size, images.shape[-1]))
        crops = torch.gather(picked, 3, xs.view(n, 1, 1, size).expand(n, 3, size, size))
        images = v2f.normalize_image(v2f.to_dtype_image(crops, torch.float32, scale=True), self.mean, self.std)
        if not self.cutout:
            return images
        inside_y = (steps >= cut_top[:, None]) & (steps < cut_top[:, None] + self.cutout)
        inside_x = (steps >= cut_left[:, None]) & (steps < cut_left[:, None] + self.cutout)
        return images.masked_fill((inside_y[:, :, None] & inside_x[:, None, :])[:, None], 0.0)


class InMemoryEval(InMemoryImages):
    """Evaluation images resized and centre-cropped, scaled and normalized as ``eval_transform``."""

    def tensors(self, rows: Sequence[int], generators: Sequence[torch.Generator | None]) -> Tensor:
        return transforms.functional.normalize(self.images[list(rows)].to(torch.float32).div(255), self.mean,
                                               self.std)


def in_memory(dataset: Dataset) -> bool:
    """Whether ``dataset`` holds decoded images (possibly as a :class:`Subset`, possibly seeded)."""
    return isinstance(_unwrap(dataset)[0], InMemoryImages)


def memory_batches(dataset: Dataset, indices: Iterable[int], batch_size: int,
                   drop_last: bool) -> Iterator[Batch] | None:
    """Batches of ``indices`` built as whole tensors when ``dataset`` holds decoded images (possibly seeded by
    :class:`SeededSamples`, possibly a :class:`Subset`); None for any other dataset."""
    base, seeded, rows = _unwrap(dataset)
    if not isinstance(base, InMemoryImages):
        return None
    return _batches(base, seeded, rows, indices, batch_size, drop_last)


def _unwrap(dataset: Dataset) -> tuple[Dataset, SeededSamples | None, Sequence[int] | None]:
    """(the dataset inside, the SeededSamples around it, the Subset's indices into it)."""
    seeded = dataset if isinstance(dataset, SeededSamples) else None
    base = seeded.dataset if seeded is not None else dataset
    if isinstance(base, Subset):
        return base.dataset, seeded, base.indices
    return base, seeded, None


def _batches(images: InMemoryImages, seeded: SeededSamples | None, rows: Sequence[int] | None,
             indices: Iterable[int], batch_size: int, drop_last: bool) -> Iterator[Batch]:
    chunk: list[int] = []

    def make() -> Batch:
        generators = [seeded.generator(i) if seeded is not None else None for i in chunk]
        mirrored = [seeded.mirrored(i) for i in chunk] if seeded is not None and seeded.alternate_flip else None
        return images.batch([rows[i] for i in chunk] if rows is not None else chunk, generators, mirrored)

    for index in indices:
        chunk.append(int(index))
        if len(chunk) == batch_size:
            yield make()
            chunk = []
    if chunk and not drop_last:
        yield make()


def available_memory() -> int:
    """Bytes of memory available to new allocations: ``MemAvailable`` on Linux, else the free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def unsupported(recipe: Recipe) -> str | None:
    """What in ``recipe`` the in-memory path does not implement (None: it implements all of it)."""
    if recipe.crop not in PADDING_MODES:
        return "the recipe's random-resized crop runs per image"
    if recipe.auto_augment != "none":
        return f"the recipe's {'RandAugment' if recipe.auto_augment == 'rand' else 'AutoAugment'} runs per image"
    return None


def decoded_bytes(recipe: Recipe, train_images: int, val_images: int) -> int:
    """Memory the decoded training and validation images take (uint8, at the sizes the network sees)."""
    height, width = input_size({"preprocess": preprocess_of(recipe)})
    return 3 * (train_images * recipe.img_size ** 2 + val_images * height * width)


def hold_in_memory(train: ImageFolder, val: ImageFolder, recipe: Recipe, path: DataPath,
                   bad_images: BadImagePolicy, log: Callable[[str], None]) -> tuple[InMemoryTrain, InMemoryEval] | None:
    """The decoded training and validation sets when ``path`` and the recipe allow them, else None (the loader
    path); ``memory`` forces them (past the memory share, not past an augmentation they lack). Says which and why."""
    if path == "loader":
        return None
    missing = unsupported(recipe)
    if missing and path == "memory":
        raise RepVGGError(f"--data-path memory: {missing}; use --data-path loader (or --crop pad --auto-augment none)")
    nbytes, processes = decoded_bytes(recipe, len(train), len(val)), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    available = available_memory()
    if not missing and path == "auto" and nbytes * processes > MEMORY_SHARE * available:
        copies = f" in each of {processes} processes" if processes > 1 else ""
        missing = (f"the decoded images ({nbytes / 2**20:.0f} MiB{copies}) exceed {MEMORY_SHARE:.0%} of the "
                   f"available memory ({available / 2**30:.1f} GiB)")
    if missing:
        log(f"data: loading processes, as {missing}")
        return None
    try:
        held = _decode_both(train, val, recipe, bad_images, log)
    except NotSquare as e:
        if path == "memory":
            raise
        log(f"data: loading processes, as {e}")
        return None
    log(f"data: in memory ({nbytes / 2**20:.0f} MiB decoded); batches augmented as whole tensors in the training "
        f"process, no loading processes")
    return held


def _decode_both(train: ImageFolder, val: ImageFolder, recipe: Recipe, bad_images: BadImagePolicy,
                 log: Callable[[str], None]) -> tuple[InMemoryTrain, InMemoryEval]:
    p = preprocess_settings(preprocess_of(recipe))
    size = recipe.img_size

    def train_decode(image: Image.Image) -> Tensor:  # train_transform's ToImage and Resize, without their dispatch
        return v2f.resize_image(v2f.pil_to_tensor(image), [size], antialias=True)

    val_decode = transforms.Compose([eval_crop(p), transforms.PILToTensor()])
    decoded_train = decode_folder(train, train_decode, (3, size, size), {"split": "train", "size": size}, log)
    decoded_val = decode_folder(val, val_decode, (3, *input_size({"preprocess": p})),
                                {"split": "eval", "resize": p["resize"], "crop": p["crop"]}, log)
    if bad_images == "error":
        for decoded in (decoded_train, decoded_val):
            if decoded.bad:
                raise unreadable(next(iter(decoded.bad.values())))
    return (InMemoryTrain(train, decoded_train, p["mean"], p["std"], recipe.cutout, recipe.crop, recipe.flip,
                          recipe.crop_pad),
            InMemoryEval(val, decoded_val, p["mean"], p["std"]))


def decode_folder(folder: ImageFolder, decode: Callable[[Any], Tensor], shape: tuple[int, int, int],
                  settings: dict[str, Any], log: Callable[[str], None]) -> Decoded:
    """``folder``'s images through ``decode`` (to uint8 tensors of ``shape``), read from the cache when it holds
    them for these files and settings, else decoded and cached (a cache that cannot be written is only noted)."""
    path = cache_dir(DECODED) / f"{Path(folder.root).name}-{cache_key(folder, settings)}.pt"
    cached = _read_cache(path, (len(folder), *shape))
    if cached is not None:
        return cached
    log(f"decoding the {len(folder)} images of {folder.root} into memory, once (cached in {path.parent})")
    start = time.monotonic()
    decoded = _decode(folder, decode, shape, settings)
    bad = list(decoded.bad.values())
    payload = {"format": CACHE_FORMAT, "images": decoded.images, "bad_index": list(decoded.bad),
               "bad_path": [b.path for b in bad], "bad_reason": [b.reason for b in bad]}
    try:
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    except OSError as e:
        log(f"note: the decoded images could not be cached ({os_error_message(e)}); the next run decodes them again")
    log(f"decoded in {time.monotonic() - start:.0f}s")
    return decoded


def cache_key(folder: ImageFolder, settings: dict[str, Any]) -> str:
    """A hash of the folder's files (path, class, size, modification time), the decode settings and the versions
    of the decoding libraries."""
    digest = hashlib.sha256(json.dumps({**settings, "format": CACHE_FORMAT, "pillow": PIL.__version__,
                                        "torchvision": torchvision.__version__}, sort_keys=True).encode())
    for sample_path, target in folder.samples:
        try:
            stat = os.stat(sample_path)
            digest.update(f"{sample_path}\t{target}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{sample_path}\t{target}\tmissing\n".encode())
    return digest.hexdigest()[:24]


def _read_cache(path: Path, shape: tuple[int, ...]) -> Decoded | None:
    """The cached decode at ``path`` when it is whole and of ``shape``; None otherwise."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True)
        images = data["images"]
        bad = {int(i): BadImage(p, r) for i, p, r in zip(data["bad_index"], data["bad_path"], data["bad_reason"],
                                                         strict=True)}
    except Exception:  # a damaged file fails anywhere in the unpickler; the cache is disposable: decode again
        return None
    if data.get("format") != CACHE_FORMAT or not isinstance(images, Tensor) or images.dtype != torch.uint8 \
            or tuple(images.shape) != shape:
        return None
    mark_used(path)
    return Decoded(images, bad)


def _decode(folder: ImageFolder, decode: Callable[[Any], Tensor], shape: tuple[int, int, int],
            settings: dict[str, Any]) -> Decoded:
    """Decode every image of ``folder`` (unreadable ones are recorded as ImageFolder reports them)."""
    reader = copy.copy(folder)
    reader.transform = decode
    images = torch.zeros(len(folder), *shape, dtype=torch.uint8)
    bad: dict[int, BadImage] = {}
    for i in range(len(folder)):
        item = reader[i]
        if isinstance(item, BadImage):
            bad[i] = item
            continue
        image = item[0]
        if tuple(image.shape) != shape:
            raise NotSquare(f"{folder.samples[i][0]} is {image.shape[-1]}x{image.shape[-2]} pixels at the recipe's "
                            f"size {settings.get('size')}: the in-memory path holds square training images (the loader "
                            f"path crops along the longer side)")
        images[i] = image
    return Decoded(images, bad)
