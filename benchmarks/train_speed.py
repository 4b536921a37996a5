"""Training speed of ``repvgg train`` against a minimal loop: end-to-end training images/s of
``repvgg.training.train.train`` on a fixed CIFAR-10 subset, on both data paths (decoded in memory, and per-image
loading processes), and of a minimal loop over the same pre-decoded tensors (whole-batch pad-crop and flip, forward,
backward, SGD step) on the same model in the same step mode; all measured interleaved in one process, medians over
the rounds. Every step mode asked for (float32 / bf16 autocast, NCHW / channels-last) and both blocks (the full
RepVGG block, and the plain network: branches 3x3) are measured, each also as GFLOP/s and as a fraction of the
machine's float32 and bf16 matmul rates.

    python benchmarks/train_speed.py
    python benchmarks/train_speed.py --amp bf16 --layouts channels_last --branches full --rounds 5

A measurement is one call: a new run of ``train()`` (or the minimal loop's next batches) for --warmup-steps steps,
then --steps timed steps; a ``train()`` call stops there. Writes ``train_speed.{json,md}`` into ``runs/results/``
(``benchmarks/results/`` with ``--update-results``). Target: ``repvgg train`` on the data path it chooses by
default at least 0.95x the minimal loop's images/s, in every step mode and block measured; exits with status 1
when it is not met.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as nnf
from torch.utils.data import Subset

from folders import add_data_argument, add_results_arguments, cifar10_data, rerun_command, results_folder
from repvgg import create_model
from repvgg.commands.args import HelpFormatter, positive_int
from repvgg.commands.exits import run_command
from repvgg.errors import RepVGGError
from repvgg.files import atomic_write
from repvgg.hardware import machine_description, matmul_gflops, time_interleaved
from repvgg.models.profile import count_macs
from repvgg.training.data import crop_padding
from repvgg.training.device import autocast
from repvgg.training.memory import in_memory
from repvgg.training.options import Callback, TrainOptions, default_workers
from repvgg.training.recipes import Recipe, preprocess_of, recipe_with
from repvgg.training.sampling import fixed_subset
from repvgg.training.setup import load_datasets
from repvgg.training.speed import StepMode, native_bf16, training_flops_per_image
from repvgg.training.train import train

TARGET = 0.95  # repvgg train (its default data path) / the minimal loop, in images/s
PATHS = ("memory", "loader")


class Enough(Exception):
    """Raised by :class:`StepClock` to end a measured ``train()`` run after its last timed step."""


class StepClock(Callback):
    """Times a run's optimizer steps and stops it after ``stop_after`` steps."""

    def __init__(self, stop_after: int) -> None:
        self.stop_after, self.times = stop_after, [time.perf_counter()]

    def on_step_end(self, epoch: int, step: int) -> None:
        self.times.append(time.perf_counter())
        if step >= self.stop_after:
            raise Enough


def images_per_s(times: list[float], warmup: int, batch_size: int) -> float:
    """Images/s over the steps after the first ``warmup`` ones (``times``: the start, then each step's end)."""
    timed = len(times) - 1 - warmup
    return timed * batch_size / (times[-1] - times[warmup])


def train_call(args: argparse.Namespace, sets: tuple[Any, Any, list[str]], path: str, branches: str,
               mode: StepMode, rates: list[float]) -> Callable[[], None]:
    """One measurement of ``train()`` on ``path``'s datasets: a new run, stopped after the timed steps."""
    train_set, val_set, classes = sets

    def call() -> None:
        clock = StepClock(args.warmup_steps + args.steps)
        with tempfile.TemporaryDirectory(prefix="train_speed-") as out:
            opts = TrainOptions(data=args.data, out_dir=out, recipe=args.recipe, branches=branches,
                                workers=args.workers, data_path=path, amp=mode.amp,
                                channels_last=mode.channels_last, threads=mode.threads, probe=False, device="cpu",
                                tensorboard=False, log=lambda s: None, callbacks=[clock])
            with contextlib.suppress(Enough):
                train(opts, train_set, val_set, classes)
        rates.append(images_per_s(clock.times, args.warmup_steps, args.recipe.batch_size))

    return call


def pad_crop_flip(images: Tensor, padding: int) -> Tensor:
    """The cifar recipe's augmentation of a uint8 batch in a few tensor operations (offsets from torch's RNG)."""
    n, _, height, width = images.shape
    padded = nnf.pad(images, [padding] * 4)
    top = torch.randint(0, 2 * padding + 1, (n, 1))
    left = torch.randint(0, 2 * padding + 1, (n, 1))
    ys, xs = top + torch.arange(height), left + torch.arange(width)
    xs = torch.where(torch.rand(n, 1) < 0.5, xs.flip(1), xs)
    rows = torch.gather(padded, 2, ys.view(n, 1, height, 1).expand(n, 3, height, padded.shape[-1]))
    return torch.gather(rows, 3, xs.view(n, 1, 1, width).expand(n, 3, height, width))


