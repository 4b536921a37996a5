"""Int8 quantization study on CIFAR-10: RepVGG-A0 against QARepVGG-A0, its quantization-friendly block.

Takes both models as the branch ablation trained them (same recipe, epochs and training images; seed ``--seed``) and
measures for each, on the test set: top-1 of the float32 training-time and deploy forms, of int8 post-training
quantization (PTQ) with naive settings (per-tensor weights, min/max activation ranges) and with every other calibration
method of each int8 engine (the best kept), and of int8 after quantization-aware fine-tuning (QAT; both models in one
step mode, measured once); then images/s of float32 deploy on every engine beside int8 on every int8 engine,
interleaved, at batch 1 and 16, at the trained image size and at 224x224 (the same weights, for speed only). A finished
QAT run is reused, so the command can simply be run again. The ablation runs come first:

    python benchmarks/ablation.py --epochs 4 --seeds 0 1 2 --train-subset 20000 --batch-size 128 --warmup-epochs 0.5
    python benchmarks/quantization.py

Writes ``runs/results/quantization.{json,md,png}`` (``benchmarks/results/`` with ``--update-results``, the committed
results). Targets (checked here): the best int8 model within 0.5
points of its float32 deploy model's top-1 (1.0 at most); int8 at least 1.8x the images/s of the fastest float32
engine on the same CPU, at batch 1 and 16; the naive PTQ loss is reported as measured.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from folders import (
    CIFAR10,
    RUNS,
    add_data_argument,
    add_results_arguments,
    cifar10_data,
    rerun_command,
    results_folder,
    shown_path,
)
from repvgg import model_from_checkpoint
from repvgg.commands.args import HelpFormatter, nonneg_int, positive_int
from repvgg.commands.exits import run_command
from repvgg.deploy.engines import INT8_ENGINES, INT8_SUFFIXES, Engine, available_engines, create_engine
from repvgg.deploy.qat import QAT_METHOD, QATOptions, finetune_qat, qat_recipe
from repvgg.deploy.quantize import (
    METHODS,
    calibration_batches,
    int8_engine,
    int8_engines_installed,
    quantize_model,
    random_calibration,
)
from repvgg.deploy.sources import load_deploy_model
from repvgg.errors import RepVGGError
from repvgg.files import atomic_write
from repvgg.hardware import cpu_info, matmul_gflops, measure_throughput
from repvgg.models.checkpoints import Checkpoint, architecture_of, read_checkpoint
from repvgg.models.fakequant import prepare_qat
from repvgg.models.preprocess import eval_transform, input_size, preprocess_settings
from repvgg.optional import require
from repvgg.training.data import ImageFolder, collate, resolve_split
from repvgg.training.options import TrainOptions
from repvgg.training.sampling import fixed_subset
from repvgg.training.setup import load_datasets
from repvgg.training.speed import StepMode, candidate_modes, probe_modes

DEFAULT_RUN_ROOT = RUNS / "ablation"
ENTRIES = ("full", "qarepvgg")  # the ablation's RepVGG-A0 and QARepVGG-A0
ABLATION_SEEDS = (0, 1, 2)
ABLATION_ARGS = "--epochs 4 --seeds {seeds} --train-subset 20000 --batch-size 128 --warmup-epochs 0.5"
ROWS = {"float32_train": "float32 training-time", "float32_deploy": "float32 deploy",
        "int8_naive_ptq": "int8 naive PTQ", "int8_best_ptq": "int8 best PTQ", "int8_qat": "int8 QAT"}
NAIVE = "naive"
BATCH_SIZES = (1, 16)
EVAL_BATCH = 250
TARGET_POINTS, LIMIT_POINTS, TARGET_SPEEDUP = 0.5, 1.0, 1.8


# --- runs -------------------------------------------------------------------------------------------------------

class Run(NamedTuple):
    """One finished ablation run: its folder, training-time checkpoint (for the metadata) and summary."""

    entry: str
    name: str
    path: Path
    ckpt: Checkpoint
    summary: dict[str, Any]


def ablation_command(args: argparse.Namespace) -> str:
    """The ablation command that trains the runs this study reads."""
    seeds = " ".join(map(str, sorted({*ABLATION_SEEDS, args.seed})))
    cmd = "python benchmarks/ablation.py " + ABLATION_ARGS.format(seeds=seeds)
    if Path(args.data) != CIFAR10:
        cmd += f" --data {args.data}"
    return cmd + (f" --run-root {args.run_root}" if Path(args.run_root) != DEFAULT_RUN_ROOT else "")


def find_runs(args: argparse.Namespace) -> dict[str, Run]:
    """The finished ``full`` and ``qarepvgg`` runs of seed ``args.seed``, then any ``--extra-runs``; exits with one
    line naming the ablation command when an ablation run is missing."""
    runs = {}
    for entry in ENTRIES:
        path = Path(args.run_root) / f"{entry}-seed{args.seed}"
        missing = _missing(path)
        if missing:
            raise RepVGGError(f"no finished {entry} run in {path} ({', '.join(missing)} missing); the "
                             f"ablation study makes it: {ablation_command(args)}")
        runs[entry] = _run(entry, path)
    for extra in args.extra_runs:
        path = Path(extra)
        if missing := _missing(path):
            raise RepVGGError(f"{path} is not a finished training run ({', '.join(missing)} missing)")
        runs[path.name] = _run(path.name, path, f" ({path.name})")
    return runs


def _missing(path: Path) -> list[str]:
    return [f for f in ("model.pth", "model_deploy.pth", "summary.json") if not (path / f).is_file()]


def _run(entry: str, path: Path, note: str = "") -> Run:
    """A finished run, named by its block and architecture (``QARepVGG-A0``)."""
    ckpt = read_checkpoint(path / "model.pth")
    family = "QARepVGG" if ckpt.metadata.get("block") == "qarepvgg" else "RepVGG"
    size = architecture_of(ckpt.metadata, ckpt.state_dict).official_name.split("-", 1)[-1]  # RepVGG-A0: A0
    return Run(entry, f"{family}-{size}{note}", path, ckpt,
               json.loads((path / "summary.json").read_text()))


# --- test set ---------------------------------------------------------------------------------------------------

def spread(n: int, limit: int | None) -> list[int]:
    """``limit`` indices spread evenly over ``range(n)`` (all of them without a limit): every class is represented,
    since image folders list their images class by class."""
    return list(range(n)) if not limit or limit >= n else np.linspace(0, n - 1, limit).round().astype(int).tolist()


def load_test_set(args: argparse.Namespace, preprocess: dict[str, Any],
                  class_names: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """The test split (or ``--test-limit`` images of it) preprocessed once: float32 NCHW images and labels."""
    root = resolve_split(args.data, ("test", "val"))
    dataset = ImageFolder(root, eval_transform(preprocess))
    if class_names and list(class_names) != dataset.classes:
        raise RepVGGError(f"the classes in {root} differ from the {len(class_names)} the models learned")
    loader = DataLoader(Subset(dataset, spread(len(dataset), args.test_limit)), batch_size=EVAL_BATCH,
                        collate_fn=collate, num_workers=args.workers)
    images, labels = zip(*((b.images.numpy(), b.targets.numpy()) for b in loader), strict=True)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def top1(engine: Engine, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 (%) of ``engine`` over the images, in batches."""
    hits = sum(int((engine(images[i:i + EVAL_BATCH]).argmax(1) == labels[i:i + EVAL_BATCH]).sum())
               for i in range(0, len(images), EVAL_BATCH))
    return 100.0 * hits / len(labels)


