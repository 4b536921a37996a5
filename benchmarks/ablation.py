"""The paper's ablation at small scale: does each branch of the RepVGG block earn its place?

Trains RepVGG with every branch variant (3x3 only, 3x3+1x1, 3x3+identity, the full block), the QARepVGG block and a
ResNet-18 adapted to small images, with the same recipe, epochs and seeds on CIFAR-10, and measures for each: test
top-1 of the training-time and deploy forms (mean and standard deviation over seeds), training images/s and peak
memory of the training-time form, and deploy images/s (all models side by side, interleaved). Finished runs are reused
and an interrupted one resumes where it stopped, so the command can simply be run again.

    python benchmarks/ablation.py  # --epochs 4 --seeds 0 1 2 --train-subset 20000 --batch-size 128 --warmup-epochs 0.5

Writes ``runs/results/ablation.{json,md,png}`` (``benchmarks/results/`` with ``--update-results``, the committed
results).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from folders import RUNS, add_data_argument, add_results_arguments, cifar10_data, rerun_command, results_folder
from repvgg import create_model, model_from_checkpoint
from repvgg.commands.args import HelpFormatter, nonneg_float, nonneg_int, positive_int
from repvgg.commands.exits import run_command
from repvgg.files import atomic_write
from repvgg.hardware import cpu_info, matmul_gflops, measure_throughput
from repvgg.models.blocks import BRANCHES
from repvgg.optional import require
from repvgg.training.options import TrainOptions
from repvgg.training.recipes import recipe_with
from repvgg.training.sampling import fixed_subset
from repvgg.training.setup import load_datasets
from repvgg.training.speed import StepMode, candidate_modes, probe_modes, step_runner
from repvgg.training.train import train

BASELINE = "resnet18"
QAREPVGG = "qarepvgg"  # the full block in its quantization-friendly form (QARepVGG), for the quantization study
PAPER_B0 = {"3x3": 72.39, "3x3+1x1": 73.15, "3x3+identity": 74.79, "full": 75.14}  # ImageNet top-1, 120 epochs


# --- models -----------------------------------------------------------------------------------------------------

def resnet18_small(num_classes: int, strides: tuple[int, ...]) -> nn.Module:
    """torchvision's ResNet-18 for small images: a 3x3 stem with RepVGG's stage0 stride, and the max-pool only where
    RepVGG's stage1 downsamples, so both networks see the same resolutions stage by stage."""
    resnet = require("torchvision.models").resnet18(weights=None, num_classes=num_classes)
    resnet.conv1 = nn.Conv2d(3, 64, 3, strides[0], 1, bias=False)
    resnet.maxpool = nn.MaxPool2d(3, 2, 1) if strides[1] == 2 else nn.Identity()
    return resnet


def build(variant: str, num_classes: int, args: argparse.Namespace) -> nn.Module:
    """A fresh training-time model of one study entry."""
    if variant == BASELINE:
        return resnet18_small(num_classes, tuple(args.strides))
    block, branches = _block_and_branches(variant)
    return create_model(args.model, num_classes=num_classes, strides=tuple(args.strides), branches=branches,
                        block=block)


def _block_and_branches(variant: str) -> tuple[str, str]:
    """The RepVGG block kind and branches of a study entry (not the baseline)."""
    return ("qarepvgg", "full") if variant == QAREPVGG else ("repvgg", variant)


# --- training ---------------------------------------------------------------------------------------------------

def train_all(args: argparse.Namespace, mode: StepMode) -> dict[str, list[dict[str, Any]]]:
    """Train (or reuse, or resume) every variant with every seed; returns the summaries by variant."""
    train_set, val_set, classes = load_datasets(_options(args, "full", 0, mode))
    train_set = fixed_subset(train_set, args.train_subset)
    summaries: dict[str, list[dict[str, Any]]] = {}
    for seed in args.seeds:
        for variant in args.variants:
            print(f"== {variant}, seed {seed}", flush=True)
            opts = _options(args, variant, seed, mode)
            summaries.setdefault(variant, []).append(train(opts, train_set, val_set, classes))
    return summaries


def _options(args: argparse.Namespace, variant: str, seed: int, mode: StepMode) -> TrainOptions:
    baseline = variant == BASELINE
    block, branches = ("repvgg", "full") if baseline else _block_and_branches(variant)
    return TrainOptions(
        data=args.data, out_dir=str(Path(args.run_root) / f"{variant}-seed{seed}"),
        model="resnet18_small" if baseline else args.model, block=block, branches=branches,
        model_factory=(lambda n: resnet18_small(n, tuple(args.strides))) if baseline else None,
        recipe=recipe_with("cifar", epochs=args.epochs, strides=tuple(args.strides), batch_size=args.batch_size,
                           warmup_epochs=args.warmup_epochs),
        seed=seed, resume="auto",
        workers=args.workers, amp=mode.amp, channels_last=mode.channels_last, threads=mode.threads, probe=False,
        tensorboard=False)


# --- speed and memory -------------------------------------------------------------------------------------------

