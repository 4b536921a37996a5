"""CIFAR-10 benchmark: RepVGG-A0 with the ``cifar`` recipe for a fixed number of epochs, evaluated in training-time
and deploy form, with the speed probe's side-by-side figures and the machine they were measured on.

    python benchmarks/cifar10.py                 # train (30 epochs by default), then report
    python benchmarks/cifar10.py --resume        # continue an interrupted run, then report
    python benchmarks/cifar10.py --report-only   # rebuild the report from the run directory
    python benchmarks/cifar10.py --cutout 8 --run-dir runs/c8 --device cuda   # a trial of the search, on a GPU

Writes ``runs/results/cifar10_a0.{json,md,png}`` (``benchmarks/results/`` with ``--update-results``, the committed
results). Target: at least 90% test top-1 for the deploy model within 30 epochs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from folders import RUNS, add_data_argument, add_results_arguments, cifar10_data, results_folder
from repvgg import create_model, model_from_checkpoint
from repvgg.commands.args import HelpFormatter, nonneg_int
from repvgg.commands.exits import run_command
from repvgg.commands.train import add_recipe_arguments, recipe_flags, recipe_overrides
from repvgg.errors import RepVGGError
from repvgg.files import atomic_write
from repvgg.hardware import BUSY_ELSEWHERE, busy_elsewhere, busy_probe_warning, cpu_info, device_name, matmul_gflops
from repvgg.models.preprocess import eval_transform
from repvgg.training.data import ImageFolder, collate
from repvgg.training.device import resolve_device
from repvgg.training.evaluate import evaluate
from repvgg.training.metrics import read_metrics
from repvgg.training.options import Callback, TrainOptions
from repvgg.training.plot import plot_run
from repvgg.training.recipes import RECIPES, Recipe, recipe_of, recipe_with
from repvgg.training.setup import load_datasets, resumed_options
from repvgg.training.speed import StepMode, candidate_modes, probe_modes
from repvgg.training.train import train

TARGET_TOP1, TARGET_EPOCHS = 90.0, 30
PROBE_FILE = "speed_probe.json"
TTA = "flip-translate"  # the test-time augmentation reported beside the plain figure


def probe(opts: TrainOptions, train_set: ImageFolder, classes: int, device: torch.device) -> dict[str, Any]:
    """Training images/s of every step mode on a real batch on ``device``, side by side (the fastest is used for the
    run; kept in the run directory for a resume and ``--report-only``), and the share of the cores other processes
    kept busy meanwhile: such a probe ranks the modes for a loaded machine, and the run keeps its choice to the end."""
    first = next(iter(DataLoader(train_set, batch_size=128, shuffle=True, collate_fn=collate,
                                 generator=torch.Generator().manual_seed(0))))
    model = create_model(opts.model, num_classes=classes, strides=opts.recipe.strides).to(device)
    speeds, busy = busy_elsewhere(lambda: probe_modes(model, candidate_modes(device, None, None, None),
                                                      first.images.to(device), first.targets.to(device)))
    chosen = max(speeds, key=speeds.get)
    print("speed probe: " + ", ".join(f"{m.label} {v:.0f} img/s" for m, v in speeds.items()), flush=True)
    if warning := busy_probe_warning(busy, chosen.label):
        print(warning, flush=True)
    return dict(batch_size=len(first.targets), images_per_s={m.label: v for m, v in speeds.items()},
                chosen=chosen.label, chosen_mode=asdict(chosen), busy_elsewhere=round(busy, 3))


class KeepProbe(Callback):
    """Writes the probe into the run folder once the run has started there: a run refused there (the folder holds
    another run) leaves that run's files as they were."""

    def __init__(self, run_dir: Path, result: dict[str, Any]) -> None:
        self.path, self.result, self.kept = run_dir / PROBE_FILE, result, False

    def on_epoch_start(self, epoch: int, indices: Sequence[int]) -> None:
        if not self.kept:
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(json.dumps(self.result, indent=2)))
            self.kept = True


def stored_probe(run_dir: Path) -> dict[str, Any]:
    """The speed probe kept by the run's training invocation."""
    path = run_dir / PROBE_FILE
    if not path.is_file():
        raise RepVGGError(f"{path} not found: --report-only needs a run trained by this benchmark")
    return json.loads(path.read_text())