# --- accuracy ---------------------------------------------------------------------------------------------------

def float32_top1(model: nn.Module, test: tuple[np.ndarray, np.ndarray], img_size: tuple[int, int]) -> dict[str, float]:
    """Test top-1 of the float32 deploy model on every float32 engine."""
    return {e: top1(create_engine(model, e, img_size=img_size, batch_size=EVAL_BATCH), *test)
            for e in available_engines()}


def ptq(model: nn.Module, batches: list[np.ndarray], test: tuple[np.ndarray, np.ndarray], img_size: tuple[int, int],
        engines: list[str], methods: list[str] | None) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any]]]:
    """(top-1, quantized model) by int8 engine and calibration method, for each of ``engines``'
    :func:`engine_methods`."""
    scores: dict[str, dict[str, float]] = {}
    quantized: dict[str, dict[str, Any]] = {}
    for engine in engines:
        for method in engine_methods(engine, methods):
            q = quantized.setdefault(engine, {})[method] = quantize_model(model, engine, batches, method, img_size)
            scores.setdefault(engine, {})[method] = top1(int8_engine(q, engine, EVAL_BATCH), *test)
            print(f"  PTQ {engine} {method}: {scores[engine][method]:.2f}%", flush=True)
    return scores, quantized


def engine_methods(engine: str, methods: list[str] | None) -> list[str]:
    """The engine's methods among ``methods`` (all of them without; its default when it offers none), then naive."""
    chosen = [m for m in METHODS[engine] if m != NAIVE and (not methods or m in methods)]
    return [*(chosen or METHODS[engine][:1]), NAIVE]


