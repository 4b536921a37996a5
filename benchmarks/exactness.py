"""Worst-case conversion error of every architecture, float32 and float64.

Each model gets random weights and BatchNorm statistics far from 0/1 (means ~N(0, 0.5), variances in
[0.5, 2.5], gammas in [0.5, 1.5], betas ~N(0, 0.5)); the error is max|train - deploy| / max|train| over
several seeds and input shapes (batch 1 and non-square included). Writes runs/results/exactness.json
(benchmarks/results/ with --update-results, the committed results).

    .venv/bin/python benchmarks/exactness.py [--models repvgg_a0 ...] [--seeds 2]

Results of earlier runs with the same seeds and shapes are kept, so models can be measured a few at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from folders import add_results_arguments, results_folder
from repvgg import create_model, list_models, reparameterize
from repvgg.commands.args import HelpFormatter, positive_int
from repvgg.commands.exits import run_command
from repvgg.files import atomic_write
from repvgg.models.reparam import randomize_bn, relative_difference

SHAPES = ((1, 3, 224, 224), (2, 3, 96, 160), (1, 3, 75, 61))


def worst_error(name: str, seeds: int) -> dict[str, float]:
    worst = {"float32": 0.0, "float64": 0.0}
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = create_model(name).eval()
        randomize_bn(model)
        for key, dtype in (("float32", torch.float32), ("float64", torch.float64)):
            model.to(dtype)
            deploy = reparameterize(model)
            with torch.no_grad():
                for shape in SHAPES:
                    x = torch.randn(shape, dtype=dtype)
                    worst[key] = max(worst[key], relative_difference(model(x), deploy(x)))
    return worst


def build_parser() -> argparse.ArgumentParser:
    """The command line, every option with a help line and its default."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--models", nargs="+", default=list_models(),
                        help="architectures to check (default: every one)")
    parser.add_argument("--seeds", type=positive_int, default=2, help="random initializations per model")
    add_results_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    report = {"shapes": [list(s) for s in SHAPES], "seeds": args.seeds, "torch": torch.__version__,
              "max_relative_error": {}}
    out = results_folder(args) / "exactness.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    if {k: previous.get(k) for k in ("shapes", "seeds")} == {k: report[k] for k in ("shapes", "seeds")}:
        report["max_relative_error"] = previous["max_relative_error"]  # runs model by model add up
    print(f"{'model':<18}{'float32':>12}{'float64':>12}{'seconds':>9}")
    for name in args.models:
        start = time.perf_counter()
        err = report["max_relative_error"][name] = worst_error(name, args.seeds)
        print(f"{name:<18}{err['float32']:>12.2e}{err['float64']:>12.2e}{time.perf_counter() - start:>9.1f}",
              flush=True)
        atomic_write(out, json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(run_command("exactness.py", main))
