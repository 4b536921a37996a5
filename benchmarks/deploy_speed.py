"""Deployment speed against its acceptance targets: runs ``repvgg bench``'s measurement, prints its table, checks the
targets below at the largest batch size and writes the report (with the verdicts) as JSON plus a chart, into
``runs/results/bench_a0.{json,png}`` (``benchmarks/results/`` with ``--update-results``, the committed results).

    .venv/bin/python benchmarks/deploy_speed.py [--batch-sizes 1 16] [--rounds 5] [--no-memory]

Exits with status 1 when a target is not met.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any

from folders import add_results_arguments, results_folder
from repvgg.commands.args import HelpFormatter, positive_int
from repvgg.commands.exits import run_command
from repvgg.deploy.benchmark import BASELINES, BENCH_ENGINES, format_table, plot_report, run_benchmark
from repvgg.files import atomic_write

# summary ratio -> the least value accepted
TARGETS = {
    "deploy_vs_train": 2.0,  # fastest deploy engine vs the training-time model (torch)
    "deploy_vs_resnet18": 2.0,  # fastest deploy engine vs ResNet-18 (torch)
    "default_vs_fastest": 0.95,  # the default engine (repvgg.fastest_engine) vs the fastest one
}


def check_targets(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target with its measured ratio and whether it is met (ratios that were not measured are left out)."""
    return {key: {"value": summary[key], "target": least, "met": summary[key] >= least}
            for key, least in TARGETS.items() if summary.get(key) is not None}


def build_parser() -> argparse.ArgumentParser:
    """The command line, every option with a help line and its default."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default="repvgg_a0", help="architecture to convert and time")
    parser.add_argument("--img-size", type=positive_int, nargs=2, default=[224, 224], metavar=("H", "W"),
                        help="input height and width")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 16], help="batch sizes to time")
    parser.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds (medians are reported)")
    parser.add_argument("--images-per-round", type=positive_int, default=8, help="images timed per round and batch")
    parser.add_argument("--engines", nargs="+", choices=list(BENCH_ENGINES), default=list(BENCH_ENGINES),
                        help="deploy engines to time")
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES), help="torchvision models timed alongside")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    add_results_arguments(parser)
    parser.add_argument("--no-plot", action="store_true", help="no chart beside the JSON report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run_benchmark(args.model, tuple(args.img_size), args.batch_sizes, args.rounds, args.images_per_round,
                           args.engines, args.baselines, memory=not args.no_memory,
                           log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_table(report))
    report["targets"] = check_targets(report["summary"])
    for key, t in report["targets"].items():
        print(f"{key}: {t['value']:.2f}x, target >= {t['target']}x: {'met' if t['met'] else 'NOT met'}")
    out = results_folder(args)
    atomic_write(out / "bench_a0.json", json.dumps(report, indent=2) + "\n")
    print(f"results -> {out / 'bench_a0.json'}")
    if not args.no_plot:
        plot_report(report, out / "bench_a0.png")
        print(f"chart -> {out / 'bench_a0.png'}")
    return 0 if all(t["met"] for t in report["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(run_command("deploy_speed.py", main))
