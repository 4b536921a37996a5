"""Evaluation: top-1/top-5, loss and speed of a model on batches or on an image folder read with the model's own
preprocessing and classes, with per-class counts (the confusion matrix) when asked."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..errors import RepVGGError
from ..models.preprocess import eval_transform, preprocess_settings, resize_for
from .data import BadImagePolicy, Batch, ImageFolder, check_bad, collate, resolve_split
from .device import AmpMode, autocast, check_amp, resolve_device, synchronize

__all__ = ["EvalResult", "EvalSettings", "FolderEval", "TTA", "tta_views", "evaluate", "evaluate_folder",
           "align_classes"]

TTA = Literal["none", "flip", "flip-translate"]


@dataclass
class EvalResult:
    """Sums over an evaluated set; the accuracies are percentages."""

    n: int = 0
    correct1: int = 0
    correct5: int = 0
    loss_sum: float = 0.0
    model_time_s: float = 0.0
    wall_time_s: float = 0.0
    skipped: int = 0
    confusion: Tensor | None = None  # [true class, predicted class] counts
    tta: EvalResult | None = None  # the same images scored with test-time augmentation, when asked

    @property
    def top1(self) -> float:
        return 100.0 * self.correct1 / max(self.n, 1)

    @property
    def top5(self) -> float:
        return 100.0 * self.correct5 / max(self.n, 1)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n, 1)

    @property
    def images_per_s(self) -> float:
        """Model throughput: images over the time spent in the forward pass (data loading excluded)."""
        return self.n / max(self.model_time_s, 1e-9)

    def per_class_metrics(self) -> dict[str, list[float]]:
        """Recall (the per-class top-1), precision and F1 of each class, in percent; NaN where undefined (recall
        of a class absent from the set, precision of a class never predicted)."""
        if self.confusion is None:
            raise RepVGGError("per-class metrics need evaluate(..., confusion=True)")
        counts = self.confusion.double()
        hits = counts.diag()
        recall, precision = 100.0 * hits / counts.sum(1), 100.0 * hits / counts.sum(0)
        total = precision + recall
        f1 = torch.where(total > 0, 2 * precision * recall / total, torch.zeros_like(total))
        f1 = torch.where(total.isnan(), total, f1)
        return {"recall": recall.tolist(), "precision": precision.tolist(), "f1": f1.tolist()}

    def all_reduce(self, all_sum: Callable[[Sequence[float], torch.device], list[float]],
                   device: torch.device) -> EvalResult:
        """Counts summed over processes with ``all_sum`` (times: the slowest process)."""
        n, c1, c5, loss, skipped = all_sum([self.n, self.correct1, self.correct5, self.loss_sum, self.skipped],
                                           device)
        tta = self.tta.all_reduce(all_sum, device) if self.tta is not None else None
        return EvalResult(int(n), int(c1), int(c5), loss, self.model_time_s, self.wall_time_s, int(skipped),
                          self.confusion, tta)

    def as_dict(self) -> dict[str, Any]:
        """The figures as reported; ``tta`` holds the test-time augmented ones when they were measured."""
        tta = {"tta": dict(top1=self.tta.top1, top5=self.tta.top5, loss=self.tta.loss)} if self.tta else {}
        return dict(images=self.n, top1=self.top1, top5=self.top5, loss=self.loss, images_per_s=self.images_per_s,
                    skipped_images=self.skipped, **tta)


@torch.inference_mode()
def _logits(model: nn.Module, images: Tensor) -> Tensor:
    out = model(images)
    return (out["main"] if isinstance(out, dict) else out).float()


def tta_views(images: Tensor, tta: TTA) -> list[Tensor]:
    """The views whose logits test-time augmentation averages: the images and their mirror images (``flip``), and
    each of those also shifted diagonally by 1/16 of the side both ways, edges reflected (``flip-translate``)."""
    views = [images] if tta == "none" else [images, images.flip(3)]
    if tta != "flip-translate":
        return views
    t = max(1, min(images.shape[-2:]) // 16)
    shifted = []
    for view in views:
        padded = nn.functional.pad(view, (t, t, t, t), mode="reflect")
        shifted += [padded[..., :-2 * t, :-2 * t], padded[..., 2 * t:, 2 * t:]]
    return views + shifted


def _count(result: EvalResult, logits: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """Add a batch's hits and loss to ``result``; the top-k predicted classes."""
    result.loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
    top = logits.topk(min(5, num_classes), dim=1).indices
    hits = top.eq(targets[:, None])
    result.correct1 += int(hits[:, 0].sum())
    result.correct5 += int(hits.any(1).sum())
    result.n += len(targets)
    return top


