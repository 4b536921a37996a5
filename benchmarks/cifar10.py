"""CIFAR-10 proof run: RepVGG-A0 with the ``cifar`` recipe, trained within a wall-clock budget, evaluated in
training-time and deploy form; also times this library's training step against the plainest correct one.

    python benchmarks/cifar10.py --time-budget-min 75

Writes ``benchmarks/results/cifar10_a0.json`` and ``cifar10_a0.md``; the run directory keeps checkpoints and
curves (``--resume`` continues an interrupted run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from repvgg import create_model, model_from_checkpoint
from repvgg.deploy.benchmark import measure_throughput
from repvgg.files import atomic_write
from repvgg.training.data import collate, eval_transform
from repvgg.training.evaluate import evaluate
from repvgg.training.loop import RECIPES, TrainOptions, TrainStep, load_datasets, param_groups, recipe_with, train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "cifar10"
TRAIN_IMAGES = 50_000


def measure_steps(batch: tuple[torch.Tensor, torch.Tensor], recipe_lr: float, amp: str, channels_last: bool,
                  rounds: int, steps: int) -> dict[str, float]:
    """Images/s of the plainest correct training step (fp32, NCHW, bare loop) and of ours, interleaved; medians."""
    images, targets = batch
    torch.manual_seed(0)
    plain = create_model("repvgg_a0", num_classes=10, strides=RECIPES["cifar"].strides).train()
    ours = create_model("repvgg_a0", num_classes=10, strides=RECIPES["cifar"].strides).train()
    ours.load_state_dict(plain.state_dict())
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    plain_opt = torch.optim.SGD(param_groups(plain, 5e-4), lr=recipe_lr, momentum=0.9, nesterov=True)

    def plain_step() -> None:
        loss = criterion(plain(images), targets)
        plain_opt.zero_grad()
        loss.backward()
        plain_opt.step()

    if channels_last:
        ours = ours.to(memory_format=torch.channels_last)
    ours_opt = torch.optim.SGD(param_groups(ours, 5e-4), lr=recipe_lr, momentum=0.9, nesterov=True)
    step = TrainStep(ours, ours, ours_opt, criterion, torch.device("cpu"), amp, channels_last)
    runners = {"plain": plain_step, "ours": lambda: step(images, targets)}
    speed = measure_throughput(runners, len(targets), rounds, iters_per_round=steps, warmup=1, inference=False)
    return {name: r["images_per_s"] for name, r in speed.items()}


def write_markdown(path: Path, r: dict) -> None:
    """A short human-readable summary next to the JSON."""
    t = r["throughput"]
    lines = [
        "# RepVGG-A0 on CIFAR-10 (`cifar` recipe)", "",
        f"Machine: {r['machine']}, {r['threads']} torch thread(s); run started {r['started']}.", "",
        "| epochs | wall time | training images/s | top-1 training-time | top-1 deploy | deploy file re-loaded |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {r['epochs']} | {r['wall_time_s'] / 60:.1f} min | {r['train_images_per_s']:.0f} | "
        f"{r['train_top1']:.2f}% | {r['deploy_top1']:.2f}% | {r['reloaded_deploy_top1']:.2f}% |", "",
        f"Training step throughput, measured side by side (interleaved rounds, medians, batch {t['batch_size']}): "
        f"plain fp32 NCHW {t['plain_images_per_s']:.1f} images/s, ours ({t['ours']}) "
        f"{t['ours_images_per_s']:.1f} images/s: **{t['speedup']:.2f}x**.", "",
        f"Target 90% top-1 within 90 minutes: {'reached' if r['train_top1'] >= 90 else 'not reached'}. "
        f"{r['note']}", "",
        "Recipe: " + ", ".join(f"{k}={v}" for k, v in r["recipe"].items()), "",
        "Reproduce: `" + r["command"] + "`", "",
    ]
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder with train.tar.gz/test.tar.gz or train/ test/")
    p.add_argument("--time-budget-min", type=float, default=85, help="wall-clock budget for the whole benchmark")
    p.add_argument("--max-epochs", type=int, default=40)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 measured fastest on a "
                   "shared 2-core machine: 2 spinning OpenMP threads collapse when a core is busy)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--amp", choices=["none", "bf16"], default="bf16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the throughput comparison")
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "cifar10_a0"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    torch.set_num_threads(args.threads)

    opts = TrainOptions(data=args.data, out_dir=args.run_dir, model="repvgg_a0", recipe=RECIPES["cifar"],
                        workers=args.workers, amp=args.amp, channels_last=args.channels_last,
                        resume="auto" if args.resume else None)
    train_set, val_set, classes = load_datasets(opts)
    loader = DataLoader(train_set, batch_size=opts.recipe.batch_size, shuffle=True, collate_fn=collate,
                        num_workers=args.workers, generator=torch.Generator().manual_seed(0))
    first = next(iter(loader))
    speed = measure_steps((first.images, first.targets), opts.recipe.scaled_lr(opts.recipe.batch_size), args.amp,
                          args.channels_last, args.rounds, steps=2)
    ours_name = " + ".join([*(["bf16 autocast"] if args.amp == "bf16" else []),
                            *(["channels_last"] if args.channels_last else [])]) or "fp32"
    print(f"training step, side by side: plain {speed['plain']:.1f} images/s, ours ({ours_name}) "
          f"{speed['ours']:.1f} images/s ({speed['ours'] / speed['plain']:.2f}x)", flush=True)

    budget_s = args.time_budget_min * 60
    left = budget_s - (time.monotonic() - t0)
    epoch_s = TRAIN_IMAGES / speed["ours"] * 1.15 + len(val_set) / (speed["ours"] * 2.5)
    epochs = max(1, min(args.max_epochs, int((left - 0.5 * epoch_s) // epoch_s)))
    print(f"about {epochs} epochs of ~{epoch_s / 60:.1f} min fit in the {left / 60:.1f} min left at this pace; "
          f"re-planned after every epoch (at most {args.max_epochs})", flush=True)
    opts.recipe = recipe_with("cifar", epochs=args.max_epochs)
    opts.time_budget_min = left / 60
    summary = train(opts, train_set, val_set, classes)

    model, ckpt = model_from_checkpoint(summary["deploy_checkpoint"])
    test_loader = DataLoader(type(val_set)(val_set.root, eval_transform(ckpt.metadata["preprocess"])),
                             batch_size=256, collate_fn=collate, num_workers=args.workers)
    reloaded = evaluate(model, test_loader, torch.device("cpu"), 10)
    rows = [json.loads(line) for line in (Path(args.run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    train_ips = statistics.median(r["train_images_per_s"] for r in rows)
    result = dict(
        model="repvgg_a0", recipe_name=opts.recipe.name, started=started, epochs=summary["epochs"],
        wall_time_s=time.monotonic() - t0, training_time_s=summary["wall_time_s"], train_images_per_s=train_ips,
        train_top1=summary["train_top1"], train_top5=summary["train_top5"], deploy_top1=summary["deploy_top1"],
        deploy_top5=summary["deploy_top5"], reloaded_deploy_top1=reloaded.top1,
        deploy_eval_images_per_s=reloaded.images_per_s, per_epoch=rows,
        throughput=dict(batch_size=opts.recipe.batch_size, plain_images_per_s=speed["plain"],
                        ours_images_per_s=speed["ours"], ours=ours_name, speedup=speed["ours"] / speed["plain"],
                        rounds=args.rounds),
        recipe={k: list(v) if isinstance(v, tuple) else v for k, v in vars(opts.recipe).items()},
        threads=args.threads, workers=args.workers, amp=args.amp, channels_last=args.channels_last,
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        note="CPU-only and time-bound: the epoch count is what the budget allowed on a 2-core machine shared "
             "with other jobs; the cosine schedule ends on the last planned epoch.",
    )
    out = Path(args.results)
    atomic_write(out / "cifar10_a0.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    write_markdown(out / "cifar10_a0.md", result)
    print(f"top-1: training-time {result['train_top1']:.2f}%, deploy {result['deploy_top1']:.2f}% "
          f"(re-loaded {reloaded.top1:.2f}%) after {result['epochs']} epochs in {result['wall_time_s'] / 60:.1f} min; "
          f"wrote {out / 'cifar10_a0.json'}", flush=True)


if __name__ == "__main__":
    main()
