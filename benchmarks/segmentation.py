"""Semantic segmentation on CIFAR-10 canvases: RepVGG-A0 as a dilated backbone (output stride 8) with a light head,
trained for a few minutes on a CPU, then converted, exported and quantized to int8; every form is scored by mIoU on
the same test canvases and timed side by side.

Each canvas tiles 2x2 CIFAR-10 images (32x32) into a 64x64 image, every pixel labelled with its tile's class (10
classes). Canvases are drawn from a seed: the training ones from train/, the test ones from test/, each image used at
most once while the split has enough. PTQ calibrates on the first training canvases.

    python benchmarks/segmentation.py                                      # train, convert, export, quantize, report
    python benchmarks/segmentation.py --epochs 3 --train-canvases 6000     # a longer run
    python benchmarks/segmentation.py --update-results                     # the committed report

Writes the training state (``training.pth``), the exported files (``segmenter.onnx``, ``segmenter.xml``) and the int8
ones (``segmenter_int8.onnx``, ``segmenter_int8.xml``) into ``--out``, and ``segmentation.{json,md}`` into
``runs/results/`` (``benchmarks/results/`` with ``--update-results``). A finished training with the same settings is
reused and an interrupted one resumes after its last finished epoch, so the command can simply be run again. With
the defaults it takes about 4 minutes on a 2-core CPU (training about 2.5 of them).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from folders import add_data_argument, add_results_arguments, cifar10_data, rerun_command, results_folder
from repvgg import create_model, output_difference, reparameterize
from repvgg.commands.args import HelpFormatter, nonneg_float, nonneg_int, positive_float, positive_int
from repvgg.commands.exits import run_command
from repvgg.deploy.artifacts import artifact_metadata
from repvgg.deploy.engines import INT8_SUFFIXES, INT8_TOOLS, Engine, TorchEngine, available_engines, load_artifact
from repvgg.deploy.export import export_model
from repvgg.deploy.quantize import METHODS, int8_engine, int8_engines_installed, quantize_model, save_int8
from repvgg.errors import RepVGGError
from repvgg.files import atomic_write
from repvgg.hardware import machine_description, matmul_gflops, measure_throughput
from repvgg.models.preprocess import IMAGENET_PREPROCESS
from repvgg.models.profile import count_macs, count_params
from repvgg.training.data import ImageFolder, read_image, resolve_split

BACKBONE, OUTPUT_STRIDE, STAGE = "repvgg_a0", 8, 3  # stage 3: A0's 14 blocks, dilated to stay at 1/8
MEAN = np.array(IMAGENET_PREPROCESS["mean"], np.float32).reshape(1, 3, 1, 1)
STD = np.array(IMAGENET_PREPROCESS["std"], np.float32).reshape(1, 3, 1, 1)
EXPORTS = {"onnx": ("onnxruntime", "segmenter.onnx"), "openvino": ("openvino", "segmenter.xml")}
STATE_FILE = "training.pth"
EVAL_BATCH = 50
SPEED_BATCHES = (1, 8)
CALIB_BATCH = 8


# --- data -------------------------------------------------------------------------------------------------------

class Canvases(NamedTuple):
    """Canvases as 8-bit RGB (N x H x W x 3) and the class of each tile (N x grid x grid)."""

    images: np.ndarray
    tiles: np.ndarray

    @property
    def count(self) -> int:
        """How many canvases."""
        return len(self.images)

    def labels(self, index: Any = slice(None)) -> np.ndarray:
        """Per-pixel labels (N x H x W): each tile's class over its pixels."""
        tiles = self.tiles[index]
        side = self.images.shape[1] // tiles.shape[1]
        return tiles.repeat(side, axis=1).repeat(side, axis=2)

    def inputs(self, index: Any = slice(None)) -> np.ndarray:
        """What the network sees: float32 NCHW, normalized with the ImageNet statistics."""
        x = self.images[index].transpose(0, 3, 1, 2).astype(np.float32) / 255
        return np.ascontiguousarray((x - MEAN) / STD)