def training_speed(args: argparse.Namespace, mode: StepMode) -> dict[str, float]:
    """Training images/s of every variant's training-time form, measured side by side in one process."""
    x = torch.randn(args.measure_batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.measure_batch,))
    speeds = measure_throughput({v: step_runner(build(v, 10, args).train(), mode, x, y) for v in args.variants},
                                args.measure_batch, rounds=args.rounds, iters_per_round=1, warmup=1, inference=False)
    return {v: s["images_per_s"] for v, s in speeds.items()}


def peak_memory_mib(args: argparse.Namespace) -> dict[str, float]:
    """Peak resident memory rise of a few training steps of each variant, each in a fresh process of its own (MiB);
    the processes run side by side, since each measures only itself."""
    procs = {v: subprocess.Popen([sys.executable, __file__, "--measure-memory", v, "--model", args.model,
                                  "--measure-batch", str(args.measure_batch), "--img-size", str(args.img_size),
                                  "--strides", *map(str, args.strides)], stdout=subprocess.PIPE, text=True)
             for v in args.variants}
    out = {v: p.communicate()[0] for v, p in procs.items()}
    for p in procs.values():
        if p.returncode:
            raise subprocess.CalledProcessError(p.returncode, p.args)
    return {v: float(text.strip().splitlines()[-1]) for v, text in out.items()}


def _measure_memory(args: argparse.Namespace) -> None:
    """Child process of :func:`peak_memory_mib`: print the VmHWM rise over three training steps."""
    def status() -> dict[str, int]:
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}

    model = build(args.measure_memory, 10, args).train()
    step = step_runner(model, StepMode(), torch.randn(args.measure_batch, 3, args.img_size, args.img_size),
                       torch.randint(0, 10, (args.measure_batch,)))
    before = status()["VmRSS"]
    for _ in range(3):
        step()
    print((status()["VmHWM"] - before) / 1024)


def deploy_speed(args: argparse.Namespace) -> dict[str, float]:
    """Inference images/s of every variant's trained deploy model (ResNet-18 as trained), interleaved."""
    models = {}
    for variant in args.variants:
        path = Path(args.run_root) / f"{variant}-seed{args.seeds[0]}" / "model_deploy.pth"
        if variant == BASELINE:
            state = torch.load(path, weights_only=True)["state_dict"]  # written by this library's training
            models[variant] = resnet18_small(state["fc.weight"].shape[0], tuple(args.strides))
            models[variant].load_state_dict(state)
        else:
            models[variant] = model_from_checkpoint(path)[0]
    x = torch.randn(args.measure_batch, 3, args.img_size, args.img_size)
    runners = {v: (lambda m=m.eval(): m(x)) for v, m in models.items()}  # noqa: B008 (eval() once, here)
    speeds = measure_throughput(runners, args.measure_batch, rounds=args.rounds)
    return {v: s["images_per_s"] for v, s in speeds.items()}


# --- report -----------------------------------------------------------------------------------------------------