def best_methods(scores: dict[str, dict[str, float]]) -> dict[str, str]:
    """Each engine's non-naive method with the highest test top-1 (selected on the test set itself)."""
    return {e: max((m for m in s if m != NAIVE), key=s.__getitem__) for e, s in scores.items()}


def qat_datasets(args: argparse.Namespace, run: Run) -> tuple[Dataset, Dataset, list[str]]:
    """The fine-tuning data as the ablation trained on it (the same fixed subset) and the evaluated test images."""
    recipe = qat_recipe(run.ckpt, args.qat_epochs, batch_size=args.batch_size)
    train_set, val_set, classes = load_datasets(TrainOptions(data=args.data, out_dir=str(run.path), recipe=recipe))
    train_set = fixed_subset(train_set, args.train_subset)
    return train_set, Subset(val_set, spread(len(val_set), args.test_limit)), classes


def qat_step_mode(run: Run, args: argparse.Namespace) -> StepMode:
    """The step mode of every fine-tune of the study (float32, layout measured on ``run``'s quantization-aware
    model, the study's threads): measured once, side by side, so that the models fine-tune alike."""
    model = prepare_qat(model_from_checkpoint(run.ckpt)[0])
    batch = min(args.batch_size, 128)
    images, targets = torch.randn(batch, 3, *input_size(run.ckpt.metadata)), torch.randint(0, 2, (batch,))
    speeds = probe_modes(model, candidate_modes(torch.device("cpu"), "none", None, torch.get_num_threads()), images,
                         targets)
    mode = max(speeds, key=speeds.get)
    print("QAT step mode for every model: " + ", ".join(f"{m.label} {v:.0f} img/s" for m, v in speeds.items()) +
          f"; chosen: {mode.label}", flush=True)
    return mode


def qat(args: argparse.Namespace, run: Run, batches: list[np.ndarray], test: tuple[np.ndarray, np.ndarray],
        img_size: tuple[int, int]) -> dict[str, Any]:
    """Fine-tune quantization-aware (or reuse the finished fine-tune), then the int8 top-1 of the tuned model
    quantized with the scheme it trained against on every int8 engine studied."""
    installed = args.engines
    engine = "openvino" if "openvino" in installed else installed[0]
    out = Path(args.run_root) / f"{run.entry}-seed{args.seed}-qat{INT8_SUFFIXES[engine]}"
    opts = QATOptions(checkpoint=str(run.path / "model.pth"), data=args.data, out=str(out), epochs=args.qat_epochs,
                      batch_size=args.batch_size, engine=engine, calib_images=args.calib_images, workers=args.workers,
                      channels_last=args.qat_mode.channels_last, threads=args.qat_mode.threads, seed=args.seed)
    done = finetune_qat(opts, *qat_datasets(args, run))
    model, _ = load_deploy_model(done.summary["checkpoint"])
    scores = {}
    for engine in installed:
        q = done.quantized.files[0] if engine == done.quantized.engine else quantize_model(
            model, engine, batches, QAT_METHOD, img_size)
        scores[engine] = top1(int8_engine(q, engine, EVAL_BATCH), *test)
        print(f"  QAT {engine} {QAT_METHOD}: {scores[engine]:.2f}%", flush=True)
    return dict(top1=scores, method=QAT_METHOD, epochs=done.summary["epochs"], run_dir=shown_path(done.run_dir),
                artifact=shown_path(done.quantized.files[0]), float32_deploy_top1=done.summary["deploy_top1"],
                simulated_int8_top1=done.summary["train_top1"])


