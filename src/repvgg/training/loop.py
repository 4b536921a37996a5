"""Training: recipes as frozen presets, one process or many (``torchrun``), checkpoints that never lose work.

A run directory holds ``last.pt`` (full training state, rewritten atomically every epoch and on SIGINT/SIGTERM),
``best.pth``, ``metrics.jsonl``/``metrics.csv``, TensorBoard events when available, and at the end ``model.pth``
(training-time form) and ``model_deploy.pth`` (re-parameterized), both evaluated.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision.transforms import v2
from tqdm import tqdm

from ..errors import RepVGGError
from ..files import atomic_write
from ..models.architectures import RepVGG, create_model
from ..models.blocks import RepVGGBlock
from ..models.checkpoints import model_metadata, save_checkpoint
from ..models.reparam import reparameterize
from .data import (
    IMAGENET_PREPROCESS,
    AutoAugment,
    BadImagePolicy,
    Batch,
    ImageFolder,
    TrainCrop,
    check_bad,
    collate,
    eval_transform,
    resolve_split,
    train_transform,
)
from .evaluate import EvalResult, evaluate
from .metrics import MetricsLog

__all__ = ["Recipe", "RECIPES", "recipe_with", "TrainOptions", "TrainStep", "train", "load_datasets", "preprocess_of",
           "param_groups", "custom_l2_penalty", "WarmupCosine", "add_arguments", "options_from_args",
           "DEBUG_INDICES_ENV"]

AmpMode = Literal["none", "bf16", "fp16"]
DEBUG_INDICES_ENV = "REPVGG_DEBUG_INDICES_DIR"  # ranks record their sample indices and final weight checksums here


@dataclass(frozen=True)
class Recipe:
    """Every hyper-parameter of a training recipe; ``lr`` is for a global batch of 256 and scales linearly."""

    name: str
    epochs: int
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    img_size: int = 224
    eval_resize: int = 256
    crop: TrainCrop = "random_resized"
    auto_augment: AutoAugment = "none"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    ema_decay: float = 0.0
    custom_l2: bool = False
    strides: tuple[int, ...] = (2, 2, 2, 2, 2)

    def scaled_lr(self, global_batch: int) -> float:
        """The peak learning rate for ``global_batch`` images per step."""
        return self.lr * global_batch / 256


RECIPES: dict[str, Recipe] = {
    # RepVGG paper, ImageNet: 120 epochs, SGD 0.9, batch 256, lr 0.1 cosine, wd 1e-4, crop+flip only.
    "paper": Recipe("paper", epochs=120),
    # The stronger recipe of the RepVGG repo / RepVGGplus: warm-up, smoothing, mixup/cutmix, AutoAugment, EMA.
    "strong": Recipe("strong", epochs=300, warmup_epochs=5, label_smoothing=0.1, mixup=0.2, cutmix=1.0,
                     auto_augment="auto", ema_decay=0.9998),
    # CIFAR-size images: pad-4 crop + flip; stride-1 stem and stage1 keep 32x32 inputs at 32/16/8/4 pixels
    # through stages 1-4 (ResNet's CIFAR layout).
    "cifar": Recipe("cifar", epochs=15, batch_size=256, lr=0.2, nesterov=True, weight_decay=5e-4, img_size=32,
                    eval_resize=32, crop="pad", warmup_epochs=2, label_smoothing=0.1, strides=(1, 1, 2, 2, 2)),
}


@dataclass
class TrainOptions:
    """One run: data, model, recipe (with overrides applied) and the machinery around it."""

    data: str | None
    out_dir: str
    model: str = "repvgg_a0"
    recipe: Recipe = field(default_factory=lambda: RECIPES["paper"])
    workers: int = 4
    amp: AmpMode = "none"
    channels_last: bool = False
    grad_checkpointing: bool = False
    sync_bn: bool = False
    seed: int = 0
    resume: str | None = None  # a checkpoint path, or "auto" for out_dir/last.pt when present
    bad_images: BadImagePolicy = "skip"
    cache_dir: str | None = None
    time_budget_min: float | None = None
    eval_every: int = 1  # validate every n epochs (the final model is always evaluated)
    device: str | None = None
    tensorboard: bool = True
    log: Callable[[str], None] = print


def param_groups(model: nn.Module, weight_decay: float, custom_l2: bool = False) -> list[dict[str, Any]]:
    """SGD parameter groups with the official decay rules: no decay on biases or BN weights, except the identity
    branch's BN weight; with ``custom_l2`` the 3x3/1x1 kernels leave plain decay for :func:`custom_l2_penalty`."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        branch_kernel = name.endswith(("rbr_dense.conv.weight", "rbr_1x1.conv.weight"))
        if name.endswith("rbr_identity.weight") or (p.ndim > 1 and not (custom_l2 and branch_kernel)):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def custom_l2_penalty(model: nn.Module) -> Tensor:
    """The official "custom L2": for every block, the squared 3x3 kernel outside its centre plus the squared
    equivalent centre (3x3 centre and 1x1 scaled by their BN), normalized by those BN scales."""
    total = torch.zeros(())
    for m in model.modules():
        if not isinstance(m, RepVGGBlock) or m.deploy:
            continue
        k3, k1 = m.rbr_dense.conv.weight, m.rbr_1x1.conv.weight
        t3 = (m.rbr_dense.bn.weight / (m.rbr_dense.bn.running_var + m.rbr_dense.bn.eps).sqrt()).detach()
        t1 = (m.rbr_1x1.bn.weight / (m.rbr_1x1.bn.running_var + m.rbr_1x1.bn.eps).sqrt()).detach()
        t3, t1 = t3.reshape(-1, 1, 1, 1), t1.reshape(-1, 1, 1, 1)
        centre = k3[:, :, 1:2, 1:2]
        ring = (k3 ** 2).sum() - (centre ** 2).sum()
        eq = centre * t3 + k1 * t1
        total = total.to(k3.device) + ring + (eq ** 2 / (t3 ** 2 + t1 ** 2)).sum()
    return total


