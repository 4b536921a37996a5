"""The training loop, in the parts a reader can name: one optimizer step (:class:`TrainStep`), one epoch
(:func:`train_one_epoch`), the end of an epoch (:func:`end_of_epoch`: evaluate, fit the time budget, checkpoint),
and the finish (:func:`finish`: the final training-time and deploy models, both evaluated).

A run directory holds ``last.pt`` (the whole training state, see :mod:`.state`, rewritten atomically every epoch and
on SIGINT/SIGTERM/SIGHUP), ``best.pth``, ``metrics.jsonl``/``metrics.csv``, TensorBoard events when available, and
at the end ``model.pth``, ``model_deploy.pth`` and ``summary.json``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from ..errors import Interrupted, RepVGGError
from ..files import atomic_write
from ..models.architectures import RepVGG
from ..models.checkpoints import save_checkpoint
from ..models.reparam import is_batchnorm, reparameterize
from .data import Batch, check_bad, collate
from .device import AmpMode, autocast, check_amp
from .distributed import Dist, plain_bn
from .evaluate import EvalResult, evaluate
from .memory import memory_batches
from .metrics import MetricsLog
from .options import TrainOptions
from .recipes import WarmupDecay, custom_l2_penalty
from .rundir import RunDir
from .sampling import SeededSamples, ShardSampler
from .state import Progress, RunState

__all__ = ["TrainStep", "Stopper", "Run", "train_one_epoch", "end_of_epoch", "evaluate_sharded", "finish",
           "recompute_bn_statistics"]

LR_SAMPLES_PER_EPOCH = 50
BN_STATISTICS_IMAGES = 10_000  # training images (at most one epoch) the final BatchNorm statistics average over


class TrainStep:
    """One optimizer step in the run's precision and memory format: :meth:`loss` (forward), then :meth:`update`
    (backward, optimizer, learning-rate schedule)."""

    def __init__(self, model: nn.Module, raw: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                 device: torch.device, amp: AmpMode = "none", channels_last: bool = False, l2_weight: float = 0.0,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
        check_amp(amp, device)
        self.model, self.raw, self.optimizer, self.criterion = model, raw, optimizer, criterion
        self.device, self.amp, self.channels_last, self.l2_weight = device, amp, channels_last, l2_weight
        self.scheduler = scheduler
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.amp)

    def loss(self, images: Tensor, targets: Tensor) -> Tensor:
        """The training loss of a device batch (auxiliary heads and the custom L2 included)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            output = self.model(images)
            loss = self.raw.loss(output, targets, self.criterion) if isinstance(self.raw, RepVGG) else \
                self.criterion(output, targets)
        if self.l2_weight:
            loss = loss + 0.5 * self.l2_weight * custom_l2_penalty(self.raw)
        return loss

    def update(self, loss: Tensor) -> None:
        """Backward, optimizer step (through the fp16 scaler when on), then the schedule's step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopper:
    """Remembers SIGINT, SIGTERM and SIGHUP (a closed terminal or SSH session) so the loop can save before exiting;
    a signal the process was started ignoring (``nohup``, a background job's SIGINT) stays ignored.

    After a hangup, writes to the lost terminal fail (EIO), which would stop the run before it saves: the standard
    output and error that were a terminal and no longer are go to the null device from then on."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        self.terminals: list[int] = []

    def __enter__(self) -> Stopper:
        if threading.current_thread() is threading.main_thread():
            self.terminals = [fd for fd in (1, 2) if os.isatty(fd)]
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        hung_up = [fd for fd in self.terminals if not os.isatty(fd)]
        if hung_up:
            null = os.open(os.devnull, os.O_WRONLY)
            for fd in hung_up:
                os.dup2(null, fd)
            os.close(null)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class Run:
    """Everything one training run works with, built by :func:`repvgg.training.setup.setup_run`."""

    opts: TrainOptions
    d: Dist
    device: torch.device
    raw: nn.Module  # the network trained: a RepVGG, or any classifier from ``TrainOptions.model_factory``
    model: nn.Module  # ``raw``, or its DistributedDataParallel wrapper
    state: RunState
    schedule: WarmupDecay
    step_fn: TrainStep
    mix: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None
    train_set: SeededSamples
    val_set: Dataset
    num_classes: int
    rundir: RunDir
    per_rank: int
    steps_per_epoch: int
    checkpoint_meta: dict[str, Any]  # class names, preprocessing, recipe: stored with every saved model
    frozen: list[nn.Module] = field(default_factory=list)
    flops_per_image: float = 0.0
    matmul_gflops: float = 0.0
    metrics: MetricsLog | None = None
    stopper: Stopper = field(default_factory=Stopper)
    loss_sum: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))  # on ``device``
    t_start: float = field(default_factory=time.monotonic)
    elapsed_before: float = 0.0
    saved_at: float = field(default_factory=time.monotonic)  # when last.pt was last written

    @property
    def progress(self) -> Progress:
        return self.state.progress

    def log(self, message: str) -> None:
        if self.d.main:
            self.opts.log(message)

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.t_start

    def save_due(self) -> bool:
        """Rank 0's clock says ``last.pt`` is older than ``opts.save_every_min`` (the other processes follow it)."""
        every = self.opts.save_every_min * 60
        return self.d.main and every > 0 and time.monotonic() - self.saved_at >= every

    def save_state(self) -> None:
        """Rank 0: write the whole training state to ``last.pt``."""
        self.state.save(self.rundir.last)
        self.saved_at = time.monotonic()

    def loader(self, dataset: Dataset, sampler: Iterable[int] | None, drop_last: bool) -> Iterable[Batch]:
        """Batches of this process's share: built as whole tensors when ``dataset`` is held in memory, else by a
        DataLoader (its private generator keeps loading off the global RNG stream)."""
        indices = sampler if sampler is not None else range(len(dataset))
        batches = memory_batches(dataset, indices, self.per_rank, drop_last)
        if batches is not None:
            return batches
        return DataLoader(dataset, batch_size=self.per_rank, sampler=sampler, num_workers=self.opts.workers,
                          collate_fn=collate, pin_memory=self.device.type == "cuda", drop_last=drop_last,
                          generator=torch.Generator().manual_seed(self.opts.seed), worker_init_fn=shield_worker)