def minimal_call(args: argparse.Namespace, images: Tensor, targets: Tensor, classes: int, branches: str,
                 mode: StepMode, rates: list[float]) -> Callable[[], None]:
    """One measurement of the minimal loop: the next batches of a shuffled epoch over pre-decoded uint8 images."""
    r: Recipe = args.recipe
    model = create_model("repvgg_a0", num_classes=classes, strides=r.strides, branches=branches)
    if mode.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=r.scaled_lr(r.batch_size), momentum=r.momentum,
                                nesterov=r.nesterov, weight_decay=r.weight_decay)
    criterion = nn.CrossEntropyLoss(label_smoothing=r.label_smoothing)
    p = preprocess_of(r)
    mean, std = torch.tensor(p["mean"]).view(1, 3, 1, 1), torch.tensor(p["std"]).view(1, 3, 1, 1)
    padding = crop_padding(r.img_size, r.crop_pad)
    model.train()

    def call() -> None:
        torch.set_num_threads(mode.threads)
        order = torch.randperm(len(images))
        times = [time.perf_counter()]
        for k in range(args.warmup_steps + args.steps):
            batch = order[k * r.batch_size:(k + 1) * r.batch_size]
            x = (pad_crop_flip(images[batch], padding).float() / 255 - mean) / std
            if mode.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(torch.device("cpu"), mode.amp):
                loss = criterion(model(x), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter())
        rates.append(images_per_s(times, args.warmup_steps, r.batch_size))

    return call


def datasets(args: argparse.Namespace) -> tuple[dict[str, tuple[Any, Any, list[str]]], str]:
    """Each data path's (subset of the training set, validation set, classes), and the path ``repvgg train``
    chooses by default for this data."""
    def load(path: str) -> tuple[Any, Any, list[str]]:
        opts = TrainOptions(data=args.data, out_dir="", recipe=args.recipe, data_path=path,
                            log=lambda s: print(s, file=sys.stderr, flush=True))
        train_set, val_set, classes = load_datasets(opts)
        return fixed_subset(train_set, args.subset), Subset(val_set, range(min(len(val_set), 512))), classes

    sets = {path: load(path) for path in PATHS}
    auto = load_datasets(TrainOptions(data=args.data, out_dir="", recipe=args.recipe, log=lambda s: None))[0]
    return sets, "memory" if in_memory(auto) else "loader"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every variant's images/s samples (one per round), measured interleaved."""
    sets, default_path = datasets(args)
    subset = sets["memory"][0]
    decoded = subset.dataset.images[list(subset.indices)]
    targets = subset.dataset.target_tensor[list(subset.indices)]
    classes = len(sets["memory"][2])
    modes = [StepMode(amp, layout == "channels_last", args.threads) for amp in args.amp for layout in args.layouts]
    rates: dict[tuple[str, StepMode, str], list[float]] = {}
    calls: dict[tuple[str, StepMode | None, str], Callable[[], None]] = {}
    for branches in args.branches:
        for mode in modes:
            for path in PATHS:
                rates[branches, mode, path] = []
                calls[branches, mode, path] = train_call(args, sets[path], path, branches, mode,
                                                         rates[branches, mode, path])
            rates[branches, mode, "minimal"] = []
            calls[branches, mode, "minimal"] = minimal_call(args, decoded, targets, classes, branches, mode,
                                                            rates[branches, mode, "minimal"])
    matmul: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for name in matmul:  # the yardsticks, taken in every round beside the rows they divide
        calls["matmul", None, name] = lambda d=name: matmul[d].append(matmul_gflops(dtype=getattr(torch, d)))
    time_interleaved(calls, rounds=args.rounds, warmup=0, inference=False,
                     after_round=lambda r: print(f"round {r}/{args.rounds} done", file=sys.stderr, flush=True))
    return {"rates": rates, "default_path": default_path, "modes": modes,
            "matmul": {name: statistics.median(samples) for name, samples in matmul.items()},
            "matmul_samples": matmul}