class WarmupCosine:
    """LR factor per optimizer step: linear warm-up, then cosine to zero at ``total_steps`` (picklable state)."""

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - self.warmup_steps) / span)))


class TrainStep:
    """One optimizer step (forward, loss, backward, update) with the run's precision and memory format."""

    def __init__(self, model: nn.Module, raw: RepVGG, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                 device: torch.device, amp: AmpMode = "none", channels_last: bool = False,
                 l2_weight: float = 0.0) -> None:
        if amp == "fp16" and device.type != "cuda":
            raise RepVGGError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
        self.model, self.raw, self.optimizer, self.criterion = model, raw, optimizer, criterion
        self.device, self.channels_last, self.l2_weight = device, channels_last, l2_weight
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's autocast context (a no-op in full precision)."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def __call__(self, images: Tensor, targets: Tensor) -> Tensor:
        """Run one step on a device batch; returns the (detached) loss."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            loss = self.raw.loss(self.model(images), targets, self.criterion)
        if self.l2_weight:
            loss = loss + 0.5 * self.l2_weight * custom_l2_penalty(self.raw)
        if not torch.isfinite(loss):
            return loss.detach()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()


class _ShardSampler(Sampler[int]):
    """A rank's shard of a shuffled epoch (``DistributedSampler``), optionally skipping its first samples and
    recording what it hands out."""

    def __init__(self, sampler: DistributedSampler, skip: int = 0, record: Path | None = None) -> None:
        self.sampler, self.skip, self.record = sampler, skip, record

    def __iter__(self) -> Iterator[int]:
        indices = list(self.sampler)[self.skip:]
        if self.record:
            with open(self.record, "a") as f:
                f.write(" ".join(map(str, indices)) + "\n")
        return iter(indices)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Sum ``values`` over ranks (identity in one process)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _init_distributed(device_name: str | None) -> tuple[_Dist, torch.device]:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU); pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device_name is None else device_name.startswith("cuda")
    if world == 1:
        return _Dist(), torch.device(device_name or ("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank), device


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_datasets(opts: TrainOptions) -> tuple[Dataset, Dataset, list[str]]:
    """The train and val/test ImageFolders under ``opts.data`` with the recipe's transforms."""
    r = opts.recipe
    train_dir = resolve_split(opts.data, ("train",), opts.cache_dir)
    val_dir = resolve_split(opts.data, ("val", "test"), opts.cache_dir)
    train_set = ImageFolder(train_dir, train_transform(r.img_size, r.crop, r.auto_augment))
    val_set = ImageFolder(val_dir, eval_transform(preprocess_of(r)))
    if val_set.classes != train_set.classes:
        raise RepVGGError(f"class folders differ between {train_dir} ({len(train_set.classes)} classes) and "
                          f"{val_dir} ({len(val_set.classes)} classes)")
    return train_set, val_set, list(train_set.classes)


