"""``repvgg eval``: top-1/top-5, loss and speed of any checkpoint, published weights or exported file on an image
folder, with per-class recall/precision/F1, a confusion matrix and a JSON report on request."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from ..files import Outputs, atomic_write
from .args import PRETRAINED_HELP, add_checkpoint, checkpoint_of, figure_file, nonneg_int, output_file, positive_int

WRITES = True


def inputs(args: argparse.Namespace) -> list[str | None]:
    return [checkpoint_of(args), args.pretrained]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..training.options import default_workers

    p.add_argument("--data", required=True, help="folder with val/ or test/ class folders (or archives of them), "
                   "or a class-folder root itself")
    add_checkpoint(p, "training-time or deploy checkpoint (this library's, official, timm or mmpretrain), or an "
                      "exported .onnx/.xml/TorchScript file")
    p.add_argument("--pretrained", metavar="WEIGHTS", help=PRETRAINED_HELP + "; instead of CHECKPOINT")
    p.add_argument("--model", help="architecture, for files without metadata")
    p.add_argument("--split", help="sub-folder to evaluate (default val, then test)")
    p.add_argument("--img-size", type=positive_int, help="override the checkpoint's crop size")
    p.add_argument("--resize", type=positive_int,
                   help="shorter side before the crop (with --img-size; default size/0.875)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=nonneg_int, default=default_workers(), help="data-loading processes")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast precision")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--bad-images", choices=["skip", "error"], default="skip",
                   help="unreadable images: report and skip, or stop")
    p.add_argument("--cache-dir", help="where archives are unpacked")
    p.add_argument("--per-class", action="store_true", help="print recall, precision and F1 of every class")
    p.add_argument("--tta", nargs="?", const="flip-translate", default="none", choices=["flip", "flip-translate"],
                   help="also report test-time augmentation: the mean logits of each image and its mirror (flip, 2x "
                   "the compute), and of both shifted diagonally by 1/16 of the side each way (flip-translate, the "
                   "choice of a bare --tta, 6x)")
    p.add_argument("--flip-tta", dest="tta", action="store_const", const="flip", help=argparse.SUPPRESS)
    p.add_argument("--confusion", metavar="IMAGE", type=figure_file, help="draw the confusion matrix to this file")
    p.add_argument("--json", metavar="FILE", type=output_file, help="also write the results as JSON")


def settings_from_args(args: argparse.Namespace, confusion: bool = False) -> Any:
    """The library's :class:`~repvgg.training.evaluate.EvalSettings` from parsed arguments."""
    from ..training.evaluate import EvalSettings

    return EvalSettings(data=args.data, split=args.split, img_size=args.img_size, resize=args.resize,
                        batch_size=args.batch_size, workers=args.workers, device=args.device, amp=args.amp,
                        channels_last=args.channels_last, bad_images=args.bad_images, cache_dir=args.cache_dir,
                        tta=args.tta, confusion=confusion)


def label(checkpoint: str | None, pretrained: str | None) -> str:
    return str(checkpoint) if checkpoint else f"pretrained {pretrained}"


def run(args: argparse.Namespace, outputs: Outputs) -> None:
    from tqdm import tqdm

    from ..deploy.sources import load_model_source
    from ..errors import RepVGGError
    from ..training.evaluate import evaluate_folder

    json_out = outputs.file(args.json, "--json") if args.json else None
    confusion_out = outputs.file(args.confusion, "--confusion") if args.confusion else None
    checkpoint = checkpoint_of(args)
    if bool(checkpoint) == bool(args.pretrained):
        raise RepVGGError("give a checkpoint (CHECKPOINT or --checkpoint) or --pretrained (one of the two)")
    model, ckpt = load_model_source(checkpoint, args.model, args.pretrained)
    name = label(checkpoint, args.pretrained)
    settings = settings_from_args(args, confusion=bool(args.per_class or args.confusion))
    try:
        done = evaluate_folder(model, ckpt.metadata, settings, progress=True, report=tqdm.write)
    except RepVGGError as e:
        raise RepVGGError(f"{name}: {e}; nothing written") from None
    result, meta = done.result, ckpt.metadata
    form = "deploy" if ckpt.deploy else "training-time"
    arch = model.config.official_name if hasattr(model, "config") else meta.get("architecture", "unknown")
    print(f"{name} ({ckpt.format}, {form}, {arch}) on {done.root}")
    print(f"  images {result.n}  top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  loss {result.loss:.4f}  "
          f"{result.images_per_s:.1f} images/s" + (f"  ({result.skipped} unreadable skipped)" if result.skipped
                                                   else ""))
    if result.tta is not None:
        print(f"  {args.tta} test-time augmentation: top-1 {result.tta.top1:.2f}%  top-5 {result.tta.top5:.2f}%  "
              f"loss {result.tta.loss:.4f}")
    names = [str(n) for n in meta.get("class_names") or done.folder_classes]
    summary = dict(checkpoint=name, format=ckpt.format, form=form, data=str(done.root),
                   settings={k: v for k, v in asdict(settings).items() if k != "confusion"}, **result.as_dict())
    if args.per_class:
        summary.update(_per_class_report(result, names, sorted(set(done.targets))))
    if confusion_out:
        from ..training.plot import plot_confusion

        plot_confusion(result.confusion, names, confusion_out)
        print(f"  confusion matrix -> {confusion_out}")
    if json_out:
        atomic_write(json_out, json.dumps(summary, indent=2) + "\n")
        print(f"  results -> {json_out}")


def _per_class_report(result: Any, names: Sequence[str], present: Sequence[int]) -> dict[str, Any]:
    """Print recall, precision and F1 of each class present in the set ("-" where undefined: precision of a class
    never predicted); return them for the JSON report (undefined values as null)."""
    metrics = result.per_class_metrics()
    width = max(len(names[i]) for i in present)
    print(f"  {'class':<{width}}  recall  precision      F1  images")
    rows = {}
    for i in present:
        values = {k: metrics[k][i] for k in ("recall", "precision", "f1")}
        images = int(result.confusion[i].sum())
        cells = [f"{v:6.2f}%" if not math.isnan(v) else f"{'-':>7}" for v in values.values()]
        print(f"  {names[i]:<{width}} {cells[0]}    {cells[1]} {cells[2]}  {images:6d}")
        rows[names[i]] = {k: None if math.isnan(v) else v for k, v in values.items()} | {"images": images}
    return {"per_class_top1": {n: r["recall"] for n, r in rows.items()}, "per_class": rows}