def shield_worker(worker_id: int) -> None:
    """DataLoader worker start: a Ctrl-C, a closed terminal, or a SIGTERM sent to the whole process group must not
    kill the workers before the training process has saved; so they ignore SIGINT and SIGHUP, and their first SIGTERM
    (a second one, such as the loader's own ``terminate()`` of a stuck worker at shutdown, still ends them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: signal.signal(signal.SIGTERM, signal.SIG_DFL))


def train_one_epoch(run: Run) -> None:
    """Train the epoch in progress from where it stands (a resumed run skips the samples already used).

    On SIGINT, SIGTERM or SIGHUP every process stops after the same step; the state is saved and
    :class:`~repvgg.errors.Interrupted` raised (a process stopped for another's signal reports SIGINT). Every
    ``opts.save_every_min`` minutes the state is also saved after a step, so a kill loses less than that.
    """
    p, d, opts = run.progress, run.d, run.opts
    run.model.train()
    for module in run.frozen:
        module.eval()
    sampler = DistributedSampler(run.train_set, num_replicas=d.world, rank=d.rank, shuffle=True, seed=opts.seed,
                                 drop_last=True)
    sampler.set_epoch(p.epoch)
    run.train_set.set_epoch(p.epoch)
    for callback in opts.callbacks:
        callback.on_epoch_start(p.epoch, list(sampler))
    batches = iter(run.loader(run.train_set, ShardSampler(sampler, p.step * run.per_rank), drop_last=True))
    bar = tqdm(total=run.steps_per_epoch, initial=p.step, desc=f"epoch {p.epoch + 1}/{p.total_epochs}",
               disable=not d.main, dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    t0, seen = time.monotonic(), 0
    while p.step < run.steps_per_epoch:
        batch = _next_batch(batches, run.stopper)
        if batch is None:
            break
        empty, stop, save = map(bool, d.all_sum([len(batch) == 0, run.stopper.signum is not None, run.save_due()],
                                                run.device))
        if stop:
            break
        seen += _train_on_batch(run, batch, empty)
        p.step += 1
        bar.update(1)
        if save and p.step < run.steps_per_epoch:  # the epoch's end saves anyway
            _fold_epoch_sums(run, seen, t0)
            seen, t0 = 0, time.monotonic()
            _save_mid_epoch(run)
        for callback in opts.callbacks:
            callback.on_step_end(p.epoch, p.step)
    bar.close()
    _fold_epoch_sums(run, seen, t0)
    if d.all_sum([run.stopper.signum is not None], run.device)[0]:
        _save_interrupted(run)


def _fold_epoch_sums(run: Run, seen: int, t0: float) -> None:
    """Add what this process trained on since ``t0`` to the epoch's sums in its progress."""
    p = run.progress
    p.epoch_loss_sum += float(run.loss_sum)
    run.loss_sum.zero_()
    p.epoch_seen += seen
    p.epoch_train_s += time.monotonic() - t0


def _save_mid_epoch(run: Run) -> None:
    """Write ``last.pt`` where the epoch stands: rank 0 takes over every process's sums so far (the others drop
    theirs, as a resumed process other than rank 0 does), so that a resume counts each image once. Every process
    returns once the file is written."""
    p, d = run.progress, run.d
    skipped, loss_sum, seen, train_s = d.all_sum([p.epoch_skipped, p.epoch_loss_sum, p.epoch_seen, p.epoch_train_s],
                                                 run.device)
    if d.main:
        p.epoch_skipped, p.epoch_loss_sum, p.epoch_seen, p.epoch_train_s = int(skipped), loss_sum, int(seen), train_s
        p.elapsed_s = run.elapsed()
        run.save_state()
    else:
        p.clear_epoch_sums()
    d.barrier()


def _save_interrupted(run: Run) -> None:
    """Save the state of a run stopped mid-epoch by a signal (on any process), say so, and raise Interrupted."""
    p, signum = run.progress, run.stopper.signum
    _save_mid_epoch(run)
    cause = signal.Signals(signum).name if signum else "a signal to another process"
    run.log(f"interrupted by {cause}; saved epoch {p.epoch + 1} step {p.step} to {run.rundir.last} (continue with "
            f"--resume)")
    raise Interrupted(signum or signal.SIGINT)


def _next_batch(batches: Iterator[Batch], stopper: Stopper) -> Batch | None:
    """The next batch, or None when loading workers died from the same Ctrl-C that is stopping the run."""
    try:
        return next(batches)
    except RuntimeError:
        if stopper.signum is None:
            raise
        return None


def _train_on_batch(run: Run, batch: Batch, empty: bool) -> int:
    """One step on every process: a step that some process has no readable image for (``empty``, decided together)
    is skipped by all (0), a non-finite loss on any stops all with an error. Returns the images trained on."""
    p, d, opts = run.progress, run.d, run.opts
    p.epoch_skipped += check_bad(batch, opts.bad_images, report=tqdm.write if d.main else lambda s: None)
    if empty:
        p.epoch_skipped_steps += 1
        return 0
    images, targets = batch.images.to(run.device, non_blocking=True), batch.targets.to(run.device)
    if run.mix is not None:
        images, targets = run.mix(images, targets)
    loss = run.step_fn.loss(images, targets)
    if d.all_sum([not bool(torch.isfinite(loss))], run.device)[0]:
        _stop_non_finite(run, loss)
    run.step_fn.update(loss)
    if run.state.lookahead is not None:
        run.state.lookahead.after_step(run.raw, run.state.scheduler.last_epoch, run.schedule.total_steps)
    if run.state.ema is not None:
        run.state.ema.update_parameters(run.raw)
    run.loss_sum += loss.detach().double() * len(batch)
    if p.step % max(1, run.steps_per_epoch // LR_SAMPLES_PER_EPOCH) == 0:
        p.epoch_lr_steps.append([p.epoch * run.steps_per_epoch + p.step, run.step_fn.optimizer.param_groups[0]["lr"]])
    return len(batch)


def _stop_non_finite(run: Run, loss: Tensor) -> None:
    p = run.progress
    kept = (f"the last good checkpoint {run.rundir.last} is untouched" if run.rundir.last.is_file()
            else "no checkpoint had been written yet")
    value = loss.item()
    what = f"loss became {value}" if not math.isfinite(value) else "loss became non-finite on another process"
    raise RepVGGError(f"{what} at epoch {p.epoch + 1} step {p.step + 1} (lr "
                      f"{run.step_fn.optimizer.param_groups[0]['lr']:.3g}); stopped, and {kept}; lower --lr or use "
                      f"--amp none")


def end_of_epoch(run: Run) -> None:
    """Close the epoch in progress: metrics row, evaluation when due, time budget, best and last checkpoints."""
    p, d = run.progress, run.d
    skipped, loss_sum, seen, train_s = d.all_sum([p.epoch_skipped, p.epoch_loss_sum, p.epoch_seen,
                                                  p.epoch_train_s], run.device)
    if seen == 0:
        raise RepVGGError(f"no readable training image in epoch {p.epoch + 1}: every batch was unreadable "
                          f"({int(skipped)} images skipped)")
    images_per_s = seen / max(train_s / d.world, 1e-9)
    gflops = images_per_s * run.flops_per_image / 1e9
    row: dict[str, Any] = dict(epoch=p.epoch + 1, train_loss=loss_sum / seen, lr=run.step_fn.optimizer.param_groups[0]
                               ["lr"], train_images_per_s=images_per_s, train_time_s=train_s / d.world,
                               train_gflops=gflops, train_of_matmul=gflops / run.matmul_gflops if run.matmul_gflops
                               else None, skipped_steps=p.epoch_skipped_steps, lr_steps=p.epoch_lr_steps)
    top1 = _evaluate_epoch(run, row) if (p.epoch + 1) % max(1, run.opts.eval_every) == 0 or \
        p.epoch + 1 == p.total_epochs else None
    p.skipped_total += int(skipped)
    row.update(skipped_images=p.skipped_total, epoch_time_s=row["train_time_s"] + row.pop("eval_time_s", 0.0))
    p.epoch += 1
    p.start_epoch()
    _fit_time_budget(run, row["epoch_time_s"])
    p.elapsed_s = run.elapsed()
    if d.main:
        _write_epoch(run, row, top1)
    d.barrier()


def _evaluate_epoch(run: Run, row: dict[str, Any]) -> float:
    """Validate the model (and its EMA); adds to ``row``; returns the top-1 that decides the best checkpoint."""
    t0 = time.monotonic()
    result = evaluate_sharded(run, run.raw)
    row.update(val_loss=result.loss, val_top1=result.top1, val_top5=result.top5)
    final = result
    if run.state.ema is not None:
        final = evaluate_sharded(run, run.state.ema.module)
        row.update(ema_val_top1=final.top1, ema_val_loss=final.loss)
    run.progress.last_eval = dict(epoch=run.progress.epoch + 1, top1=final.top1, top5=final.top5, loss=final.loss)
    row["eval_time_s"] = time.monotonic() - t0
    return final.top1


def _write_epoch(run: Run, row: dict[str, Any], top1: float | None) -> None:
    """Rank 0: the metrics row, ``best.pth`` when improved, then ``last.pt`` (so a kill never loses a row)."""
    p = run.progress
    if run.metrics:
        run.metrics.write(row)
    if top1 is not None and top1 > p.best_top1:
        p.best_top1 = top1
        best = run.state.ema.module if run.state.ema is not None else run.raw
        save_checkpoint(best, run.rundir.best, epoch=p.epoch, top1=top1, **run.checkpoint_meta)
    run.save_state()
    val = f", val top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%" if "val_top1" in row else ""
    val += f", EMA top-1 {row['ema_val_top1']:.2f}%" if "ema_val_top1" in row else ""
    of_matmul = (f" ({row['train_of_matmul']:.0%} of the float32 matmul rate)" if row.get("train_of_matmul")
                 else "")
    run.log(f"epoch {p.epoch}/{p.total_epochs}: train loss {row['train_loss']:.4f}{val}, "
            f"{row['train_images_per_s']:.0f} img/s{of_matmul}, {row['epoch_time_s']:.0f}s"
            + (f", {p.skipped_total} unreadable images skipped" if p.skipped_total else ""))


def _fit_time_budget(run: Run, last_epoch_s: float) -> None:
    """Shrink the planned epochs to what fits the time budget at the last epoch's pace (agreed over processes);
    the final evaluation gets half an epoch's room, and the schedule's decay then ends on the new last epoch."""
    p, budget = run.progress, run.opts.time_budget_min
    if not budget or p.epoch >= p.total_epochs:
        return
    fit = p.epoch + max(0, int((budget * 60 - run.elapsed() - 0.5 * last_epoch_s) // last_epoch_s))
    fit = max(p.epoch, min(p.total_epochs, int(run.d.all_sum([fit], run.device)[0] / run.d.world)))
    if fit != p.total_epochs:
        p.total_epochs, run.schedule.total_steps = fit, fit * run.steps_per_epoch
        run.log(f"time budget: {fit} epochs fit at the last epoch's pace; the schedule now ends there")


def evaluate_sharded(run: Run, model: nn.Module) -> EvalResult:
    """Each process evaluates every world-th validation sample; counts are summed over processes."""
    d = run.d
    shard = range(d.rank, len(run.val_set), d.world)
    result = evaluate(model, run.loader(run.val_set, shard, drop_last=False), run.device, run.num_classes,
                      autocast=run.step_fn.autocast, channels_last=run.step_fn.channels_last,
                      bad_images=run.opts.bad_images, report=lambda s: None)
    result = result.all_reduce(d.all_sum, run.device)
    if result.n == 0:
        raise RepVGGError("no readable validation image: every image of the validation set was unreadable")
    return result


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, batches: Iterable[Tensor], keep: Sequence[str] = ()) -> int:
    """Set the running statistics of every BatchNorm that ``model``'s forward reaches to their plain average over
    ``batches``, computed with the weights as they are; BatchNorms under the module names in ``keep`` are left alone.
    Returns the images averaged over (0 when no BatchNorm was reached).

    Training's running statistics are a moving average over the last steps: when the weights still moved fast at
    the end (a run ending at its peak learning rate), they describe earlier weights, and in eval mode the mismatch
    compounds layer after layer. Unlike torch's ``update_bn``, the rest of the model stays in eval mode and a
    BatchNorm the forward never reaches (QAT blocks fold theirs) keeps its statistics."""
    norms = {m: [b.clone() for b in m.buffers()] for name, m in model.named_modules()
             if is_batchnorm(m) and m.track_running_stats
             and not any(name == k or name.startswith(k + ".") for k in keep)}
    reached: set[nn.Module] = set()
    hooks = [m.register_forward_hook(lambda m, *_: reached.add(m)) for m in norms]
    momenta = {m: m.momentum for m in norms}
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
        m.train()
    seen = 0
    try:
        for images in batches:
            model(images)
            seen += len(images)
    finally:
        for hook in hooks:
            hook.remove()
        for m, saved in norms.items():
            m.momentum = momenta[m]
            m.eval()
            if m not in reached:
                for buffer, value in zip(m.buffers(), saved, strict=True):
                    buffer.copy_(value)
    return seen if reached else 0


def _final_bn_statistics(run: Run, model: nn.Module) -> int:
    """Recompute ``model``'s BatchNorm statistics (frozen stages excepted) over up to ``BN_STATISTICS_IMAGES``
    training images with the training augmentation, each process on its shard, then weighted over processes;
    returns the images used."""
    p, d = run.progress, run.d
    sampler = DistributedSampler(run.train_set, num_replicas=d.world, rank=d.rank, shuffle=True, seed=run.opts.seed,
                                 drop_last=True)
    sampler.set_epoch(p.epoch)
    run.train_set.set_epoch(p.epoch)
    steps = min(run.steps_per_epoch, math.ceil(BN_STATISTICS_IMAGES / (run.per_rank * d.world)))
    loader = itertools.islice(run.loader(run.train_set, sampler, drop_last=True), steps)
    batches = (b.images.to(run.device).contiguous(memory_format=torch.channels_last if run.step_fn.channels_last
                                                  else torch.contiguous_format) for b in loader if len(b))
    keep = [name for name, m in run.raw.named_modules() if any(m is f for f in run.frozen)]
    with run.step_fn.autocast():
        seen = recompute_bn_statistics(model, batches, keep)
    total = int(d.all_sum([seen], run.device)[0])
    if d.world > 1 and total:
        for m in model.modules():
            if is_batchnorm(m) and m.track_running_stats:
                for buffer in (m.running_mean, m.running_var):
                    buffer.mul_(seen / total)
                    dist.all_reduce(buffer)
    return total


def _final_weights(run: Run) -> tuple[nn.Module, str]:
    """A copy of the model the run ends with, and which weights it holds: the EMA of the weights ("ema"), Lookahead's
    slow weights ("lookahead"), or the last step's ("last")."""
    if run.state.ema is not None:
        return copy.deepcopy(run.state.ema.module), "ema"
    final = copy.deepcopy(run.raw)
    if run.state.lookahead is None:
        return final, "last"
    run.state.lookahead.copy_to(final)
    return final, "lookahead"


def finish(run: Run) -> dict[str, Any]:
    """Recompute the final weights' BatchNorm statistics, save the final training-time and deploy models, evaluate
    both, write summary.json, and return the summary."""
    p, d = run.progress, run.d
    weights, kind = _final_weights(run)
    final = plain_bn(weights).eval()
    if isinstance(final, RepVGG):
        final.set_grad_checkpointing(False)
    if not all(bool(t.isfinite().all()) for t in final.state_dict().values() if t.is_floating_point()):
        raise RepVGGError("the trained weights hold NaN or infinite values; nothing final was written")
    running = p.last_eval["top1"] if p.last_eval and p.last_eval["epoch"] == p.epoch else None
    bn_images = _final_bn_statistics(run, final)
    deploy = reparameterize(final)
    train_eval = _eval_dict(evaluate_sharded(run, final))
    deploy_eval = _eval_dict(evaluate_sharded(run, deploy))
    out = run.rundir
    summary = dict(model=run.opts.model_name, recipe=run.opts.recipe.name, epochs=p.epoch, wall_time_s=run.elapsed(),
                   processes=d.world, skipped_images=p.skipped_total,
                   weights=kind, bn_statistics_images=bn_images,
                   running_statistics_top1=running,
                   train_top1=train_eval["top1"], train_top5=train_eval["top5"], deploy_top1=deploy_eval["top1"],
                   deploy_top5=deploy_eval["top5"], top1_difference=abs(train_eval["top1"] - deploy_eval["top1"]),
                   checkpoint=str(out.model), deploy_checkpoint=str(out.deploy))
    if bn_images:
        was = f" (with the running statistics of training: {running:.2f}%)" if running is not None else ""
        run.log(f"BatchNorm statistics of the final weights recomputed over {bn_images} training images: top-1 "
                f"{train_eval['top1']:.2f}%{was}")
    if d.main:
        save_checkpoint(final, out.model, epochs=p.epoch, top1=summary["train_top1"], **run.checkpoint_meta)
        save_checkpoint(deploy, out.deploy, epochs=p.epoch, top1=summary["deploy_top1"], **run.checkpoint_meta)
        atomic_write(out.summary, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
        run.log(f"final ({summary['weights']} weights): training-time top-1 {summary['train_top1']:.2f}%, deploy "
                f"top-1 {summary['deploy_top1']:.2f}% (difference {summary['top1_difference']:.2f} points); wrote "
                f"{out.model} and {out.deploy}")
    for callback in run.opts.callbacks:
        callback.on_finish(final, summary)
    d.barrier()
    return summary


def _eval_dict(result: EvalResult) -> dict[str, float]:
    return dict(top1=result.top1, top5=result.top5, loss=result.loss)