def preprocess_of(recipe: Recipe) -> dict[str, Any]:
    """The evaluation preprocessing a recipe implies, as stored in checkpoint metadata."""
    return {**IMAGENET_PREPROCESS, "resize": recipe.eval_resize, "crop": recipe.img_size}


def describe(opts: TrainOptions, extra: dict[str, Any]) -> str:
    """Every recipe value and option of a run, one per line."""
    rows = {f"recipe.{f.name}": getattr(opts.recipe, f.name) for f in fields(opts.recipe)}
    rows.update({f.name: getattr(opts, f.name) for f in fields(opts) if f.name not in ("recipe", "log")})
    rows.update(extra)
    width = max(map(len, rows))
    return "\n".join(f"  {k:<{width}} {v}" for k, v in rows.items())


class _Stopper:
    """Remembers SIGINT/SIGTERM so the loop can save before exiting."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Stopper:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _loader(dataset: Dataset, batch_size: int, sampler: Sampler | None, workers: int, device: torch.device,
            drop_last: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=device.type == "cuda", drop_last=drop_last, persistent_workers=False)


def _evaluate_sharded(model: nn.Module, dataset: Dataset, d: _Dist, opts: TrainOptions, device: torch.device,
                      batch_size: int, step: TrainStep, num_classes: int) -> EvalResult:
    """Each rank evaluates every world-th sample; counts are summed over ranks."""
    shard = Subset(dataset, range(d.rank, len(dataset), d.world))
    loader = _loader(shard, batch_size, None, opts.workers, device, drop_last=False)
    result = evaluate(model, loader, device, num_classes, autocast=step.autocast, channels_last=opts.channels_last,
                      bad_images=opts.bad_images, report=lambda s: None)
    return result.all_reduce(d.all_sum, device)


def train(opts: TrainOptions, train_set: Dataset | None = None, val_set: Dataset | None = None,
          class_names: Sequence[str] | None = None, preprocess: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``opts.model`` with ``opts.recipe``; returns the final summary (also written to summary.json).

    Datasets default to the image folders under ``opts.data``; pass ``train_set``/``val_set`` (yielding
    ``(tensor, int)``) and ``class_names`` to train on anything else.
    """
    d, device = _init_distributed(opts.device)
    log = opts.log if d.main else (lambda s: None)
    r = opts.recipe
    if opts.sync_bn and d.world > 1 and device.type != "cuda":
        raise RepVGGError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on the CPU)")
    if r.batch_size % d.world:
        raise RepVGGError(f"global batch size {r.batch_size} is not divisible by the {d.world} processes")
    if train_set is None or val_set is None:
        train_set, val_set, class_names = load_datasets(opts)
    class_names = list(class_names or [])
    num_classes = len(class_names)
    if num_classes < 2:
        raise RepVGGError(f"need at least 2 classes to train, found {num_classes}")
    preprocess = preprocess or preprocess_of(r)
    out = Path(opts.out_dir)
    per_rank = r.batch_size // d.world
    steps_per_epoch = len(train_set) // r.batch_size
    if steps_per_epoch < 1:
        raise RepVGGError(f"{len(train_set)} training images are fewer than one batch of {r.batch_size}; "
                          f"lower --batch-size")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    d.barrier()

    torch.manual_seed(opts.seed + d.rank)
    random.seed(opts.seed + d.rank)
    raw = create_model(opts.model, num_classes=num_classes, strides=r.strides).to(device)
    if opts.grad_checkpointing:
        raw.set_grad_checkpointing(True)
    if opts.sync_bn and d.world > 1:
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    if opts.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    model: nn.Module = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None) \
        if d.world > 1 else raw
    lr = r.scaled_lr(r.batch_size)
    optimizer = torch.optim.SGD(param_groups(raw, r.weight_decay, r.custom_l2), lr=lr, momentum=r.momentum,
                                nesterov=r.nesterov and r.momentum > 0)
    schedule = WarmupCosine(round(r.warmup_epochs * steps_per_epoch), r.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    criterion = nn.CrossEntropyLoss(label_smoothing=r.label_smoothing)
    step_fn = TrainStep(model, raw, optimizer, criterion, device, opts.amp, opts.channels_last,
                        r.weight_decay if r.custom_l2 else 0.0)
    ema = AveragedModel(raw, multi_avg_fn=get_ema_multi_avg_fn(r.ema_decay), use_buffers=True) \
        if r.ema_decay else None
    mixers = ([v2.MixUp(alpha=r.mixup, num_classes=num_classes)] if r.mixup else []) + (
        [v2.CutMix(alpha=r.cutmix, num_classes=num_classes)] if r.cutmix else [])
    mix = v2.RandomChoice(mixers) if mixers else None

    start_epoch, start_step, best_top1, elapsed_before = 0, 0, -1.0, 0.0
    resume_path = out / "last.pt" if opts.resume == "auto" else Path(opts.resume) if opts.resume else None
    if resume_path and not resume_path.is_file():
        if opts.resume != "auto":
            raise RepVGGError(f"checkpoint to resume from not found: {resume_path}")
        log(f"no checkpoint at {resume_path}; starting a new run")
        resume_path = None
    if resume_path:
        state = torch.load(resume_path, map_location=device, weights_only=True)
        if state["repvgg"].get("architecture") != model_metadata(raw)["architecture"] or \
                state["repvgg"].get("num_classes") != num_classes:
            raise RepVGGError(f"{resume_path} holds a {state['repvgg'].get('architecture')} with "
                              f"{state['repvgg'].get('num_classes')} classes, not this run's {opts.model} "
                              f"with {num_classes}")
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step_fn.scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        start_epoch, start_step = state["epoch"], state["step"]
        best_top1, elapsed_before = state["best_top1"], state["elapsed_s"]
        if d.main:
            _set_rng_state(state["rng"])
        else:
            torch.manual_seed(opts.seed + d.rank + 1000 * (start_epoch + 1) + start_step)
        log(f"resumed from {resume_path} at epoch {start_epoch + 1}, step {start_step}")

    total_epochs = max(1, schedule.total_steps // steps_per_epoch)
    log(f"training {opts.model} on {len(train_set)} images ({num_classes} classes), validating on {len(val_set)}; "
        f"{d.world} process(es) on {device}")
    log(describe(opts, {"global_batch": r.batch_size, "per_rank_batch": per_rank, "peak_lr": lr,
                        "steps_per_epoch": steps_per_epoch, "planned_epochs": total_epochs}))
    metrics = MetricsLog(out, opts.tensorboard) if d.main else None
    meta = dict(class_names=class_names, preprocess=preprocess, recipe=r.name)
    debug_dir = os.environ.get(DEBUG_INDICES_ENV)

    def save_state(epoch: int, step: int) -> None:
        state = {"repvgg": {**model_metadata(raw), **meta}, "model": raw.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": step_fn.scaler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                 "epoch": epoch, "step": step, "best_top1": best_top1, "rng": _rng_state(),
                 "elapsed_s": elapsed_before + time.monotonic() - t_start, "recipe": asdict(r)}
        atomic_write(out / "last.pt", lambda tmp: torch.save(state, tmp))

    t_start = time.monotonic()
    epoch_times: list[float] = []
    skipped_total = 0
    with _Stopper() as stopper:
        epoch = start_epoch
        while epoch < total_epochs:
            t_epoch = time.monotonic()
            model.train()
            sampler = DistributedSampler(train_set, num_replicas=d.world, rank=d.rank, shuffle=True, seed=opts.seed,
                                         drop_last=True)
            sampler.set_epoch(epoch)
            skip = start_step * per_rank if epoch == start_epoch else 0
            record = Path(debug_dir) / f"indices_rank{d.rank}.txt" if debug_dir else None
            loader = _loader(train_set, per_rank, _ShardSampler(sampler, skip, record), opts.workers, device,
                             drop_last=True)
            first = start_step if epoch == start_epoch else 0
            bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{total_epochs}",
                       disable=not d.main, dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
            loss_sum, seen, skipped, t_last, n_last = 0.0, 0, 0, time.monotonic(), 0
            step = first
            it = iter(loader)
            while step < steps_per_epoch:
                try:
                    batch: Batch = next(it)
                except StopIteration:
                    break
                except RuntimeError:
                    if stopper.signum is None:
                        raise
                    break  # workers died from the same Ctrl-C; the state is consistent as of the last step
                skipped += check_bad(batch, opts.bad_images, report=bar.write if d.main else lambda s: None)
                images, targets = batch.images.to(device, non_blocking=True), batch.targets.to(device)
                if len(targets):
                    if mix is not None:
                        images, targets = mix(images, targets)
                    loss = step_fn(images, targets)
                    bad_loss, stop = d.all_sum([float(not torch.isfinite(loss)), float(stopper.signum is not None)],
                                               device)
                    if bad_loss:
                        raise RepVGGError(f"loss became {loss.item()} at epoch {epoch + 1} step {step + 1} "
                                          f"(lr {scheduler.get_last_lr()[0]:.3g}); stopped. The last good checkpoint "
                                          f"{out / 'last.pt'} is untouched; lower --lr or use --amp none")
                    scheduler.step()
                    if ema is not None:
                        ema.update_parameters(raw)
                    loss_sum += loss.item() * len(targets)
                    seen += len(targets)
                    n_last += len(targets)
                else:
                    stop = float(stopper.signum is not None)
                step += 1
                bar.update(1)
                now = time.monotonic()
                if now - t_last > 2.0:
                    bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.3f}", lr=f"{scheduler.get_last_lr()[0]:.4f}",
                                    img_s=f"{n_last * d.world / (now - t_last):.0f}", refresh=False)
                    t_last, n_last = now, 0
                if stop:
                    break
            bar.close()
            if d.all_sum([float(stopper.signum is not None)], device)[0]:
                if d.main:
                    save_state(epoch, step)
                    log(f"interrupted; saved epoch {epoch + 1} step {step} to {out / 'last.pt'} "
                        f"(continue with --resume)")
                raise KeyboardInterrupt
            train_time = time.monotonic() - t_epoch
            skipped_total += int(d.all_sum([skipped], device)[0])
            train_loss = d.all_sum([loss_sum, seen], device)
            row = dict(epoch=epoch + 1, train_loss=train_loss[0] / max(train_loss[1], 1),
                       lr=scheduler.get_last_lr()[0], train_images_per_s=train_loss[1] / max(train_time, 1e-9),
                       train_time_s=train_time, skipped_images=skipped_total)
            top1, final_result = None, None
            if (epoch + 1) % max(1, opts.eval_every) == 0 or epoch + 1 == total_epochs:
                result = _evaluate_sharded(raw, val_set, d, opts, device, per_rank, step_fn, num_classes)
                row.update(val_loss=result.loss, val_top1=result.top1, val_top5=result.top5)
                if ema is not None:
                    ema_result = _evaluate_sharded(ema.module, val_set, d, opts, device, per_rank, step_fn,
                                                   num_classes)
                    row.update(ema_val_top1=ema_result.top1, ema_val_loss=ema_result.loss)
                top1 = row.get("ema_val_top1", result.top1)
                final_result = ema_result if ema is not None else result
            row["epoch_time_s"] = time.monotonic() - t_epoch
            epoch_times.append(time.monotonic() - t_epoch)
            epoch += 1
            if opts.time_budget_min and epoch < r.epochs:
                fit = _fit_budget(opts.time_budget_min * 60, elapsed_before + time.monotonic() - t_start,
                                  epoch_times[-1], epoch, r.epochs, d, device)
                if fit != total_epochs:
                    total_epochs, schedule.total_steps = fit, fit * steps_per_epoch
                    log(f"time budget: {total_epochs} epochs fit at the last epoch's pace; the cosine schedule "
                        f"now ends there")
            if d.main:
                improved = top1 is not None and top1 > best_top1
                best_top1 = max(best_top1, top1 if top1 is not None else best_top1)
                save_state(epoch, 0)
                if improved:
                    save_checkpoint(ema.module if ema is not None else raw, out / "best.pth", epoch=epoch,
                                    top1=top1, **meta)
                metrics.write(row)
                val = f", val top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%" if top1 is not None else ""
                val += f", EMA top-1 {row['ema_val_top1']:.2f}%" if "ema_val_top1" in row else ""
                log(f"epoch {epoch}/{total_epochs}: train loss {row['train_loss']:.4f}{val}, "
                    f"{row['train_images_per_s']:.0f} img/s, {row['epoch_time_s']:.0f}s" +
                    (f", {skipped_total} unreadable images skipped" if skipped_total else ""))
            d.barrier()
    if metrics:
        metrics.close()
    return _finish(raw, ema, val_set, d, opts, device, per_rank, step_fn, num_classes, meta, out,
                   elapsed_before + time.monotonic() - t_start, total_epochs, skipped_total, final_result)