def tile_image(path: str, tile: int) -> np.ndarray:
    """One image read as training reads it (upright RGB), resized to ``tile`` x ``tile`` if it is not."""
    image = read_image(path)
    if image.size != (tile, tile):
        image = image.resize((tile, tile), Image.Resampling.BILINEAR)
    return np.asarray(image)


def build_canvases(root: Path, count: int, grid: int, tile: int, seed: int) -> tuple[Canvases, list[str]]:
    """``count`` canvases of ``grid`` x ``grid`` images of the ImageFolder ``root`` drawn from ``seed`` (each image
    at most once while the folder has enough), and the folder's class names."""
    folder = ImageFolder(root)
    rng = np.random.default_rng(seed)
    n, total = count * grid * grid, len(folder.samples)
    picks = rng.permutation(total)[:n] if n <= total else rng.integers(0, total, n)
    images = np.stack([tile_image(folder.samples[i][0], tile) for i in picks])
    classes = np.array([folder.samples[i][1] for i in picks], np.int64).reshape(count, grid, grid)
    side = grid * tile
    images = images.reshape(count, grid, grid, tile, tile, 3).transpose(0, 1, 3, 2, 4, 5).reshape(count, side, side, 3)
    return Canvases(np.ascontiguousarray(images), classes), folder.classes


# --- model ------------------------------------------------------------------------------------------------------