def report(run_dir: Path, data_root: Path, probe_result: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Results of a finished run: summary, per-epoch rows, and the deploy file re-loaded and evaluated on
    ``device``."""
    summary = json.loads((run_dir / "summary.json").read_text())
    model, ckpt = model_from_checkpoint(summary["deploy_checkpoint"])
    recipe, seed = recipe_of(ckpt.metadata), ckpt.metadata.get("seed", 0)
    test = ImageFolder(data_root, eval_transform(ckpt.metadata["preprocess"]))
    loader = DataLoader(test, batch_size=256, collate_fn=collate, num_workers=1)
    classes = len(ckpt.metadata["class_names"])
    reloaded = evaluate(model.to(device), loader, device, classes, tta=TTA)
    rows = read_metrics(run_dir)
    gflops = matmul_gflops()
    in_budget = summary["epochs"] <= TARGET_EPOCHS
    return dict(
        model="repvgg_a0", recipe=summary["recipe"], epochs=summary["epochs"],
        training_time_s=summary["wall_time_s"], train_images_per_s=statistics.median(
            r["train_images_per_s"] for r in rows), train_top1=summary["train_top1"],
        train_top5=summary["train_top5"], deploy_top1=summary["deploy_top1"], deploy_top5=summary["deploy_top5"],
        reloaded_deploy_top1=reloaded.top1, tta=TTA, reloaded_deploy_top1_tta=reloaded.tta.top1,
        deploy_eval_images_per_s=reloaded.images_per_s,
        target=dict(top1=TARGET_TOP1, epochs=TARGET_EPOCHS,
                    met=in_budget and summary["deploy_top1"] >= TARGET_TOP1,
                    met_with_tta=in_budget and reloaded.tta.top1 >= TARGET_TOP1),
        probe=probe_result, per_epoch=[{k: v for k, v in r.items() if k != "lr_steps"} for r in rows],
        recipe_values={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(recipe).items()},
        seed=seed,
        machine=dict(**cpu_info(), matmul_fp32_gflops=gflops, torch=torch.__version__,
                     python=platform.python_version(), device=device_name(device)),
        command=reproduce_command(recipe, seed),
    )


def reproduce_command(recipe: Recipe, seed: int = 0) -> str:
    """The command that trains this run again: the run's own recipe as flags over the ``cifar`` recipe, and its
    seed unless the default."""
    seeded = ["--seed", str(seed)] if seed else []
    return " ".join(["python benchmarks/cifar10.py", *recipe_flags(recipe, RECIPES["cifar"]), *seeded])


def met(flag: bool) -> str:
    """A target's verdict as printed."""
    return "met" if flag else "not met"


def epoch_table(rows: list[dict[str, Any]]) -> list[str]:
    """One markdown row per epoch: learning rate at its end, losses, validation top-1 and wall time."""
    lines = ["| epoch | lr (end) | train loss | val loss | val top-1 | epoch time |", "|---:|---:|---:|---:|---:|---:|"]
    for e in rows:
        lines.append(f"| {e['epoch']} | {e['lr']:.4f} | {e['train_loss']:.3f} | {e.get('val_loss', float('nan')):.3f} "
                     f"| {e.get('val_top1', float('nan')):.2f}% | {e['epoch_time_s'] / 60:.1f} min |")
    return lines


def write_markdown(path: Path, r: dict[str, Any]) -> None:
    """A short human-readable summary next to the JSON."""
    m, p = r["machine"], r["probe"]
    speeds = "; ".join(f"{label}: {v:.0f}" for label, v in sorted(p["images_per_s"].items(), key=lambda kv: -kv[1]))
    lines = [
        "# RepVGG-A0 on CIFAR-10 (`cifar` recipe)", "",
        f"CPU: {m['model']}, {m['cores']} cores, flags {', '.join(m['features']) or 'none of AVX2/AVX-512/AMX'}; "
        f"float32 matmul {m['matmul_fp32_gflops']:.0f} GFLOP/s; torch {m['torch']}"
        + (f"; trained and evaluated on {m['device']}." if m.get("device", "cpu") != "cpu" else "."), "",
        "| epochs | training time | training images/s | top-1 training-time | top-1 deploy | deploy file re-loaded "
        f"| same, {r['tta']} TTA |", "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['epochs']} | {r['training_time_s'] / 60:.1f} min | {r['train_images_per_s']:.0f} | "
        f"{r['train_top1']:.2f}% | {r['deploy_top1']:.2f}% | {r['reloaded_deploy_top1']:.2f}% | "
        f"{r['reloaded_deploy_top1_tta']:.2f}% |", "",
        f"The training-time and deploy columns are evaluated in the run's step mode ({p['chosen']}); the re-loaded "
        "deploy file and its TTA in float32.", "",
        f"Target: deploy top-1 >= {TARGET_TOP1:.0f}% within {TARGET_EPOCHS} epochs: without TTA "
        f"**{met(r['target']['met'])}**; with {r['tta']} TTA **{met(r['target']['met_with_tta'])}**.", "",
        f"Speed probe (training images/s, batch {p['batch_size']}, interleaved rounds, medians): {speeds}. "
        f"Chosen: {p['chosen']}" + (f" (measured while other processes kept {p['busy_elsewhere']:.0%} of the cores "
                                    "busy)." if p.get("busy_elsewhere", 0.0) > BUSY_ELSEWHERE else "."), "",
        "Curves: `cifar10_a0.png`. Recipe: " + ", ".join(f"{k}={v}" for k, v in r["recipe_values"].items()), "",
        *epoch_table(r["per_epoch"]), "",
        "Reproduce: `" + r["command"] + "`", "",
    ]
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines)))