def aggregate(summaries: dict[str, list[dict[str, Any]]], train_ips: dict[str, float], memory: dict[str, float],
              deploy_ips: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation over seeds of each variant's top-1, beside its speeds and memory."""
    table = {}
    for variant, runs in summaries.items():
        row: dict[str, Any] = {"seeds": len(runs), "epochs": runs[0]["epochs"]}
        for form in ("train", "deploy"):
            values = [r[f"{form}_top1"] for r in runs]
            row[f"{form}_top1"] = values
            row[f"{form}_top1_mean"] = statistics.fmean(values)
            row[f"{form}_top1_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row.update(train_images_per_s=train_ips[variant], train_peak_mib=memory[variant],
                   deploy_images_per_s=deploy_ips[variant], paper_b0_imagenet_top1=PAPER_B0.get(variant))
        table[variant] = row
    return table


def noise_notes(table: dict[str, dict[str, Any]]) -> list[str]:
    """The ordering by deploy top-1, and which neighbours in it differ by less than their seed noise."""
    order = sorted(table, key=lambda v: -table[v]["deploy_top1_mean"])
    notes = ["Ordering by deploy top-1: " + " > ".join(order) + "."]
    for a, b in itertools.pairwise(order):
        gap = table[a]["deploy_top1_mean"] - table[b]["deploy_top1_mean"]
        noise = table[a]["deploy_top1_std"] + table[b]["deploy_top1_std"]
        if gap <= noise:
            notes.append(f"- {a} vs {b}: {gap:.2f} points apart, within the seed noise ({noise:.2f}); more seeds or "
                         f"epochs are needed to resolve them.")
    return notes


def write_report(out: Path, result: dict[str, Any]) -> None:
    """ablation.json, ablation.md and ablation.png under ``out``."""
    atomic_write(out / "ablation.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    table, m = result["variants"], result["machine"]
    lines = ["# Branch ablation on CIFAR-10", "",
             f"{result['model']} (strides {result['strides']}), `cifar` recipe, {result['epochs']} epochs, seeds "
             f"{result['seeds']}; CPU: {m['model']} ({', '.join(m['features'])}).", "",
             "| variant | top-1 training-time | top-1 deploy | train img/s | train peak MiB | deploy img/s "
             "| paper (B0, ImageNet) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for variant, r in table.items():
        paper = f"{r['paper_b0_imagenet_top1']:.2f}%" if r["paper_b0_imagenet_top1"] else "-"
        lines.append(f"| {variant} | {r['train_top1_mean']:.2f} ± {r['train_top1_std']:.2f}% | "
                     f"{r['deploy_top1_mean']:.2f} ± {r['deploy_top1_std']:.2f}% | {r['train_images_per_s']:.0f} | "
                     f"{r['train_peak_mib']:.0f} | {r['deploy_images_per_s']:.0f} | {paper} |")
    lines += ["", "Mean ± standard deviation over seeds.", "", *noise_notes(table), "",
              "Reproduce: `" + result["command"] + "`", ""]
    atomic_write(out / "ablation.md", lambda tmp: Path(tmp).write_text("\n".join(lines)))
    _plot(out / "ablation.png", table)


def _plot(path: Path, table: dict[str, dict[str, Any]]) -> None:
    plt = require("matplotlib.pyplot")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    names = list(table)
    left.bar(names, [table[n]["deploy_top1_mean"] for n in names], yerr=[table[n]["deploy_top1_std"] for n in names],
             capsize=4, color="tab:blue")
    left.set(ylabel="test top-1 (%), deploy form", title="Accuracy per variant (mean ± std over seeds)")
    left.tick_params(axis="x", labelrotation=20)
    low = min(table[n]["deploy_top1_mean"] - table[n]["deploy_top1_std"] for n in names)
    left.set_ylim(max(0.0, low - 2), None)
    for n in names:
        right.errorbar(table[n]["deploy_images_per_s"], table[n]["deploy_top1_mean"], yerr=table[n]["deploy_top1_std"],
                       fmt="o", capsize=4, label=n)
    right.set(xlabel="deploy images/s", ylabel="test top-1 (%)", title="Accuracy against inference speed")
    right.legend()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The command line, every option with a help line and its default."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_argument(p)
    p.add_argument("--model", default="repvgg_a0", help="RepVGG architecture every branch variant is built from")
    p.add_argument("--strides", type=positive_int, nargs=5, default=[1, 2, 2, 2, 2], help="stage0..stage4 strides")
    p.add_argument("--epochs", type=positive_int, default=4, help="epochs per run (the same for every variant)")
    p.add_argument("--seeds", type=nonneg_int, nargs="+", default=[0, 1, 2],
                   help="seeds; each variant trains once per seed")
    p.add_argument("--variants", nargs="+", default=[*BRANCHES[1:], BRANCHES[0], QAREPVGG, BASELINE],
                   choices=[*BRANCHES, QAREPVGG, BASELINE], help="what to train")
    p.add_argument("--train-subset", type=nonneg_int, default=20000,
                   help="train on this many images (a fixed random subset; 0: all)")
    p.add_argument("--workers", type=nonneg_int, default=1, help="data-loading processes")
    p.add_argument("--batch-size", type=positive_int, default=128, help="training batch")
    p.add_argument("--warmup-epochs", type=nonneg_float, default=0.5, help="warm-up length")
    p.add_argument("--measure-batch", type=positive_int, default=128, help="batch of the speed and memory measurements")
    p.add_argument("--img-size", type=positive_int, default=32, help="image side of the speed and memory measurements")
    p.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds of the speed measurements")
    p.add_argument("--run-root", default=str(RUNS / "ablation"), help="one run folder per variant and seed")
    add_results_arguments(p)
    p.add_argument("--measure-memory", metavar="VARIANT", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.measure_memory:  # a subprocess of the study: random images, no data set
        _measure_memory(args)
        return
    cifar10_data(args)
    probe_model = build("full", 10, args)
    x, y = torch.randn(args.measure_batch, 3, args.img_size, args.img_size), torch.randint(0, 10, (args.measure_batch,))
    speeds = probe_modes(probe_model, candidate_modes(torch.device("cpu"), None, None, None), x, y)
    mode = max(speeds, key=speeds.get)
    print(f"training step mode for every run: {mode.label}", flush=True)
    summaries = train_all(args, mode)
    torch.set_num_threads(mode.threads)
    result = dict(model=args.model, strides=args.strides, epochs=args.epochs, seeds=args.seeds, step_mode=mode.label,
                  variants=aggregate(summaries, training_speed(args, mode),
                                     peak_memory_mib(args), deploy_speed(args)),
                  machine=dict(**cpu_info(), matmul_fp32_gflops=matmul_gflops(), torch=torch.__version__,
                               python=platform.python_version()),
                  command=rerun_command("ablation.py", sys.argv[1:] if argv is None else argv))
    out = results_folder(args)
    write_report(out, result)
    print((out / "ablation.md").read_text())


if __name__ == "__main__":
    sys.exit(run_command("ablation.py", main))