# --- speed ------------------------------------------------------------------------------------------------------

def speed(args: argparse.Namespace, model: nn.Module, best: dict[str, tuple[str, Any]],
          trained_size: tuple[int, int]) -> dict[str, dict[str, dict[str, Any]]]:
    """Images/s of float32 deploy on every engine and best-PTQ int8 on every int8 engine, interleaved, by image size
    and batch; int8 at sizes other than the trained one is re-quantized (same method, random calibration)."""
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for size in args.speed_sizes:
        img = (size, size)
        int8 = {e: q if img == trained_size else quantize_model(model, e, random_calibration(img), m, img)
                for e, (m, q) in best.items()}
        for batch in BATCH_SIZES:
            x = np.random.default_rng(0).standard_normal((batch, 3, *img), dtype=np.float32)
            engines = {f"float32 {e}": create_engine(model, e, img_size=img, batch_size=batch)
                       for e in available_engines()}
            engines |= {f"int8 {e}": int8_engine(q, e, batch) for e, q in int8.items()}
            timed = measure_throughput({n: functools.partial(f, x) for n, f in engines.items()}, batch,
                                       rounds=args.rounds)
            result.setdefault(str(size), {})[str(batch)] = entry = speedups(timed)
            print(f"  {size}x{size}, batch {batch}: " + ", ".join(
                f"{n} {v:.0f}" for n, v in entry["images_per_s"].items()) + " images/s", flush=True)
    return result


