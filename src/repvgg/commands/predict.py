"""``repvgg predict``: the top classes of image files, with the model's class names and preprocessing, on the
fastest engine (or an exported file on its own runtime)."""

from __future__ import annotations

import argparse

from ..files import Outputs
from .args import PRETRAINED_HELP, positive_int

WRITES = False


def inputs(args: argparse.Namespace) -> list[str | None]:
    return [args.checkpoint, args.pretrained]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..deploy.engines import ENGINES

    p.add_argument("checkpoint", help="checkpoint, or exported .onnx/.xml/TorchScript file (with --pretrained: the "
                   "first image)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files to classify")
    p.add_argument("--pretrained", metavar="WEIGHTS", help=PRETRAINED_HELP + "; instead of CHECKPOINT")
    p.add_argument("--engine", choices=list(ENGINES), help="default: the fastest one here (probed once, cached)")
    p.add_argument("--top", type=positive_int, default=5, help="classes shown per image")
    p.add_argument("--model", help="architecture, when the file does not say")


def run(args: argparse.Namespace, outputs: Outputs) -> None:
    from ..deploy.artifacts import artifact_format
    from ..deploy.predict import predict
    from ..deploy.probe import fastest_engine
    from ..deploy.sources import deploy_model_source, open_artifact

    images = [args.checkpoint, *args.images] if args.pretrained else args.images
    if not args.pretrained and artifact_format(args.checkpoint):
        model, metadata = open_artifact(args.checkpoint, args.engine, max(len(images), 1)), None
        engine = model.engine
    else:
        model, ckpt, _ = deploy_model_source(None if args.pretrained else args.checkpoint, args.pretrained, args.model)
        engine, metadata = args.engine or fastest_engine(batch_size=max(len(images), 1)), ckpt.metadata
    results = predict(model, images, engine, metadata, args.top)
    print(f"engine: {engine}")
    for image, top in zip(images, results, strict=True):
        print(f"{image}:")
        for name, prob in top:
            print(f"  {prob:8.2%}  {name}")
