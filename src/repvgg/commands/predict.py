"""``repvgg predict``: the top classes of images (files, folders, glob patterns), with the model's class names and
preprocessing, on the fastest engine (or an exported file on its own runtime); printed, and saved as JSON or CSV on
request."""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from ..errors import RepVGGError
from ..files import Outputs, atomic_write
from .args import PRETRAINED_HELP, output_file, positive_int

WRITES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..deploy.engines import ENGINES

    p.add_argument("paths", nargs="*", metavar="[CHECKPOINT] IMAGE",
                   help="the checkpoint or exported .onnx/.xml/TorchScript file (none with --pretrained), then images: "
                        "files, folders (searched recursively) or glob patterns ('val/cat/*.jpg')")
    p.add_argument("--pretrained", metavar="WEIGHTS", help=PRETRAINED_HELP + "; instead of CHECKPOINT")
    p.add_argument("--engine", choices=list(ENGINES), help="default: the fastest one here (probed once, cached)")
    p.add_argument("--top", type=positive_int, default=5, help="classes shown per image")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images read and run at a time")
    p.add_argument("--model", help="architecture, when the file does not say")
    p.add_argument("--json", metavar="FILE", type=output_file, help="also save the results as JSON")
    p.add_argument("--csv", metavar="FILE", type=output_file,
                   help="also save the results as CSV: one row per image, its path then each top class and "
                        "probability")


def _split(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(checkpoint, image paths, folders and patterns): with --pretrained every positional is an image."""
    from ..training.data import is_image_file

    if args.pretrained:
        return None, list(args.paths)
    if not args.paths:
        raise RepVGGError("no model given: name a checkpoint or exported file before the images, or use --pretrained")
    if is_image_file(args.paths[0]):
        raise RepVGGError(f"{args.paths[0]} is an image, not a model: name a checkpoint or exported file first, or "
                          f"use --pretrained WEIGHTS (e.g. --pretrained repvgg_a0)")
    return args.paths[0], list(args.paths[1:])


def inputs(args: argparse.Namespace) -> list[str | None]:
    from ..deploy.predict import image_files

    checkpoint, specs = _split(args)
    return [checkpoint, args.pretrained, *image_files(specs)]


def run(args: argparse.Namespace, outputs: Outputs) -> None:
    from ..deploy.artifacts import artifact_format
    from ..deploy.predict import image_files, predict
    from ..deploy.probe import fastest_engine
    from ..deploy.sources import deploy_model_source, open_artifact

    json_out = outputs.file(args.json, "--json") if args.json else None
    csv_out = outputs.file(args.csv, "--csv") if args.csv else None
    checkpoint, specs = _split(args)
    images = image_files(specs)
    if not images:
        raise RepVGGError("no images given")
    batch = min(args.batch_size, len(images))
    if checkpoint and artifact_format(checkpoint):
        model, metadata = open_artifact(checkpoint, args.engine, batch), None
        engine = model.engine
    else:
        model, ckpt, _ = deploy_model_source(checkpoint, args.pretrained, args.model)
        engine, metadata = args.engine or fastest_engine(batch_size=batch), ckpt.metadata
    results = predict(model, images, engine, metadata, args.top, args.batch_size)
    print(f"engine: {engine}")
    for image, top in zip(images, results, strict=True):
        print(f"{image}:")
        for name, prob in top:
            print(f"  {prob:8.2%}  {name}")
    source = checkpoint or f"pretrained {args.pretrained}"
    if json_out:
        atomic_write(json_out, _json(source, engine, images, results))
        print(f"results -> {json_out}")
    if csv_out:
        atomic_write(csv_out, _csv(images, results))
        print(f"results -> {csv_out}")


def _json(source: str, engine: str, images: Sequence[str], results: Sequence[Sequence[tuple[str, float]]]) -> str:
    rows: list[dict[str, Any]] = [{"path": image, "top": [{"class": name, "probability": prob} for name, prob in top]}
                                  for image, top in zip(images, results, strict=True)]
    return json.dumps({"model": source, "engine": engine, "images": rows}, indent=2) + "\n"


def _csv(images: Sequence[str], results: Sequence[Sequence[tuple[str, float]]]) -> str:
    k = max(len(top) for top in results)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", *(f"{what}_{i}" for i in range(1, k + 1) for what in ("class", "probability"))])
    for image, top in zip(images, results, strict=True):
        writer.writerow([image, *(value for name, prob in top for value in (name, f"{prob:.6f}"))])
    return text.getvalue()