def build_parser() -> argparse.ArgumentParser:
    """The command line, every option with a help line and its default."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_argument(p)
    p.add_argument("--workers", type=nonneg_int, default=1, help="data-loading worker processes")
    p.add_argument("--run-dir", default=str(RUNS / "cifar10_a0"),
                   help="run directory: checkpoints, metrics and the speed probe")
    add_results_arguments(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir (in its own recipe where no flag sets a value)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from --run-dir")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="seed of initialization, shuffling and augmentation (another one measures a recipe's spread; "
                   "a resume gives the run's own)")
    add_recipe_arguments(p)  # a trial of the recipe search: the cifar recipe with some values changed
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cifar10_data(args)
    overrides = recipe_overrides(args)
    device = resolve_device(args.device)
    opts = resumed_options(TrainOptions(
        data=args.data, out_dir=args.run_dir, model="repvgg_a0", recipe=recipe_with("cifar", **overrides),
        recipe_given=frozenset(overrides), workers=args.workers, probe=False, device=str(device), seed=args.seed,
        resume="auto" if args.resume else None))
    train_set, val_set, classes = load_datasets(opts)
    run_dir = Path(args.run_dir)
    if args.report_only or (args.resume and (run_dir / PROBE_FILE).is_file()):
        probe_result = stored_probe(run_dir)  # a resume trains on in the mode the run's own probe chose
    else:
        probe_result = probe(opts, train_set, len(classes), device)
    if not args.report_only:
        chosen = StepMode(**probe_result["chosen_mode"])
        opts.amp, opts.channels_last, opts.threads = chosen.amp, chosen.channels_last, chosen.threads
        opts.callbacks = [KeepProbe(run_dir, probe_result)]
        t0 = time.monotonic()
        train(opts, train_set, val_set, classes)
        print(f"trained in {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    torch.set_num_threads(probe_result["chosen_mode"]["threads"])
    result = report(run_dir, Path(val_set.root), probe_result, device)
    out = results_folder(args)
    atomic_write(out / "cifar10_a0.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    write_markdown(out / "cifar10_a0.md", result)
    plot_run(args.run_dir, out / "cifar10_a0.png", title=f"RepVGG-A0 on CIFAR-10: {result['command']}")
    print(f"top-1: training-time {result['train_top1']:.2f}%, deploy {result['deploy_top1']:.2f}% (re-loaded "
          f"{result['reloaded_deploy_top1']:.2f}%, {TTA} TTA {result['reloaded_deploy_top1_tta']:.2f}%) after "
          f"{result['epochs']} epochs; wrote {out / 'cifar10_a0.json'}")


if __name__ == "__main__":
    sys.exit(run_command("cifar10.py", main))
