"""``repvgg bench``: speed and memory of the training-time and deploy forms on each engine against torchvision
ResNets, measured side by side, for an architecture with random weights, a trained checkpoint, or an exported
(float32 or int8) file; measurements only (benchmarks/deploy_speed.py checks targets)."""

from __future__ import annotations

import argparse
import json
import sys

from ..files import Outputs, atomic_write
from .args import add_checkpoint, checkpoint_of, figure_file, output_file, positive_int

WRITES = True


def inputs(args: argparse.Namespace) -> list[str | None]:
    return [checkpoint_of(args)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..deploy.benchmark import BASELINES, BENCH_ENGINES

    add_checkpoint(p, "a checkpoint to time (its own model, strides and image size), or an exported .onnx/.xml/"
                      "TorchScript file, float32 or int8 (on each engine that runs it); default: --model with random "
                      "weights")
    p.add_argument("--model", help="architecture to time with random weights (default: repvgg_a0; see `repvgg "
                   "list`); with a checkpoint that does not say, its architecture")
    p.add_argument("--img-size", type=positive_int, nargs=2, metavar=("H", "W"),
                   help="input height and width (default: the checkpoint's or exported file's, else 224 224)")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 16], help="batch sizes to time")
    p.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds; speeds are medians over them")
    p.add_argument("--images-per-round", type=positive_int, default=8,
                   help="images timed per configuration and batch size")
    p.add_argument("--engines", nargs="+", choices=list(BENCH_ENGINES), default=list(BENCH_ENGINES),
                   help="engines to time the deploy model on")
    p.add_argument("--baselines", nargs="*", default=list(BASELINES), help="torchvision ResNets (random weights)")
    p.add_argument("--no-train", action="store_true", help="leave out the training-time model")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration peak-memory subprocesses")
    p.add_argument("--int8", action="store_true", help="also the int8 model (post-training quantized, random "
                   "calibration) on each ONNX-based engine, beside its float32 row")
    p.add_argument("--json", type=output_file, help="also write the results as JSON")
    p.add_argument("--plot", type=figure_file, help="also draw the results to this image file")


def run(args: argparse.Namespace, outputs: Outputs) -> None:
    from ..deploy.benchmark import format_table, plot_report, run_benchmark

    json_out = outputs.file(args.json, "--json") if args.json else None
    plot_out = outputs.file(args.plot, "--plot") if args.plot else None
    report = run_benchmark(args.model, tuple(args.img_size) if args.img_size else None, args.batch_sizes,
                           args.rounds, args.images_per_round, args.engines, args.baselines, train=not args.no_train,
                           memory=not args.no_memory, log=lambda msg: print(msg, file=sys.stderr, flush=True),
                           int8=args.int8, source=checkpoint_of(args))
    print(format_table(report))
    if json_out:
        atomic_write(json_out, json.dumps(report, indent=2) + "\n")
        print(f"results -> {json_out}")
    if plot_out:
        plot_report(report, plot_out)
        print(f"chart -> {plot_out}")