def speedups(timed: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Images/s and latency by engine, the fastest float32 engine, and each int8 engine's speed relative to it."""
    ips = {n: t["images_per_s"] for n, t in timed.items()}
    fastest = max((n for n in ips if n.startswith("float32 ")), key=ips.__getitem__)
    return dict(images_per_s=ips, latency_ms={n: t["latency_ms"] for n, t in timed.items()}, fastest_float32=fastest,
                int8_speedup={n.removeprefix("int8 "): v / ips[fastest] for n, v in ips.items()
                              if n.startswith("int8 ")})


# --- targets ----------------------------------------------------------------------------------------------------

def check_targets(model: dict[str, Any]) -> dict[str, Any]:
    """The accuracy and speed targets against one model's results, and its naive PTQ loss. Each int8 model is held
    against its own float32 deploy model: PTQ against the trained one, QAT against the fine-tuned one."""
    top = model["top1"]
    reference = top["float32_deploy"]["torch"]
    losses = {("int8_best_ptq", e): (v, reference - v) for e, v in top["int8_best_ptq"].items()}
    tuned = model["qat"]["float32_deploy_top1"]
    losses |= {("int8_qat", e): (v, tuned - v) for e, v in top["int8_qat"].items()}
    (row, engine), (best, loss) = max(losses.items(), key=lambda kv: kv[1][0])
    accuracy = dict(float32_deploy_top1=reference if row == "int8_best_ptq" else tuned, best_int8_row=row,
                    best_int8_engine=engine, best_int8_top1=best, loss_points=loss, target_met=loss <= TARGET_POINTS,
                    limit_met=loss <= LIMIT_POINTS,
                    losses={f"{r} {e}": round(lost, 4) for (r, e), (_, lost) in losses.items()})
    speed_targets = {}
    for size, by_batch in model["speed"].items():
        ratios = {b: max(s["int8_speedup"].values()) for b, s in by_batch.items()}
        speed_targets[size] = dict(int8_speedup=ratios, met=all(r >= TARGET_SPEEDUP for r in ratios.values()))
    naive = {e: reference - v for e, v in top["int8_naive_ptq"].items()}
    return dict(accuracy=accuracy, speed=speed_targets, naive_ptq_loss_points=naive)


def target_lines(name: str, t: dict[str, Any]) -> list[str]:
    """PASS/FAIL lines of one model's targets, and its naive PTQ loss as measured."""
    a = t["accuracy"]
    verdict = "PASS" if a["target_met"] else "FAIL"
    if a["limit_met"] and not a["target_met"]:
        verdict = f"PASS at the {LIMIT_POINTS}-point limit (FAIL at the {TARGET_POINTS}-point target)"
    lines = [f"{name} accuracy {verdict}: best int8 ({ROWS[a['best_int8_row']]}, {a['best_int8_engine']}) "
             f"{a['best_int8_top1']:.2f}% vs its float32 deploy model {a['float32_deploy_top1']:.2f}%, "
             f"{a['loss_points']:.2f} points lost (target <= {TARGET_POINTS}, at most {LIMIT_POINTS})"]
    for size, s in t["speed"].items():
        ratios = ", ".join(f"{r:.2f}x at batch {b}" for b, r in s["int8_speedup"].items())
        lines.append(f"{name} speed {size}x{size} {'PASS' if s['met'] else 'FAIL'}: int8 / fastest float32 "
                     f"{ratios} (target >= {TARGET_SPEEDUP}x)")
    naive = ", ".join(f"{e} {v:.2f} points" for e, v in t["naive_ptq_loss_points"].items())
    return [*lines, f"{name} naive PTQ loss (as measured): {naive}"]


# --- report -----------------------------------------------------------------------------------------------------

def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _cell(value: float | None, note: str = "") -> str:
    return "-" if value is None else f"{value:.2f}%" + (f" ({note})" if note else "")


def model_markdown(m: dict[str, Any], engines: list[str]) -> list[str]:
    """One model's accuracy table (rows by form, columns by engine), its PTQ methods and QAT, and its speed table."""
    lines = [f"## {m['name']} (`{m['run_dir']}`)", "", "| test top-1 | " + " | ".join(engines) + " |",
             "|---|" + "---:|" * len(engines)]
    for row, label in ROWS.items():
        notes = m["best_ptq_method"] if row == "int8_best_ptq" else {}
        lines.append(f"| {label} | " + " | ".join(_cell(m["top1"][row].get(e), notes.get(e, "")) for e in engines)
                     + " |")
    methods = "; ".join(f"{e}: " + ", ".join(f"{k} {v:.2f}%" for k, v in s.items()) for e, s in m["ptq"].items())
    q = m["qat"]
    lines += ["", f"PTQ, every method: {methods}.", "",
              f"QAT: {_count(q['epochs'], 'epoch')} of quantization-aware fine-tuning on top of the training. The "
              f"fine-tune also trains the model further, so the QAT row is held against the tuned model's own "
              f"float32 deploy top-1, {q['float32_deploy_top1']:.2f}% (simulated int8 during the fine-tune: "
              f"{q['simulated_int8_top1']:.2f}%); int8 quantized with `{q['method']}` ranges, the scheme it trained "
              f"against. Loss of each int8 model against its own float32 deploy model: "
              + ", ".join(f"{k} {v:+.2f}" for k, v in m["targets"]["accuracy"]["losses"].items()) + " points.", ""]
    runners = list(next(iter(next(iter(m["speed"].values())).values()))["images_per_s"])
    lines += ["| image | batch | " + " | ".join(runners) + " | int8 / fastest float32 |",
              "|---|---:|" + "---:|" * (len(runners) + 1)]
    for size, by_batch in m["speed"].items():
        for batch, s in by_batch.items():
            ratio = max(s["int8_speedup"].items(), key=lambda kv: kv[1])
            lines.append(f"| {size}x{size} | {batch} | " + " | ".join(f"{s['images_per_s'][r]:.0f}" for r in runners)
                         + f" | {ratio[1]:.2f}x ({ratio[0]}) |")
    return [*lines, ""]


def write_report(out: Path, result: dict[str, Any]) -> None:
    """quantization.json, quantization.md and quantization.png under ``out``."""
    atomic_write(out / "quantization.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    m, models = result["machine"], result["models"]
    engines = list(dict.fromkeys(e for r in models.values() for row in r["top1"].values() for e in row))
    lines = ["# Int8 quantization on CIFAR-10: " + " and ".join(r["name"] for r in models.values()), "",
             f"Models of the branch ablation (seed {result['seed']}, `{result['recipe']}` recipe, strides "
             f"{result['strides']}, {_count(result['epochs'], 'epoch')}), evaluated on {result['test_images']} test "
             f"images. PTQ calibrates on {result['calib_images']} training images. The float32 training-time row is "
             f"the ablation run's own (its summary, the whole test set); every other row is measured here. The best "
             f"PTQ method of each engine is selected on the test set itself, so that row is optimistic. Speed: "
             f"images/s, interleaved rounds, medians, {_count(result['threads'], 'thread')}; sizes other than the "
             f"trained one use the same weights, for speed only (int8 re-quantized there with the same method on "
             f"random images).", ""]
    for r in models.values():
        lines += model_markdown(r, engines)
    lines += ["## Targets", "", *(f"- {line}" for r in models.values() for line in target_lines(r["name"],
                                                                                                r["targets"])), "",
              f"CPU: {m['model']}, {m['cores']} cores, flags {', '.join(m['features']) or 'none of AVX2/AVX-512/AMX'}; "
              f"float32 matmul {m['matmul_fp32_gflops']:.0f} GFLOP/s; torch {m['torch']}.", "",
              "Reproduce: `" + result["command"] + "`", ""]
    atomic_write(out / "quantization.md", lambda tmp: Path(tmp).write_text("\n".join(lines)))
    _plot(out / "quantization.png", models, engines)


def _bars(ax: Any, groups: list[str], series: dict[str, list[float]], fmt: str) -> None:
    """Grouped bars, each labelled with its value: one group per label in ``groups``, one bar per series."""
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        bars = ax.bar([g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))], values, width,
                      label=label)
        ax.bar_label(bars, ["" if math.isnan(v) else format(v, fmt) for v in values], fontsize=6, rotation=90)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.legend(fontsize=8)