def summarize(args: argparse.Namespace, measured: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (block, step mode): median images/s, GFLOP/s and shares of the matmul rates, and the median over
    rounds of each path's images/s over the minimal loop's in the same round (measured minutes apart at most, so
    that a change in the machine's load between rounds does not enter the ratio)."""
    rows, matmul = [], measured["matmul"]
    size = (args.recipe.img_size, args.recipe.img_size)
    for branches in args.branches:
        model = create_model("repvgg_a0", num_classes=10, strides=args.recipe.strides, branches=branches)
        flops = training_flops_per_image(count_macs(model, size, 3))
        for mode in measured["modes"]:
            row: dict[str, Any] = {"branches": branches, "step_mode": mode.label, **asdict(mode),
                                   "training_flops_per_image": flops}
            minimal = measured["rates"][branches, mode, "minimal"]
            for path in (*PATHS, "minimal"):
                samples = measured["rates"][branches, mode, path]
                ips = statistics.median(samples)
                gflops = ips * flops / 1e9
                ratios = [a / b for a, b in zip(samples, minimal, strict=True)]
                row[path] = {"images_per_s": ips, "samples": samples, "gflops": gflops,
                             "vs_minimal": statistics.median(ratios), "of_matmul_fp32": gflops / matmul["float32"],
                             "of_matmul_bf16": gflops / matmul["bfloat16"]}
            row["train_vs_minimal"] = row[measured["default_path"]]["vs_minimal"]
            rows.append(row)
    return rows


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    """The human-readable table next to the JSON."""
    m, s, t = report["machine"], report["settings"], report["target"]
    native = m["bf16_native"]
    lines = [
        "# Training speed: `repvgg train` against a minimal loop", "",
        f"{m['cpu']} ({', '.join(m['cpu_features'])}), {m['cpu_count']} cores, torch {m['versions']['torch']}; "
        f"matmul {m['matmul_gflops']['float32']:.0f} GFLOP/s float32, {m['matmul_gflops']['bfloat16']:.1f} bf16 "
        "(medians of one product per round, taken beside the rows)"
        + ("." if native else "; bf16 emulated: no native bf16 on this CPU, so no bf16 share is given."),
        f"RepVGG-A0, `cifar` recipe (batch {s['batch_size']}, {s['img_size']}x{s['img_size']}), a fixed "
        f"{s['subset']}-image CIFAR-10 subset; {s['steps']} timed steps after {s['warmup_steps']} per measurement, "
        f"median of {s['rounds']} interleaved rounds; loader path with {s['workers']} loading process(es); "
        f"`repvgg train` chooses the {t['path']} path here.", "",
        f"Command: `{s['command']}`", "",
        "| block | step mode | train, memory | train, loader | minimal loop | memory / minimal | loader / minimal "
        "| GFLOP/s (train) | of fp32 matmul | of bf16 matmul |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        d = r[t["path"]]
        lines.append(f"| {r['branches']} | {r['step_mode']} | {r['memory']['images_per_s']:.0f} | "
                     f"{r['loader']['images_per_s']:.0f} | {r['minimal']['images_per_s']:.0f} | "
                     f"{r['memory']['vs_minimal']:.2f}x | {r['loader']['vs_minimal']:.2f}x | {d['gflops']:.1f} | "
                     f"{d['of_matmul_fp32']:.0%} | {format(d['of_matmul_bf16'], '.0%') if native else '-'} |")
    lines += ["", "Images/s of training (forward, backward, optimizer step, and getting the batch), medians over the "
              "rounds; the ratios are medians of each round's ratio. "
              f"Target: `repvgg train` ({t['path']} path) at least {t['least']}x the minimal loop in every row: "
              f"**{'met' if t['met'] else 'not met'}** (lowest {t['lowest']:.2f}x)."]
    atomic_write(path, "\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line, every option with a help line and its default."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_argument(p)
    p.add_argument("--subset", type=positive_int, default=5000, help="training images: a fixed random subset")
    p.add_argument("--batch-size", type=positive_int, default=256, help="batch size (the cifar recipe's)")
    p.add_argument("--steps", type=positive_int, default=3, help="timed optimizer steps per measurement")
    p.add_argument("--warmup-steps", type=positive_int, default=1, help="untimed steps before them")
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds (medians are reported)")
    p.add_argument("--amp", nargs="+", choices=["none", "bf16"], default=["none", "bf16"],
                   help="precisions: float32 (none) and bf16 autocast")
    p.add_argument("--layouts", nargs="+", choices=["nchw", "channels_last"], default=["nchw", "channels_last"],
                   help="memory formats")
    p.add_argument("--branches", nargs="+", choices=["full", "3x3"], default=["full", "3x3"],
                   help="the full RepVGG block and the plain network")
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--workers", type=positive_int, default=default_workers(),
                   help="loading processes of the loader path (repvgg train's default)")
    add_results_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cifar10_data(args)
    args.recipe = recipe_with("cifar", batch_size=args.batch_size, cutout=0)  # the minimal loop has no Cutout
    if args.subset // args.batch_size < args.warmup_steps + args.steps:
        raise RepVGGError(f"--subset {args.subset} holds fewer than --warmup-steps + --steps batches")
    torch.set_num_threads(args.threads)
    measured = measure(args)
    results = summarize(args, measured)
    lowest = min(r["train_vs_minimal"] for r in results)
    report = {
        "machine": {**machine_description(), "matmul_gflops": measured["matmul"],
                    "matmul_gflops_per_round": measured["matmul_samples"],
                    "bf16_native": native_bf16(torch.device("cpu"))},
        "settings": {"model": "repvgg_a0", "recipe": "cifar", "img_size": args.recipe.img_size,
                     "batch_size": args.batch_size, "subset": args.subset, "steps": args.steps,
                     "warmup_steps": args.warmup_steps, "rounds": args.rounds, "workers": args.workers,
                     "threads": args.threads,
                     "command": rerun_command("train_speed.py", sys.argv[1:] if argv is None else argv)},
        "target": {"path": measured["default_path"], "least": TARGET, "lowest": lowest, "met": lowest >= TARGET},
        "results": results,
    }
    out = results_folder(args)
    atomic_write(out / "train_speed.json", json.dumps(report, indent=2) + "\n")
    write_markdown(out / "train_speed.md", report)
    print((out / "train_speed.md").read_text())
    return 0 if report["target"]["met"] else 1


if __name__ == "__main__":
    sys.exit(run_command("train_speed.py", main))
