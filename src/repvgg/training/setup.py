"""Setting a training run up: data, the model (from scratch or pretrained, with frozen stages), the speed probe's
choice of precision, memory format and threads, optimizer and schedule, and with ``--resume`` the saved state."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ..cache import TRAIN_PROBE_FILE
from ..errors import RepVGGError
from ..files import remove_debris
from ..hardware import busy_probe_warning, cached_speeds, cpu_info, machine_matmul_gflops, measurement_key
from ..models.architectures import RepVGG
from ..models.blocks import small_batchnorm_init
from ..models.checkpoints import model_metadata
from ..models.factory import create_model
from ..models.preprocess import eval_transform
from ..models.profile import count_macs, input_channels
from ..models.reparam import is_batchnorm
from .data import ImageFolder, resolve_split, train_transform
from .device import check_amp
from .distributed import Dist, init_distributed
from .lookahead import Lookahead
from .loop import Run, TrainStep
from .memory import InMemoryEval, InMemoryTrain, hold_in_memory, in_memory
from .metrics import MetricsLog
from .options import TrainOptions, describe
from .recipes import (
    DEFAULT_RECIPE,
    RECIPES,
    Recipe,
    WarmupDecay,
    param_groups,
    preprocess_of,
    recipe_differences,
    recipe_of,
    recipe_with,
    schedule_warnings,
)
from .rundir import RunDir
from .sampling import SeededSamples
from .speed import StepMode, candidate_modes, probe_modes, training_flops_per_image
from .state import Progress, RunState, read_state

__all__ = ["setup_run", "resumed_options", "load_datasets", "freeze_stages", "start_weights"]


def load_datasets(opts: TrainOptions, log: Callable[[str], None] | None = None
                  ) -> tuple[ImageFolder | InMemoryTrain, ImageFolder | InMemoryEval, list[str]]:
    """The train and val/test sets under ``opts.data`` with the recipe's transforms: decoded into memory when
    ``opts.data_path`` allows (see :mod:`.memory`), else ImageFolders read per image; ``log`` says which."""
    if not opts.data:
        raise RepVGGError("--data is required: a folder with train/ and val/ (or test/) class folders")
    r = opts.recipe
    train_dir = resolve_split(opts.data, ("train",), opts.cache_dir)
    val_dir = resolve_split(opts.data, ("val", "test"), opts.cache_dir)
    train_set = ImageFolder(train_dir, train_transform(r.img_size, r.crop, r.auto_augment, cutout=r.cutout,
                                                        flip=r.flip, crop_pad=r.crop_pad))
    val_set = ImageFolder(val_dir, eval_transform(preprocess_of(r)))
    if val_set.classes != train_set.classes:
        raise RepVGGError(f"class folders differ between {train_dir} ({len(train_set.classes)} classes) and "
                          f"{val_dir} ({len(val_set.classes)} classes)")
    held = hold_in_memory(train_set, val_set, r, opts.data_path, opts.bad_images, log or opts.log)
    return (*(held or (train_set, val_set)), list(train_set.classes))


def setup_run(opts: TrainOptions, train_set: Dataset | None = None, val_set: Dataset | None = None,
              class_names: Sequence[str] | None = None, preprocess: dict[str, Any] | None = None) -> Run:
    """Everything a run needs, resumed from its saved state when asked; holds the run directory's lock."""
    d, device = init_distributed(opts.device)
    log = opts.log if d.main else (lambda s: None)
    saved = _saved_state(opts, log)  # read once: its recipe values and, further down, its state
    opts = _with_saved_recipe(opts, *saved, log) if saved is not None else opts
    r = opts.recipe
    check_amp(opts.amp or "none", device)
    if opts.sync_bn and d.world > 1 and device.type != "cuda":
        raise RepVGGError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on the CPU)")
    if r.batch_size % d.world:
        raise RepVGGError(f"global batch size {r.batch_size} is not divisible by the {d.world} processes")
    if train_set is None or val_set is None:
        train_set, val_set, class_names = load_datasets(opts, log)
    elif opts.data_path == "memory" and not in_memory(train_set):
        raise RepVGGError("--data-path memory decodes the image folders of --data; datasets passed to train() are "
                          "read as they are (load them with load_datasets to hold them in memory)")
    names = list(class_names or [])
    if len(names) < 2:
        raise RepVGGError(f"need at least 2 classes to train, found {len(names)}")
    if len(train_set) // r.batch_size < 1:
        raise RepVGGError(f"{len(train_set)} training images are fewer than one batch of {r.batch_size}; "
                          f"lower --batch-size")
    _warn_small_images(train_set, r, log)
    for warning in schedule_warnings(r, len(train_set) // r.batch_size):
        log(f"warning: {warning}")
    saved_mode = _resumed_mode(opts, *saved, device, log) if saved is not None else None
    torch.manual_seed(opts.seed + d.rank)
    random.seed(opts.seed + d.rank)
    if r.custom_l2 and opts.block != "repvgg":
        raise RepVGGError("--custom-l2 regularizes RepVGG's BN-scaled branches; QARepVGG trains without it")
    raw = _new_model(opts, len(names))
    if opts.pretrained and saved is None:
        start_weights(raw, opts.pretrained, log)
    frozen = freeze_stages(raw, opts.freeze_stages)
    raw = raw.to(device)
    rundir = _open_rundir(opts, d, saved is not None, log)  # after every check: a failed start leaves nothing
    mode = saved_mode or _choose_mode(opts, raw, len(names), r.batch_size // d.world, device, d, log)
    torch.set_num_threads(mode.threads)
    run = _assemble(opts, d, device, raw, mode, train_set, val_set, names, rundir,
                    preprocess or preprocess_of(r))
    run.frozen, run.loss_sum = frozen, run.loss_sum.to(device)
    run.flops_per_image = training_flops_per_image(count_macs(raw, (r.img_size, r.img_size), input_channels(raw)))
    run.matmul_gflops = machine_matmul_gflops()
    if saved is not None:
        _resume(run, *saved)
    log(f"training {opts.model_name} on {len(train_set)} images ({len(names)} classes), validating on {len(val_set)}; "
        f"{d.world} process(es) on {device}; step: {mode.label}" + (" (the run's own, from its saved state)"
                                                                    if saved_mode else ""))
    log(describe(opts, {"global_batch": r.batch_size, "per_process_batch": run.per_rank,
                        "peak_lr": r.scaled_lr(r.batch_size), "steps_per_epoch": run.steps_per_epoch,
                        "planned_epochs": run.progress.total_epochs}))
    run.metrics = MetricsLog(rundir.path, opts.tensorboard, log) if d.main else None
    return run


def _new_model(opts: TrainOptions, num_classes: int) -> nn.Module:
    """The run's model as its recipe starts it (a resume or ``--pretrained`` then loads its weights)."""
    r = opts.recipe
    raw = opts.model_factory(num_classes) if opts.model_factory else \
        create_model(opts.model, num_classes=num_classes, strides=r.strides, branches=opts.branches, block=opts.block)
    return small_batchnorm_init(raw) if r.bn_init == "small" else raw


def _open_rundir(opts: TrainOptions, d: Dist, resuming: bool, log: Any) -> RunDir:
    """Create and lock the run directory (rank 0), clearing temporaries that killed writes left behind. A new run
    never goes into a folder that holds a run, finished or not."""
    rundir = RunDir(opts.out_dir)
    if d.main:
        rundir.create()
        rundir.lock()
        if not resuming and rundir.holds_run():
            rundir.unlock()
            raise RepVGGError(f"{rundir.path} holds a training run already; continue it with --resume, or choose "
                              f"another --out (nothing was changed)")
        for tmp in remove_debris(rundir.path):
            log(f"removed {tmp.name}, left by an interrupted write")
    d.barrier()
    return rundir


def _warn_small_images(train_set: Dataset, recipe: Recipe, log: Any) -> None:
    """Say so when the recipe's crop is far larger than the images (e.g. the paper's 224 crops of 32-pixel images)."""
    samples = getattr(train_set, "samples", None)
    if not samples:
        return
    try:
        with Image.open(samples[0][0]) as image:
            side = min(image.size)
    except OSError:
        return
    if recipe.img_size >= 2 * side:
        log(f"warning: the {recipe.name!r} recipe crops {recipe.img_size}x{recipe.img_size} from {side}-pixel "
            f"images, upsampling them {recipe.img_size / side:.0f}x; for small images use --recipe cifar "
            f"(or --img-size {side})")


def start_weights(model: RepVGG, spec: str, log: Any = print) -> None:
    """Load pretrained weights into ``model``: a file, a Hub id, or "true" for the model's published ImageNet
    weights; a classifier for another class count is replaced by the model's new one."""
    from ..models.pretrained import load_pretrained

    loaded = load_pretrained(model, True if spec.lower() == "true" else spec)
    head = loaded.checkpoint.state_dict.get("linear.weight")
    note = "" if loaded.classifier_loaded or head is None else \
        f"; replaced its {head.shape[0]}-class classifier by a new {model.num_classes}-class one"
    if loaded.new_identity_branches:
        note += f"; new identity branches (strides differ): {', '.join(loaded.new_identity_branches)}"
    log(f"started from {spec}{note}")


def freeze_stages(model: nn.Module, n: int) -> list[nn.Module]:
    """Fix stage0..stage(n-1): no gradients, and BatchNorm statistics kept (the loop keeps them in eval mode)."""
    if n and not isinstance(model, RepVGG):
        raise RepVGGError("--freeze-stages is available for RepVGG models")
    if not n:
        return []
    if not 0 <= n <= len(model.stages):
        raise RepVGGError(f"--freeze-stages must be between 0 and {len(model.stages)}, got {n}")
    frozen = model.stages[:n]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def _choose_mode(opts: TrainOptions, raw: nn.Module, num_classes: int, per_rank: int, device: torch.device, d: Dist,
                 log: Any) -> StepMode:
    """The fastest step mode among those left open, measured side by side on the machine at hand once (the timing is
    cached per CPU, threads, torch version, network and batch, so a second run does not pay again); warns when a mode
    the user asked for is slower than float32. Without a probe (or with nothing to choose or warn about): float32,
    NCHW, torch's threads, unless given."""
    modes = candidate_modes(device, opts.amp, opts.channels_last, opts.threads)
    nothing_open = sum(not _flags_against(opts, m) for m in modes) == 1 and opts.amp in (None, "none")
    if not opts.probe or d.world > 1 or nothing_open:
        return _fixed_mode(opts)
    batch, size = min(per_rank, 128), opts.recipe.img_size
    cpu = cpu_info()
    what = {"cpu": cpu["model"], "features": cpu["features"], "torch": torch.__version__, "device": device.type,
            "threads": torch.get_num_threads(), "network": measurement_key({"repr": repr(raw)}), "batch": batch,
            "img_size": size, "modes": [m.label for m in modes]}

    def measure() -> dict[str, float]:
        log(f"speed probe: timing {len(modes)} step modes side by side on a batch of {batch} (once for this "
            f"machine and network; --no-probe skips it) ...")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            images = torch.randn(batch, input_channels(raw), size, size, device=device)
            targets = torch.randint(0, num_classes, (len(images),), device=device)
            return {m.label: v for m, v in probe_modes(raw, modes, images, targets).items()}

    timing = cached_speeds(TRAIN_PROBE_FILE, what, measure)
    speeds = {m: timing.speeds[m.label] for m in modes}
    chosen = max((m for m in speeds if not _flags_against(opts, m)), key=speeds.get)  # not the extra float32
    fp32 = max(v for m, v in speeds.items() if m.amp == "none")
    log(f"speed probe (training images/s, side by side{', measured earlier here' if timing.cached else ''}): " +
        ", ".join(f"{m.label} {v:.0f}" for m, v in sorted(speeds.items(), key=lambda kv: -kv[1])))
    if warning := busy_probe_warning(timing.busy_elsewhere, chosen.label):
        log(f"{warning} (the timing is not kept: the next run measures again)")
    if opts.amp not in (None, "none") and speeds[chosen] < fp32:
        log(f"warning: --amp {opts.amp} measured slower than float32 here ({speeds[chosen]:.0f} vs {fp32:.0f} "
            f"images/s); --amp none would train faster")
    return chosen


def _fixed_mode(opts: TrainOptions) -> StepMode:
    """The step mode without a probe: the flags given, else float32, NCHW and torch's threads."""
    return StepMode(opts.amp or "none", bool(opts.channels_last), opts.threads or torch.get_num_threads())


def _flags_against(opts: TrainOptions, mode: StepMode) -> list[str]:
    """The step-mode flags given in ``opts`` that ``mode`` does not have, written as on the command line."""
    given = {f"--amp {opts.amp}": opts.amp not in (None, mode.amp),
             "--channels-last" if opts.channels_last else "--no-channels-last":
                 opts.channels_last not in (None, mode.channels_last),
             f"--threads {opts.threads}": opts.threads not in (None, mode.threads)}
    return [flag for flag, differs in given.items() if differs]


def _resumed_mode(opts: TrainOptions, state: dict[str, Any], path: Path, device: torch.device, log: Any) -> StepMode:
    """The step mode a resumed run continues in: the one saved with it, never probed again, and kept over flags that
    ask for another, with a note (another precision, memory format or thread count changes the arithmetic, and a
    resume is exact). A state from before step modes were saved resumes in the probe-free mode, with a note."""
    recorded = state["repvgg"].get("step_mode")
    if recorded is None:
        mode = _fixed_mode(opts)
        log(f"note: {path} does not record the step mode it trained in (an older version wrote it); resuming in "
            f"{mode.label}, without a speed probe; --amp, --channels-last and --threads choose another")
        return mode
    mode = StepMode(**recorded)
    if mode.amp == "fp16" and device.type != "cuda":
        raise RepVGGError(f"{path} trained with fp16 autocast, which runs on CUDA only; resume it on a CUDA device")
    ignored = _flags_against(opts, mode)
    if ignored:
        log(f"note: {path} trained in {mode.label}, and a resume continues in that step mode so that it stays "
            f"exact: {', '.join(ignored)} not applied (a new run, with another --out, can use them)")
    return mode


def _optimizer(raw: nn.Module, recipe: Recipe, backbone_lr_scale: float) -> torch.optim.SGD:
    """SGD over the paper's decay groups; everything but the classifier (the last Linear layer) at
    ``backbone_lr_scale`` of the lr, and BatchNorm biases at the recipe's ``bn_bias_lr_scale`` of theirs (in groups
    of their own only then, so that the optimizer states of runs without it keep their layout)."""
    lr = recipe.scaled_lr(recipe.batch_size)
    head = {id(p) for m in [m for m in raw.modules() if isinstance(m, nn.Linear)][-1:] for p in m.parameters()}
    bn_bias = {id(m.bias) for m in raw.modules() if is_batchnorm(m) and m.bias is not None} \
        if recipe.bn_bias_lr_scale != 1.0 else set()
    groups = []
    for group in param_groups(raw, recipe.weight_decay, recipe.custom_l2):
        for is_head, is_bn_bias in itertools.product((False, True), repeat=2):
            params = [p for p in group["params"] if (id(p) in head) == is_head and (id(p) in bn_bias) == is_bn_bias]
            scale = (1.0 if is_head else backbone_lr_scale) * (recipe.bn_bias_lr_scale if is_bn_bias else 1.0)
            if params:
                groups.append({**group, "params": params, "lr": lr * scale})
    return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov and recipe.momentum > 0)


def _assemble(opts: TrainOptions, d: Dist, device: torch.device, raw: nn.Module, mode: StepMode, train_set: Dataset,
              val_set: Dataset, names: list[str], rundir: RunDir, preprocess: dict[str, Any]) -> Run:
    """The model wrapper, optimizer, schedule, step, EMA, Lookahead, mixing and state of a new run."""
    r = opts.recipe
    if opts.grad_checkpointing:
        if not isinstance(raw, RepVGG):
            raise RepVGGError("--grad-checkpointing is available for RepVGG models")
        raw.set_grad_checkpointing(True)
    if opts.sync_bn and d.world > 1:
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    if mode.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    model = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None) \
        if d.world > 1 else raw
    steps = len(train_set) // r.batch_size
    optimizer = _optimizer(raw, r, opts.backbone_lr_scale)
    schedule = WarmupDecay(round(r.warmup_epochs * steps), r.epochs * steps, r.schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    step_fn = TrainStep(model, raw, optimizer, nn.CrossEntropyLoss(label_smoothing=r.label_smoothing), device,
                        mode.amp, mode.channels_last, r.weight_decay if r.custom_l2 else 0.0, scheduler)
    ema = AveragedModel(raw, multi_avg_fn=get_ema_multi_avg_fn(r.ema_decay), use_buffers=True) \
        if r.ema_decay else None
    mixers = ([v2.MixUp(alpha=r.mixup, num_classes=len(names))] if r.mixup else []) + (
        [v2.CutMix(alpha=r.cutmix, num_classes=len(names))] if r.cutmix else [])
    meta = dict(class_names=names, preprocess=preprocess, recipe=r.name, recipe_values=asdict(r), seed=opts.seed)
    state = RunState(raw, optimizer, scheduler, step_fn.scaler, ema, Progress(total_epochs=r.epochs),
                     {**model_metadata(raw), **meta, "model_name": opts.model_name,
                      "origin": dict(opts.origin), "step_mode": asdict(mode)},
                     Lookahead(raw, r.lookahead) if r.lookahead else None)
    return Run(opts, d, device, raw, model, state, schedule, step_fn, v2.RandomChoice(mixers) if mixers else None,
               SeededSamples(train_set, opts.seed, r.flip == "alternate"), val_set, len(names), rundir,
               r.batch_size // d.world, steps, meta)


def resumed_options(opts: TrainOptions, log: Callable[[str], None] = print) -> TrainOptions:
    """``opts`` with the recipe a resume goes on with: the checkpoint's values for every field outside
    ``opts.recipe_given`` (see TrainOptions); call it before building datasets from the recipe."""
    path = _checkpoint_path(opts)
    if opts.recipe_given is None or path is None or not path.is_file():
        return opts
    return _with_saved_recipe(opts, read_state(path), path, log)


def _with_saved_recipe(opts: TrainOptions, state: dict[str, Any], path: Path, log: Callable[[str], None]
                       ) -> TrainOptions:
    """``opts`` with the saved state's recipe values for every field outside ``opts.recipe_given``; its preset too
    unless ``name`` is given (a command's ``--recipe``)."""
    saved = state["repvgg"]
    own = saved.get("recipe") or DEFAULT_RECIPE
    if opts.recipe_given is None or (own != opts.recipe.name and "name" in opts.recipe_given):
        return opts  # the checkpoint's recipe held whole, or another preset on purpose: _resume refuses either
    given = {name: getattr(opts.recipe, name) for name in opts.recipe_given}
    recipe = replace(recipe_of(saved), **given)
    now = opts.recipe
    if own != opts.recipe.name:
        log(f"resuming in the recipe {path} was begun with, {own!r} (no --recipe given)")
        now = recipe_with(own, **given) if own in RECIPES else recipe
    taken = [f"{f} {getattr(recipe, f)!r} (the {recipe.name!r} recipe now: {getattr(now, f)!r})"
             for f in asdict(recipe) if getattr(recipe, f) != getattr(now, f)]
    if taken:
        log(f"resuming with the recipe values {path} was begun with where no flag sets them: {', '.join(taken)}")
    return replace(opts, recipe=recipe)


def _checkpoint_path(opts: TrainOptions) -> Path | None:
    """The training state ``--resume`` names (None without it); ``auto``: the run directory's ``last.pt``."""
    if not opts.resume:
        return None
    return Path(opts.out_dir) / "last.pt" if opts.resume == "auto" else Path(opts.resume)


def _saved_state(opts: TrainOptions, log: Any) -> tuple[dict[str, Any], Path] | None:
    """With ``--resume``: the training state to continue (None for a new run: ``auto`` finding no checkpoint)."""
    path = _checkpoint_path(opts)
    if path is None:
        return None
    if opts.resume == "auto" and not path.is_file():
        log(f"no checkpoint at {path}; starting a new run")
        return None
    return read_state(path), path


def _resume(run: Run, state: dict[str, Any], path: Path) -> None:
    """Check the saved run is this one, restore it, and apply a changed epoch count."""
    opts = run.opts
    _check_same_run(run, state["repvgg"], path)
    run.state.load_state_dict(state, restore_rng=run.d.main)
    p = run.progress
    if not run.d.main:  # rank 0 holds the epoch's sums of every process, and the RNG state it saved is its own
        p.clear_epoch_sums()
        torch.manual_seed(opts.seed + run.d.rank + 1000 * (p.epoch + 1) + p.step)
    planned = state["repvgg"]["recipe_values"]["epochs"]
    if opts.recipe.epochs != planned:
        if opts.recipe.epochs < p.epoch:
            raise RepVGGError(f"--epochs {opts.recipe.epochs} is fewer than the {p.epoch} epochs {path} has done")
        run.log(f"--epochs {opts.recipe.epochs} replaces the checkpoint's plan of {p.total_epochs}: the "
                f"schedule is stretched to end at epoch {opts.recipe.epochs} and continues from step "
                f"{p.epoch * run.steps_per_epoch + p.step} on that curve")
        p.total_epochs = opts.recipe.epochs
        run.state.metadata["recipe_values"] = asdict(opts.recipe)
    run.schedule.total_steps = p.total_epochs * run.steps_per_epoch
    run.elapsed_before = p.elapsed_s
    if p.epoch < p.total_epochs:  # else train() says whether the run is complete or what it finishes
        run.log(f"resumed from {path} at epoch {p.epoch + 1}, step {p.step}")


def _check_same_run(run: Run, saved: dict[str, Any], path: Path) -> None:
    """Refuse to continue a checkpoint with another model, class count, strides, seed or recipe, naming what differs."""
    mine = run.state.metadata
    differences = [f"{key}: {saved.get(key)!r} -> {mine.get(key)!r}" for key in ("model_name", "architecture",
                   "num_classes", "strides", "block", "branches", "origin", "seed")
                   if _norm(saved.get(key) or None) != _norm(mine.get(key) or None)]
    before, now = saved.get("config"), mine.get("config")  # architectures of one's own: the fields that differ
    if before and now:
        differences += [f"config.{key}: {before.get(key)!r} -> {now.get(key)!r}"
                        for key in dict.fromkeys([*before, *now]) if before.get(key) != now.get(key)]
    if saved.get("recipe") != mine["recipe"]:
        differences.append(f"recipe: {saved.get('recipe')!r} -> {mine['recipe']!r}")
    differences += recipe_differences(saved.get("recipe_values", {}), run.opts.recipe)
    if differences:
        raise RepVGGError(f"{path} was trained with other settings than this run's ({'; '.join(differences)}); "
                          f"resume with the same flags, or start a new run with another --out")


def _norm(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