class Segmenter(nn.Module):
    """RepVGG-A0 at output stride 8 (stage 3's features, 1/8 of the input) and a light head; the logits are
    upsampled bilinearly to the input size."""

    def __init__(self, num_classes: int, head: str = "conv") -> None:
        from torchvision.models.segmentation.deeplabv3 import DeepLabHead

        super().__init__()
        self.num_classes = num_classes
        self.backbone = create_model(BACKBONE, output_stride=OUTPUT_STRIDE, out_indices=(STAGE,))
        channels = self.backbone.feature_info[STAGE]["num_chs"]
        self.head = DeepLabHead(channels, num_classes) if head == "deeplab" else nn.Sequential(
            nn.Conv2d(channels, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (features,) = self.backbone(x)
        return F.interpolate(self.head(features), size=x.shape[-2:], mode="bilinear", align_corners=False)


# --- training ---------------------------------------------------------------------------------------------------

def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """This epoch's shuffled batches (steps x batch), the last partial batch dropped: the same for a resumed run."""
    per = min(batch_size, n)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[:n // per * per].reshape(-1, per)


def train_epoch(model: nn.Module, data: Canvases, optimizer: torch.optim.Optimizer, scheduler: Any,
                batches: np.ndarray, flips: np.ndarray) -> dict[str, float]:
    """One pass over ``batches`` (canvases mirrored left-right where ``flips`` says): mean loss, pixel accuracy,
    seconds and canvases/s."""
    model.train()
    start, loss_sum, correct = time.perf_counter(), 0.0, 0
    for index, flip in zip(batches, flips, strict=True):
        x, y = data.inputs(index), data.labels(index)
        x[flip], y[flip] = x[flip][..., ::-1], y[flip][..., ::-1]
        x = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(np.ascontiguousarray(y))
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item()
        correct += int((logits.argmax(1) == y).sum())
    seconds = time.perf_counter() - start
    pixels = batches.size * data.images.shape[1] * data.images.shape[2]
    return dict(loss=loss_sum / len(batches), pixel_accuracy=correct / pixels,
                seconds=seconds, canvases_per_s=batches.size / seconds)


def load_state(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The saved training state when it was made with ``settings``, else None (a new run starts)."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("settings") != settings:
        print(f"{path} was trained with other settings: starting a new run", flush=True)
        return None
    return state


def train(model: nn.Module, data: Canvases, args: argparse.Namespace, settings: dict[str, Any]) -> list[dict]:
    """Train with AdamW on a one-cycle schedule (or reuse/resume the state in ``--out``); returns the epoch log."""
    path = Path(args.out) / STATE_FILE
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = len(epoch_batches(data.count, args.batch_size, args.seed, 0))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps * args.epochs,
                                                    pct_start=0.15)
    log: list[dict] = []
    if (state := load_state(path, settings)) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        log = state["log"]
        print(f"reusing {path}: {len(log)} of {args.epochs} epochs done", flush=True)
    for epoch in range(len(log), args.epochs):
        batches = epoch_batches(data.count, args.batch_size, args.seed, epoch)
        flips = np.random.default_rng([args.seed, epoch, 1]).random(batches.shape) < 0.5
        log.append(dict(epoch=epoch + 1, **train_epoch(model, data, optimizer, scheduler, batches, flips)))
        state = dict(settings=settings, model=model.state_dict(), optimizer=optimizer.state_dict(),
                     scheduler=scheduler.state_dict(), log=log)
        atomic_write(path, lambda tmp, state=state: torch.save(state, tmp))
        e = log[-1]
        print(f"epoch {e['epoch']}/{args.epochs}: loss {e['loss']:.3f}, train pixel accuracy "
              f"{e['pixel_accuracy']:.3f}, {e['seconds']:.0f} s ({e['canvases_per_s']:.1f} canvases/s)", flush=True)
    return log


# --- scoring ----------------------------------------------------------------------------------------------------

def confusion(engine: Engine, data: Canvases, classes: int, batch: int = EVAL_BATCH) -> np.ndarray:
    """Pixel confusion matrix (true class x predicted class) of ``engine`` over every canvas."""
    counts = np.zeros(classes * classes, np.int64)
    for i in range(0, data.count, batch):
        index = slice(i, i + batch)
        predicted = engine(data.inputs(index)).argmax(1)
        counts += np.bincount((data.labels(index) * classes + predicted).ravel(), minlength=classes * classes)
    return counts.reshape(classes, classes)


def iou_scores(matrix: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """mIoU (the mean over classes of intersection over union, each counted over the whole set; classes neither
    present nor predicted left out), pixel accuracy and each class's IoU."""
    hits = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - hits
    iou = np.divide(hits, union, out=np.full_like(hits, np.nan), where=union > 0)
    return dict(miou=float(np.nanmean(iou)), pixel_accuracy=float(hits.sum() / matrix.sum()),
                iou={name: None if math.isnan(v) else float(v) for name, v in zip(class_names, iou, strict=True)})


# --- deployment -------------------------------------------------------------------------------------------------

class Row(NamedTuple):
    """One form of the model: how it is named in the report, and how to run it at a batch size."""

    name: str
    precision: str
    engine: str
    file: str | None
    make: Callable[[int], Engine]


def export_rows(deploy: nn.Module, out: Path, size: tuple[int, int], meta: dict[str, Any]) -> tuple[list[Row], dict]:
    """Each float32 format whose runtime is installed, exported (verified against PyTorch) and run from its file."""
    rows, report = [], {}
    for fmt, (engine, name) in EXPORTS.items():
        if engine not in available_engines():
            continue
        result = export_model(deploy, out / name, fmt, size, dynamic_batch=True, metadata=meta)
        report[fmt] = dict(file=str(out / name), engine=engine, rel_diff=result.rel_diff)
        rows.append(Row(f"float32 {fmt} file", "float32", engine, str(out / name),
                        functools.partial(load_artifact, out / name, fmt)))
        print(f"exported {out / name} ({fmt}; {result.rel_diff:.1e} from PyTorch)", flush=True)
    return rows, report


def int8_rows(deploy: nn.Module, out: Path, size: tuple[int, int], meta: dict[str, Any],
              calibration: np.ndarray) -> tuple[list[Row], dict]:
    """Post-training int8 on each installed int8 engine (its default method), saved and run from its file."""
    rows, report = [], {}
    batches = [calibration[i:i + CALIB_BATCH] for i in range(0, len(calibration), CALIB_BATCH)]
    for engine in int8_engines_installed():
        method = METHODS[engine][0]
        start = time.perf_counter()
        quantized = quantize_model(deploy, engine, batches, method, size)
        path = out / f"segmenter_int8{INT8_SUFFIXES[engine]}"
        q = dict(engine=engine, tool=INT8_TOOLS[engine], method=method, calibration_canvases=len(calibration))
        save_int8(quantized, engine, path, {**meta, "precision": "int8", "quantization": q})
        report[engine] = dict(file=str(path), **q, seconds=time.perf_counter() - start)
        rows.append(Row(f"int8 {engine} file", "int8", engine, str(path),
                        functools.partial(int8_engine, str(path), engine)))
        print(f"quantized {path} ({engine}, {method}, {len(calibration)} canvases)", flush=True)
    return rows, report


def speeds(rows: list[Row], test: Canvases, rounds: int) -> dict[str, dict[str, dict[str, float]]]:
    """Images/s and latency of every row at each of :data:`SPEED_BATCHES`, measured side by side (medians)."""
    result: dict[str, dict[str, dict[str, float]]] = {}
    for batch in SPEED_BATCHES:
        x = test.inputs(np.arange(batch) % test.count)
        runners = {row.name: functools.partial(row.make(batch), x) for row in rows}
        result[str(batch)] = measure_throughput(runners, batch, rounds=rounds)
        print(f"batch {batch}: " + ", ".join(f"{n} {v['images_per_s']:.0f}" for n, v in result[str(batch)].items())
              + " images/s", flush=True)
    return result


def busy_seconds() -> float | None:
    """CPU seconds that every process together has kept the cores busy since boot (Linux; None elsewhere)."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def with_others_busy(measure: Callable[[], Any]) -> tuple[Any, float | None]:
    """``measure()`` and the share of the cores that other processes kept busy meanwhile (None where unknown)."""
    busy, own, start = busy_seconds(), time.process_time(), time.perf_counter()
    result = measure()
    after = busy_seconds()
    if busy is None or after is None:
        return result, None
    others = (after - busy) - (time.process_time() - own)
    return result, min(1.0, max(0.0, others / ((time.perf_counter() - start) * (os.cpu_count() or 1))))


# --- report -----------------------------------------------------------------------------------------------------

def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def write_report(folder: Path, result: dict[str, Any]) -> None:
    """segmentation.json and segmentation.md in ``folder``."""
    atomic_write(folder / "segmentation.json", json.dumps(result, indent=2) + "\n")
    t, m, tr, mc = result["task"], result["model"], result["training"], result["machine"]
    others = mc["others_busy_while_timed"]
    lines = [f"# Semantic segmentation on CIFAR-10 canvases: {m['name']}", "",
             f"Task: {t['grid']}x{t['grid']} CIFAR-10 images ({t['tile']}x{t['tile']}) tiled into {t['canvas']}x"
             f"{t['canvas']} canvases, every pixel labelled with its tile's class ({len(t['classes'])} classes); "
             f"{t['train_canvases']} training canvases from train/, {t['test_canvases']} test canvases from test/ "
             f"(seed {t['seed']}). Model: {m['backbone']} at output stride {m['output_stride']} (stage "
             f"{m['out_indices'][0]}'s {m['feature_channels']} channels at 1/{m['output_stride']}) with a "
             f"{m['head']} head, logits upsampled bilinearly; {m['params_train'] / 1e6:.2f}M parameters training-time, "
             f"{m['params_deploy'] / 1e6:.2f}M deploy, {m['macs_deploy'] / 1e6:.0f}M MACs per canvas. Trained from "
             f"scratch: {_count(tr['epochs'], 'epoch')}, batch {tr['batch_size']}, {tr['optimizer']} (lr {tr['lr']}, "
             f"weight decay {tr['weight_decay']}, one-cycle), float32, {tr['seconds']:.0f} s on "
             f"{_count(tr['threads'], 'thread')}.", "",
             "mIoU: mean over classes of intersection over union, each counted over every test pixel. Speed: "
             "images/s, every form timed side by side in interleaved rounds (medians)" + (
                 "." if others is None else f"; other processes kept {others:.0%} of the cores busy meanwhile "
                 f"(PyTorch's many short parallel regions suffer most from that)."), "",
             "| model | engine | file | mIoU | pixel accuracy | images/s, batch 1 | images/s, batch 8 |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['engine']} | {Path(r['file']).name if r['file'] else '-'} | "
                     f"{r['miou']:.4f} | {r['pixel_accuracy']:.4f} | "
                     + " | ".join(_cell(r["speed"].get(str(b), {}).get("images_per_s"), ".0f")
                                  for b in SPEED_BATCHES) + " |")
    lines += ["", "| IoU by class | " + " | ".join(t["classes"]) + " |", "|---|" + "---:|" * len(t["classes"])]
    lines += [f"| {r['name']} | " + " | ".join(_cell(r["iou"][c], ".3f") for c in t["classes"]) + " |"
              for r in result["rows"]]
    exports = "; ".join(f"{f} {e['rel_diff']:.1e}" for f, e in result["exports"].items()) or "none installed"
    int8 = "; ".join(f"{e} `{q['method']}` ({q['tool']})" for e, q in result["int8"].items()) or "none installed"
    lines += ["", f"Conversion (`repvgg.reparameterize` on the whole network): largest output difference "
                  f"{result['conversion']['output_difference']:.1e} of the logits' scale. Exported files against "
                  f"PyTorch: {exports}. Int8 (post-training, calibrated on {t['calib_canvases']} training "
                  f"canvases): {int8}.", "",
              "| epoch | loss | train pixel accuracy | seconds | canvases/s |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {e['epoch']} | {e['loss']:.3f} | {e['pixel_accuracy']:.3f} | {e['seconds']:.0f} | "
              f"{e['canvases_per_s']:.1f} |" for e in tr["per_epoch"]]
    lines += ["", f"CPU: {mc['cpu']}, {mc['cpu_count']} cores, flags {', '.join(mc['cpu_features']) or 'none'}; "
                  f"{_count(mc['torch_threads'], 'thread')}; float32 matmul {mc['matmul_fp32_gflops']:.0f} GFLOP/s; "
              + ", ".join(f"{k} {v}" for k, v in mc["versions"].items()) + ".", "",
              f"Reproduce: `{result['command']}`", ""]
    atomic_write(folder / "segmentation.md", "\n".join(lines))


# --- main -------------------------------------------------------------------------------------------------------

def load_data(args: argparse.Namespace) -> tuple[Canvases, Canvases, list[str]]:
    """Training and test canvases (the test split must hold the training split's classes)."""
    train_set, classes = build_canvases(resolve_split(args.data, ("train",)), args.train_canvases, args.grid,
                                        args.tile, args.seed)
    test_set, test_classes = build_canvases(resolve_split(args.data, ("test", "val")), args.test_canvases, args.grid,
                                            args.tile, args.seed + 1)
    if test_classes != classes:
        raise RepVGGError(f"the test classes {test_classes} differ from the training classes {classes}")
    return train_set, test_set, classes


def settings_of(args: argparse.Namespace, classes: list[str]) -> dict[str, Any]:
    """What decides the trained weights: a saved state is reused only when these match."""
    keys = ("train_canvases", "grid", "tile", "seed", "epochs", "batch_size", "lr", "weight_decay", "head")
    return dict(data=str(Path(args.data).resolve()), classes=classes, **{k: getattr(args, k) for k in keys})


def evaluate_rows(rows: list[Row], test: Canvases, classes: list[str]) -> dict[str, dict[str, Any]]:
    """mIoU, pixel accuracy and per-class IoU of every row on the test canvases."""
    scores = {}
    for row in rows:
        scores[row.name] = iou_scores(confusion(row.make(EVAL_BATCH), test, len(classes)), classes)
        print(f"{row.name} ({row.engine}): mIoU {scores[row.name]['miou']:.4f}", flush=True)
    return scores


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the canvases, train, convert, export, quantize, score and time; returns the report."""
    train_set, test_set, classes = load_data(args)
    torch.manual_seed(args.seed)
    model = Segmenter(len(classes), args.head).to(memory_format=torch.channels_last)
    log = train(model, train_set, args, settings_of(args, classes))
    model.eval()
    deploy = reparameterize(model)
    side = args.grid * args.tile
    size = (side, side)
    difference = output_difference(model, torch.from_numpy(test_set.inputs(slice(0, 8))), deploy)
    meta = artifact_metadata(deploy, dict(class_names=classes, preprocess=dict(
        resize=side, crop=side, mean=IMAGENET_PREPROCESS["mean"], std=IMAGENET_PREPROCESS["std"])), size)
    out = Path(args.out)
    rows = [Row("float32 training-time", "float32", "torch", None, lambda _b: TorchEngine(model)),
            Row("float32 deploy", "float32", "torch", None, lambda _b: TorchEngine(deploy))]
    exported, exports = export_rows(deploy, out, size, meta)
    quantized, int8 = int8_rows(deploy, out, size, meta, train_set.inputs(slice(0, args.calib_canvases)))
    rows += exported + quantized
    scores = evaluate_rows(rows, test_set, classes)
    timed, others = with_others_busy(functools.partial(speeds, rows, test_set, args.rounds))
    return dict(
        task=dict(data=str(args.data), classes=classes, grid=args.grid, tile=args.tile, canvas=side,
                  train_canvases=train_set.count, test_canvases=test_set.count,
                  calib_canvases=min(args.calib_canvases, train_set.count), seed=args.seed),
        model=dict(name=f"RepVGG-A0 backbone, output stride {OUTPUT_STRIDE}, {args.head} head", backbone=BACKBONE,
                   output_stride=OUTPUT_STRIDE, out_indices=[STAGE], head=args.head,
                   feature_channels=model.backbone.feature_info[STAGE]["num_chs"], params_train=count_params(model),
                   params_deploy=count_params(deploy), macs_deploy=count_macs(deploy, size)),
        training=dict(epochs=args.epochs, batch_size=args.batch_size, optimizer="AdamW", lr=args.lr,
                      weight_decay=args.weight_decay, schedule="one-cycle", threads=torch.get_num_threads(),
                      seconds=sum(e["seconds"] for e in log), per_epoch=log, state=str(out / STATE_FILE)),
        conversion=dict(output_difference=difference), exports=exports, int8=int8,
        rows=[dict(name=r.name, precision=r.precision, engine=r.engine, file=r.file, **scores[r.name],
                   speed={b: timed[b][r.name] for b in timed}) for r in rows],
        machine=dict(**machine_description(), matmul_fp32_gflops=matmul_gflops(), others_busy_while_timed=others))


def build_parser() -> argparse.ArgumentParser:
    """The command line, every option with a help line and its default."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_argument(p)
    p.add_argument("--out", default="runs/segmentation", help="folder for the training state and the model files")
    add_results_arguments(p)
    p.add_argument("--train-canvases", type=positive_int, default=4000, help="training canvases")
    p.add_argument("--test-canvases", type=positive_int, default=1000, help="test canvases (mIoU over all of them)")
    p.add_argument("--calib-canvases", type=positive_int, default=64, help="training canvases that calibrate int8")
    p.add_argument("--grid", type=positive_int, default=2, help="images per canvas side")
    p.add_argument("--tile", type=positive_int, default=32, help="pixels per image side (images are resized to it)")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="draws the canvases (the test ones with seed + 1) and the initial weights")
    p.add_argument("--epochs", type=positive_int, default=2, help="passes over the training canvases")
    p.add_argument("--batch-size", type=positive_int, default=8, help="canvases per training step")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="AdamW peak learning rate (one-cycle schedule)")
    p.add_argument("--weight-decay", type=nonneg_float, default=0.05, help="AdamW weight decay")
    p.add_argument("--head", choices=("conv", "deeplab"), default="conv",
                   help="conv: 3x3 conv-BN-ReLU and a 1x1 classifier; deeplab: torchvision's DeepLabV3 head (ASPP)")
    p.add_argument("--threads", type=positive_int, help="torch and engine threads (default: every core)")
    p.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds of the speed measurements")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    cifar10_data(args)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    result = run(args)
    result["command"] = rerun_command("segmentation.py", sys.argv[1:] if argv is None else argv)
    folder = results_folder(args)
    write_report(folder, result)
    print((folder / "segmentation.md").read_text())
    return result


if __name__ == "__main__":
    sys.exit(run_command("segmentation.py", main))
