"""Evaluation: top-1/top-5, loss and speed of any checkpoint (training-time, deploy, official, timm) on an
image folder, with optional per-class accuracy and confusion matrix."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..cliargs import nonneg_int, output_file, positive_int
from ..errors import RepVGGError
from .data import (
    BadImagePolicy,
    Batch,
    ImageFolder,
    check_bad,
    collate,
    eval_transform,
    preprocess_settings,
    resolve_split,
)
from .device import AmpMode, autocast, check_amp, resolve_device

if TYPE_CHECKING:
    from ..models.checkpoints import Checkpoint

__all__ = ["EvalResult", "EvalOptions", "evaluate", "run_eval", "add_arguments"]


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

    def per_class(self) -> list[float]:
        """Accuracy of each true class, in percent (NaN for classes absent from the set)."""
        if self.confusion is None:
            raise RepVGGError("per-class accuracy needs evaluate(..., confusion=True)")
        totals = self.confusion.sum(1).double()
        return (100.0 * self.confusion.diag().double() / totals).tolist()

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
        return EvalResult(int(n), int(c1), int(c5), loss, self.model_time_s, self.wall_time_s, int(skipped),
                          self.confusion)

    def as_dict(self) -> dict[str, Any]:
        return dict(images=self.n, top1=self.top1, top5=self.top5, loss=self.loss, images_per_s=self.images_per_s,
                    skipped_images=self.skipped)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _logits(model: nn.Module, images: Tensor) -> Tensor:
    out = model(images)
    return (out["main"] if isinstance(out, dict) else out).float()


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             channels_last: bool = False, bad_images: BadImagePolicy = "skip",
             report: Callable[[str], None] = print, confusion: bool = False, progress: bool = False,
             flip: bool = False) -> EvalResult:
    """Run ``model`` (eval mode) over ``loader`` of :class:`~repvgg.training.data.Batch` and count hits;
    ``flip`` averages the logits of each image and its mirror image (test-time augmentation)."""
    was_training = model.training
    model.eval()
    result = EvalResult(confusion=torch.zeros(num_classes, num_classes, dtype=torch.long) if confusion else None)
    k = min(5, num_classes)
    t0 = time.perf_counter()
    for batch in tqdm(loader, desc="eval", disable=not progress, dynamic_ncols=True):
        batch: Batch
        result.skipped += check_bad(batch, bad_images, report)
        if not len(batch):
            continue
        images, targets = batch.images.to(device, non_blocking=True), batch.targets.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        _sync(device)
        start = time.perf_counter()
        with autocast():
            logits = _logits(model, images)
            if flip:
                logits = (logits + _logits(model, images.flip(3))) / 2
        _sync(device)
        result.model_time_s += time.perf_counter() - start
        result.loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        top = logits.topk(k, dim=1).indices
        hits = top.eq(targets[:, None])
        result.correct1 += int(hits[:, 0].sum())
        result.correct5 += int(hits.any(1).sum())
        result.n += len(targets)
        if result.confusion is not None:
            pairs = targets.cpu() * num_classes + top[:, 0].cpu()
            result.confusion += torch.bincount(pairs, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    result.wall_time_s = time.perf_counter() - t0
    model.train(was_training)
    return result


def _dataset_for(data: str, split: str | None, preprocess: dict[str, Any] | None,
                 cache_dir: str | None) -> ImageFolder:
    """The folder to evaluate: ``split`` (default val, then test) under ``data``, or ``data`` itself."""
    names = (split,) if split else ("val", "test")
    root = resolve_split(data, names, cache_dir, fallback=not split)
    return ImageFolder(root, eval_transform(preprocess))


def _align_classes(dataset: ImageFolder, class_names: Sequence[str] | None, num_classes: int) -> None:
    """Map the folder's classes onto the checkpoint's class indices (by name when the checkpoint has names)."""
    if class_names:
        unknown = [c for c in dataset.classes if c not in class_names]
        if unknown:
            raise RepVGGError(f"class folders not among the checkpoint's classes: {', '.join(unknown[:5])}"
                              + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))
        index = {name: i for i, name in enumerate(class_names)}
        dataset.target_transform = lambda t: index[dataset.classes[t]]
    elif len(dataset.classes) > num_classes:
        raise RepVGGError(f"{len(dataset.classes)} class folders but the model has {num_classes} outputs")


@dataclass(frozen=True)
class EvalOptions:
    """What ``repvgg eval`` evaluates and how: the command's options, typed."""

    data: str
    checkpoint: str | None = None  # a checkpoint, or an exported .onnx / .xml / TorchScript file
    pretrained: str | None = None  # instead of a checkpoint: published weights (model name or Hub id) or a file
    model: str | None = None  # architecture, for files without metadata
    split: str | None = None  # default val, then test
    img_size: int | None = None  # overrides the checkpoint's crop
    resize: int | None = None  # shorter side before the crop (with img_size; default img_size / 0.875)
    batch_size: int = 64
    workers: int = 4
    device: str | None = None  # default: cuda when available
    amp: AmpMode = "none"
    channels_last: bool = False
    bad_images: BadImagePolicy = "skip"
    cache_dir: str | None = None
    per_class: bool = False
    flip_tta: bool = False  # average each image's logits with its mirror image's
    confusion: str | None = None  # PNG file for the confusion matrix
    json: str | None = None  # JSON file for the results