def evaluate(model: nn.Module, loader: Iterable[Batch], device: torch.device, num_classes: int,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             channels_last: bool = False, bad_images: BadImagePolicy = "skip",
             report: Callable[[str], None] = print, confusion: bool = False, progress: bool = False,
             tta: TTA = "none") -> EvalResult:
    """Run ``model`` (eval mode) over ``loader`` of :class:`~repvgg.training.data.Batch` and count hits; with
    ``tta`` the same images are also scored on the mean logits of :func:`tta_views`, in ``result.tta``."""
    was_training = model.training
    model.eval()
    result = EvalResult(confusion=torch.zeros(num_classes, num_classes, dtype=torch.long) if confusion else None,
                        tta=EvalResult() if tta != "none" else None)
    t0 = time.perf_counter()
    for batch in tqdm(loader, desc="eval", disable=not progress, dynamic_ncols=True):
        batch: Batch
        result.skipped += check_bad(batch, bad_images, report)
        if not len(batch):
            continue
        images, targets = batch.images.to(device, non_blocking=True), batch.targets.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        synchronize(device)
        start = time.perf_counter()
        with autocast():
            logits = [_logits(model, view) for view in tta_views(images, tta)]
        synchronize(device)
        result.model_time_s += time.perf_counter() - start
        top = _count(result, logits[0], targets, num_classes)
        if result.tta is not None:
            _count(result.tta, torch.stack(logits).mean(0), targets, num_classes)
        if result.confusion is not None:
            pairs = targets.cpu() * num_classes + top[:, 0].cpu()
            result.confusion += torch.bincount(pairs, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    result.wall_time_s = time.perf_counter() - t0
    model.train(was_training)
    return result


def _dataset_for(data: str, split: str | None, preprocess: dict[str, Any], cache_dir: str | None) -> ImageFolder:
    """The folder to evaluate: ``split`` (default val, then test) under ``data``, or ``data`` itself."""
    names = (split,) if split else ("val", "test")
    root = resolve_split(data, names, cache_dir, fallback=not split)
    return ImageFolder(root, eval_transform(preprocess))


def align_classes(folder_classes: Sequence[str], class_names: Sequence[str] | None, num_classes: int) -> list[int]:
    """The model's output index of each class folder: by name when the model has class names, else by position,
    which needs as many folders as outputs (anything else would score a meaningless 0%)."""
    if class_names:
        index = {str(name): i for i, name in enumerate(class_names)}
        unknown = [c for c in folder_classes if c not in index]
        if unknown:
            more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise RepVGGError(f"class folders not among the model's {len(index)} class names: "
                              f"{', '.join(unknown[:5])}{more}")
        return [index[c] for c in folder_classes]
    if len(folder_classes) != num_classes:
        raise RepVGGError(f"the model has {num_classes} outputs and no class names, but the folder has "
                          f"{len(folder_classes)} classes: folders cannot be matched to outputs")
    return list(range(num_classes))


@dataclass(frozen=True)
class EvalSettings:
    """How to evaluate on a folder: where, at which size, in batches of what, on which device and precision."""

    data: str
    split: str | None = None  # default val, then test
    img_size: int | None = None  # overrides the model's crop
    resize: int | None = None  # shorter side before the crop (with img_size; default: the crop rule)
    batch_size: int = 64
    workers: int = 0
    device: str | None = None  # default: cuda when available
    amp: AmpMode = "none"
    channels_last: bool = False
    bad_images: BadImagePolicy = "skip"
    cache_dir: str | None = None
    tta: TTA = "none"  # also score the mean logits of the test-time augmentation views (tta_views)
    confusion: bool = False  # count [true class, predicted class] pairs


@dataclass
class FolderEval:
    """What :func:`evaluate_folder` measured, and on which folder and classes."""

    result: EvalResult
    root: Path
    folder_classes: list[str]
    targets: list[int]  # the model's output index of each folder class


def evaluate_folder(model: nn.Module, metadata: dict[str, Any], settings: EvalSettings, progress: bool = False,
                    report: Callable[[str], None] = print) -> FolderEval:
    """Evaluate ``model`` on ``settings.data`` read with ``metadata``'s preprocessing, classes matched to its
    ``class_names`` (by name) or outputs (by position); refuses a folder without one readable image."""
    num_classes = getattr(model, "num_classes", None)
    if not num_classes:
        raise RepVGGError("the model has no classifier to evaluate")
    device = resolve_device(settings.device)
    check_amp(settings.amp, device)
    preprocess = preprocess_settings(metadata.get("preprocess"))
    if settings.img_size:
        preprocess.update(crop=settings.img_size, resize=settings.resize or resize_for(settings.img_size))
    dataset = _dataset_for(settings.data, settings.split, preprocess, settings.cache_dir)
    targets = align_classes(dataset.classes, metadata.get("class_names"), num_classes)
    dataset.target_transform = targets.__getitem__
    model = model.to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(dataset, batch_size=settings.batch_size, num_workers=settings.workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    result = evaluate(model, loader, device, num_classes, autocast=lambda: autocast(device, settings.amp),
                      channels_last=settings.channels_last, bad_images=settings.bad_images, report=report,
                      confusion=settings.confusion, progress=progress, tta=settings.tta)
    if not result.n:
        raise RepVGGError(f"no readable images in {dataset.root} ({result.skipped} unreadable)")
    if not math.isfinite(result.loss_sum):
        raise RepVGGError(f"model outputs are not finite (NaN or inf) on {dataset.root}")
    return FolderEval(result, Path(dataset.root), list(dataset.classes), targets)
