"""``repvgg convert``: a training-time checkpoint re-parameterized into a deploy checkpoint, checked before it is
written."""

from __future__ import annotations

import argparse

from ..files import Outputs
from .args import nonneg_float, output_file, positive_int

WRITES = True


def inputs(args: argparse.Namespace) -> list[str]:
    return [args.src]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="training-time checkpoint (this library's, official or timm format)")
    p.add_argument("dst", type=output_file, help="output file (.pth or .safetensors)")
    p.add_argument("--model", help="architecture, when the file does not say (e.g. repvgg_a0 or RepVGG-A0)")
    p.add_argument("--img-size", type=positive_int, default=64, help="side of the random check batch")
    p.add_argument("--tolerance", type=nonneg_float, default=1e-4,
                   help="largest relative output difference accepted")
    p.add_argument("--headless", action="store_true",
                   help="convert a checkpoint without a classifier (linear.*) as a backbone")


def run(args: argparse.Namespace, outputs: Outputs) -> None:
    from ..models.convert import convert_checkpoint

    dst = outputs.file(args.dst)
    result = convert_checkpoint(args.src, dst, args.model, args.img_size, args.tolerance, args.headless)
    head = f"{result.num_classes} classes" if result.num_classes else "headless: no classifier"
    print(f"converted {result.src} ({result.source_format}, {result.architecture}, {head}) -> {result.dst}; "
          f"max relative difference {result.rel_diff:.2e}")