def _prepare(opts: EvalOptions) -> tuple[nn.Module, Checkpoint, ImageFolder, torch.device]:
    """The model on its device, the checkpoint, and the folder to evaluate (classes aligned to the checkpoint's)."""
    from ..deploy.sources import load_model_source

    if bool(opts.checkpoint) == bool(opts.pretrained):
        raise RepVGGError("give --checkpoint or --pretrained (one of the two)")
    model, ckpt = load_model_source(opts.checkpoint, opts.model, opts.pretrained)
    if not model.num_classes:
        raise RepVGGError(f"{_label(opts)} has no classifier to evaluate")
    device = resolve_device(opts.device)
    check_amp(opts.amp, device)
    preprocess = preprocess_settings(ckpt.metadata.get("preprocess"))
    if opts.img_size:
        preprocess.update(crop=opts.img_size, resize=opts.resize or round(opts.img_size / 0.875))
    dataset = _dataset_for(opts.data, opts.split, preprocess, opts.cache_dir)
    _align_classes(dataset, ckpt.metadata.get("class_names"), model.num_classes)
    model = model.to(device)
    if opts.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, ckpt, dataset, device


def run_eval(opts: EvalOptions) -> dict[str, Any]:
    """``repvgg eval``: load any checkpoint, evaluate it on the folder, print (and optionally save) the results."""
    model, ckpt, dataset, device = _prepare(opts)
    loader = DataLoader(dataset, batch_size=opts.batch_size, num_workers=opts.workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    result = evaluate(model, loader, device, model.num_classes, autocast=lambda: autocast(device, opts.amp),
                      channels_last=opts.channels_last, bad_images=opts.bad_images, report=tqdm.write,
                      confusion=bool(opts.per_class or opts.confusion), progress=True, flip=opts.flip_tta)
    if not result.n:
        raise RepVGGError(f"no readable images in {dataset.root} ({result.skipped} unreadable); nothing written")
    if not math.isfinite(result.loss_sum):
        raise RepVGGError(f"{_label(opts)}: model outputs are not finite (NaN or inf) on {dataset.root}; "
                          f"nothing written")
    meta = ckpt.metadata
    class_names = meta.get("class_names")
    form = "deploy" if ckpt.deploy else "training-time"
    arch = model.config.official_name if hasattr(model, "config") else meta.get("architecture", "unknown")
    print(f"{_label(opts)} ({ckpt.format}, {form}, {arch}) on {dataset.root}"
          + (", flip test-time augmentation" if opts.flip_tta else ""))
    print(f"  images {result.n}  top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  loss {result.loss:.4f}  "
          f"{result.images_per_s:.1f} images/s" + (f"  ({result.skipped} unreadable skipped)" if result.skipped
                                                   else ""))
    names = list(class_names or dataset.classes)
    summary = dict(checkpoint=_label(opts), format=ckpt.format, form=form, data=str(dataset.root),
                   flip_tta=opts.flip_tta, **result.as_dict())
    if opts.per_class:
        present = sorted({names.index(c) if class_names else i for i, c in enumerate(dataset.classes)})
        summary.update(_per_class_report(result, names, present))
    if opts.confusion:
        from .plot import plot_confusion

        plot_confusion(result.confusion, names, opts.confusion)
        print(f"  confusion matrix -> {opts.confusion}")
    if opts.json:
        from ..files import atomic_write

        atomic_write(opts.json, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    return summary


def _label(opts: EvalOptions) -> str:
    return str(opts.checkpoint) if opts.checkpoint else f"pretrained {opts.pretrained}"


def _per_class_report(result: EvalResult, names: Sequence[str], present: Sequence[int]) -> dict[str, Any]:
    """Print recall, precision and F1 of each class present in the set; return them for the JSON summary
    (``per_class_top1`` is the recall; an undefined precision is null)."""
    metrics = result.per_class_metrics()
    width = max(len(names[i]) for i in present)
    print(f"  {'class':<{width}}  recall  precision      F1  images")
    rows = {}
    for i in present:
        recall, precision, f1 = (metrics[k][i] for k in ("recall", "precision", "f1"))
        images = int(result.confusion[i].sum())
        print(f"  {names[i]:<{width}} {recall:6.2f}%    {precision:6.2f}% {f1:6.2f}%  {images:6d}")
        rows[names[i]] = {k: None if math.isnan(v) else v for k, v in
                          (("recall", recall), ("precision", precision), ("f1", f1))} | {"images": images}
    return {"per_class_top1": {n: r["recall"] for n, r in rows.items()}, "per_class": rows}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``repvgg eval`` options."""
    p.add_argument("--data", required=True, help="folder with val/ or test/ class folders (or archives of them), "
                   "or a class-folder root itself")
    p.add_argument("--pretrained", metavar="WEIGHTS", help="instead of --checkpoint: published weights by model "
                   "name (repvgg_a0), a Hugging Face Hub id, or a file")
    p.add_argument("--checkpoint", help="training-time or deploy checkpoint (this library's, official, timm or "
                   "mmpretrain), or an exported .onnx/.xml/TorchScript file")
    p.add_argument("--model", help="architecture, for files without metadata")
    p.add_argument("--split", help="sub-folder to evaluate (default val, then test)")
    p.add_argument("--img-size", type=positive_int, help="override the checkpoint's crop size")
    p.add_argument("--resize", type=positive_int,
                   help="shorter side before the crop (with --img-size; default size/0.875)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=nonneg_int, default=4, help="data-loading processes")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast precision")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--bad-images", choices=["skip", "error"], default="skip",
                   help="unreadable images: report and skip, or stop")
    p.add_argument("--cache-dir", help="where archives are unpacked")
    p.add_argument("--per-class", action="store_true", help="print the accuracy of every class")
    p.add_argument("--flip-tta", action="store_true", help="test-time augmentation: average the logits of each "
                   "image and its horizontal mirror (twice the compute)")
    p.add_argument("--confusion", metavar="PNG", type=output_file, help="draw the confusion matrix to this file")
    p.add_argument("--json", metavar="FILE", type=output_file, help="also write the results as JSON")