def _fit_budget(budget_s: float, elapsed_s: float, last_epoch_s: float, done: int, cap: int, d: _Dist,
                device: torch.device) -> int:
    """The epoch count that fits the rest of the time budget at the last epoch's pace (at most ``cap``),
    agreed over ranks; the final evaluation gets half an epoch's room."""
    fit = done + max(0, int((budget_s - elapsed_s - 0.5 * last_epoch_s) // last_epoch_s))
    fit = int(d.all_sum([fit], device)[0] / d.world)
    return max(done, min(cap, fit))


def _finish(raw: RepVGG, ema: AveragedModel | None, val_set: Dataset, d: _Dist, opts: TrainOptions,
            device: torch.device, batch_size: int, step_fn: TrainStep, num_classes: int, meta: dict[str, Any],
            out: Path, elapsed_s: float, epochs: int, skipped: int, evaluated: EvalResult | None) -> dict[str, Any]:
    """Save the final training-time and deploy checkpoints, evaluate both (reusing ``evaluated``, the last
    epoch's result for the final weights, when given), and write summary.json."""
    debug_dir = os.environ.get(DEBUG_INDICES_ENV)
    if debug_dir:
        checksum = sum(float(p.detach().double().abs().sum()) for p in raw.parameters())
        Path(debug_dir, f"params_rank{d.rank}.txt").write_text(f"{checksum!r}\n")
    final = copy.deepcopy(ema.module if ema is not None else raw).eval()
    if isinstance(final, RepVGG):
        final.set_grad_checkpointing(False)
    final = _plain_bn(final)
    deploy = reparameterize(final)
    results = {form: _evaluate_sharded(m, val_set, d, opts, device, batch_size, step_fn, num_classes)
               for form, m in (("train", final), ("deploy", deploy)) if not (form == "train" and evaluated)}
    results.setdefault("train", evaluated)
    summary = dict(model=opts.model, recipe=opts.recipe.name, epochs=epochs, wall_time_s=elapsed_s,
                   processes=d.world, skipped_images=skipped, weights="ema" if ema is not None else "last",
                   train_top1=results["train"].top1, train_top5=results["train"].top5,
                   deploy_top1=results["deploy"].top1, deploy_top5=results["deploy"].top5,
                   top1_difference=abs(results["train"].top1 - results["deploy"].top1),
                   checkpoint=str(out / "model.pth"), deploy_checkpoint=str(out / "model_deploy.pth"))
    if d.main:
        save_checkpoint(final, out / "model.pth", epochs=epochs, top1=results["train"].top1, **meta)
        save_checkpoint(deploy, out / "model_deploy.pth", epochs=epochs, top1=results["deploy"].top1, **meta)
        atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
        opts.log(f"final ({summary['weights']} weights): training-time top-1 {summary['train_top1']:.2f}%, "
                 f"deploy top-1 {summary['deploy_top1']:.2f}% (difference {summary['top1_difference']:.2f} points); "
                 f"wrote {out / 'model.pth'} and {out / 'model_deploy.pth'}")
    d.barrier()
    return summary


def _plain_bn(model: nn.Module) -> nn.Module:
    """Replace SyncBatchNorm by BatchNorm2d (same weights) so the model runs outside the process group."""
    for name, child in model.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats).to(child.weight.device)
            bn.load_state_dict(child.state_dict())
            setattr(model, name, bn)
        else:
            _plain_bn(child)
    return model


def recipe_with(name: str, **overrides: Any) -> Recipe:
    """A named recipe with the given fields replaced (``None`` values are ignored)."""
    if name not in RECIPES:
        raise RepVGGError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "strides" in overrides:
        overrides["strides"] = tuple(overrides["strides"])
    return replace(RECIPES[name], **overrides)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``repvgg train`` options: recipe overrides (default: the recipe's value) and run machinery."""
    p.add_argument("--data", required=True, help="folder with train/ and val/ (or test/) class folders, "
                   "or .tar/.tar.gz archives of them")
    p.add_argument("--model", default="repvgg_a0", help="architecture (see `repvgg list`)")
    p.add_argument("--recipe", default="paper", choices=list(RECIPES), help="named preset; flags below override it")
    p.add_argument("--out", help="run directory (default runs/<model>-<recipe>)")
    g = p.add_argument_group("recipe overrides")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch over all processes")
    g.add_argument("--lr", type=float, help="peak learning rate for a global batch of 256 (scaled linearly)")
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--img-size", type=int, help="training crop side")
    g.add_argument("--eval-resize", type=int, help="shorter side before the evaluation centre crop")
    g.add_argument("--crop", choices=["random_resized", "pad"])
    g.add_argument("--auto-augment", choices=["none", "rand", "auto"])
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--mixup", type=float, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, help="cutmix alpha (0: off)")
    g.add_argument("--ema-decay", type=float, help="EMA of weights per step (0: off), e.g. 0.9998")
    g.add_argument("--custom-l2", action=argparse.BooleanOptionalAction, default=None,
                   help="the official L2 on the equivalent kernel instead of plain decay on the branch kernels")
    g.add_argument("--strides", type=int, nargs=5, metavar="S", help="stride of stage0..stage4, e.g. 1 2 2 2 2")
    g = p.add_argument_group("machinery")
    g.add_argument("--workers", type=int, default=4, help="data-loading processes per training process")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="mixed precision (bf16 on CPU; fp16 uses a gradient scaler, CUDA only)")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                   help="continue from CKPT, or from <out>/last.pt when given alone (a new run if there is none)")
    g.add_argument("--bad-images", choices=["skip", "error"], default="skip",
                   help="unreadable images: report and skip, or stop")
    g.add_argument("--cache-dir", help="where archives are unpacked (default $REPVGG_CACHE_DIR or "
                   "~/.cache/repvgg/datasets)")
    g.add_argument("--time-budget-min", type=float, help="shrink the planned epochs to fit this many minutes")
    g.add_argument("--eval-every", type=int, default=1, help="validate every N epochs")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """TrainOptions from parsed ``repvgg train`` arguments."""
    overrides = {f.name: getattr(args, f.name, None) for f in fields(Recipe) if f.name != "name"}
    recipe = recipe_with(args.recipe, **overrides)
    return TrainOptions(data=args.data, out_dir=args.out or f"runs/{args.model}-{args.recipe}", model=args.model,
                        recipe=recipe, workers=args.workers, amp=args.amp, channels_last=args.channels_last,
                        grad_checkpointing=args.grad_checkpointing, sync_bn=args.sync_bn, seed=args.seed,
                        resume=args.resume, bad_images=args.bad_images, cache_dir=args.cache_dir,
                        time_budget_min=args.time_budget_min, device=args.device, eval_every=args.eval_every,
                        tensorboard=args.tensorboard)