def _plot(path: Path, models: dict[str, dict[str, Any]], engines: list[str]) -> None:
    plt = require("matplotlib.pyplot")
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), layout="constrained", squeeze=False)
    for col, m in enumerate(models.values()):
        _bars(axes[0][col], list(ROWS.values()),
              {e: [m["top1"][row].get(e, math.nan) for row in ROWS] for e in engines}, ".1f")
        values = [v for row in m["top1"].values() for v in row.values()]
        axes[0][col].set(ylabel="test top-1 (%)", title=f"{m['name']}: accuracy",
                         ylim=(max(0.0, min(values) - 3), max(values) + 1.5))
        settings = [(size, batch) for size, by_batch in m["speed"].items() for batch in by_batch]
        runners = list(m["speed"][settings[0][0]][settings[0][1]]["images_per_s"])
        _bars(axes[1][col], [f"{s}x{s}, batch {b}" for s, b in settings],
              {r: [m["speed"][s][b]["images_per_s"][r] for s, b in settings] for r in runners}, ".0f")
        axes[1][col].set(ylabel="images/s (log)", yscale="log", title=f"{m['name']}: speed")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------------------------

def study(args: argparse.Namespace, run: Run, test: tuple[np.ndarray, np.ndarray],
          batches: list[np.ndarray]) -> dict[str, Any]:
    """Every accuracy row and speed setting of one model, and its targets."""
    img_size = input_size(run.ckpt.metadata)
    model, _ = load_deploy_model(run.path / "model_deploy.pth")
    print(f"== {run.name} ({run.path})", flush=True)
    deploy = float32_top1(model, test, img_size)
    print("  float32 deploy: " + ", ".join(f"{e} {v:.2f}%" for e, v in deploy.items()), flush=True)
    scores, quantized = ptq(model, batches, test, img_size, args.engines, args.methods)
    best = best_methods(scores)
    qat_result = qat(args, run, batches, test, img_size)
    top = dict(float32_train={"torch": run.summary["train_top1"]}, float32_deploy=deploy,
               int8_naive_ptq={e: s[NAIVE] for e, s in scores.items()},
               int8_best_ptq={e: scores[e][m] for e, m in best.items()}, int8_qat=qat_result.pop("top1"))
    result = dict(name=run.name, run_dir=shown_path(run.path), block=run.ckpt.metadata.get("block", "repvgg"),
                  summary={k: run.summary.get(k) for k in ("epochs", "train_top1", "deploy_top1")}, top1=top,
                  best_ptq_method=best, ptq=scores, qat=qat_result,
                  speed=speed(args, model, {e: (m, quantized[e][m]) for e, m in best.items()}, img_size))
    result["targets"] = check_targets(result)
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command line, every option with a help line and its default."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_argument(p)
    p.add_argument("--run-root", default=str(DEFAULT_RUN_ROOT), help="the ablation's runs: <entry>-seed<seed>/")
    p.add_argument("--seed", type=nonneg_int, default=0, help="which ablation seed's models; also the QAT seed")
    p.add_argument("--extra-runs", nargs="*", default=[], metavar="RUN_DIR",
                   help="more finished training runs on the same data to study alike (e.g. runs/cifar10_a0)")
    p.add_argument("--calib-images", type=positive_int, default=512, help="PTQ calibration images (from train/)")
    p.add_argument("--engines", nargs="+", choices=INT8_ENGINES, help="int8 engines to study (default: every one "
                   "installed)")
    p.add_argument("--methods", nargs="+", choices=sorted({m for ms in METHODS.values() for m in ms} - {NAIVE}),
                   help="PTQ calibration methods besides naive (default: every method of each engine; an engine "
                        "offering none of them uses its default)")
    p.add_argument("--qat-epochs", type=positive_int, default=1, help="quantization-aware fine-tuning epochs")
    p.add_argument("--batch-size", type=positive_int, default=128, help="QAT batch")
    p.add_argument("--train-subset", type=nonneg_int, default=20000,
                   help="QAT on this many training images: the ablation's fixed random subset (0: all)")
    p.add_argument("--test-limit", type=positive_int, help="evaluate on this many test images, spread over the classes")
    p.add_argument("--workers", type=nonneg_int, default=1, help="data-loading processes")
    p.add_argument("--threads", type=positive_int, help="torch and engine threads (default: torch's)")
    p.add_argument("--speed-sizes", type=positive_int, nargs="+", default=[32, 224],
                   help="image sides of the speed runs")
    p.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds of the speed measurements")
    add_results_arguments(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cifar10_data(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    installed = int8_engines_installed()
    if not installed:
        raise RepVGGError("no int8 engine installed; pip install 'repvgg[openvino,quantize]' or 'repvgg[onnx]'")
    missing = sorted(set(args.engines or ()) - set(installed))
    if missing:
        raise RepVGGError(f"--engines {' '.join(missing)}: not installed (installed: {', '.join(installed)})")
    args.engines = [e for e in installed if not args.engines or e in args.engines]
    runs = find_runs(args)
    args.qat_mode = qat_step_mode(next(iter(runs.values())), args)
    inputs: dict[str, tuple[tuple[np.ndarray, np.ndarray], list[np.ndarray]]] = {}
    models = {}
    for entry, run in runs.items():
        preprocess = preprocess_settings(run.ckpt.metadata.get("preprocess"))
        key = json.dumps(preprocess, sort_keys=True)
        if key not in inputs:
            inputs[key] = (load_test_set(args, preprocess, run.ckpt.metadata.get("class_names")),
                           calibration_batches(args.data, preprocess, args.calib_images))
        models[entry] = study(args, run, *inputs[key])
    meta, first = next(iter(runs.values())).ckpt.metadata, next(iter(inputs.values()))
    result = dict(run_root=shown_path(args.run_root), seed=args.seed, recipe=meta.get("recipe"),
                  strides=meta.get("strides"), preprocess=meta.get("preprocess"),
                  epochs=next(iter(runs.values())).summary.get("epochs"),
                  test_images=len(first[0][1]), calib_images=sum(map(len, first[1])), qat_epochs=args.qat_epochs,
                  train_subset=args.train_subset, threads=torch.get_num_threads(), batch_sizes=list(BATCH_SIZES),
                  qat_step_mode=args.qat_mode.label,
                  targets=dict(accuracy_points=TARGET_POINTS, accuracy_limit_points=LIMIT_POINTS,
                               int8_speedup=TARGET_SPEEDUP),
                  models=models,
                  machine=dict(**cpu_info(), matmul_fp32_gflops=matmul_gflops(), torch=torch.__version__,
                               python=platform.python_version()),
                  command=rerun_command("quantization.py", sys.argv[1:] if argv is None else argv))
    out = results_folder(args)
    write_report(out, result)
    print((out / "quantization.md").read_text())
    print("\n".join(line for r in models.values() for line in target_lines(r["name"], r["targets"])))


if __name__ == "__main__":
    sys.exit(run_command("quantization.py", main))
