"""Quantization-aware fine-tuning of a trained multi-branch model, ending in an int8 artifact.

The run fine-tunes the training-time model with each block fake-quantized as its int8 deploy conv
(:mod:`repvgg.models.fakequant`), through the ordinary training loop (resumable, metrics, the final models), then
converts it and quantizes it with the engine's own tool using the scheme it trained against: per-channel symmetric
int8 weights and min/max activation ranges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from ..errors import RepVGGError
from ..files import file_sha256
from ..models.checkpoints import Checkpoint, model_from_checkpoint, read_checkpoint
from ..models.fakequant import prepare_qat
from ..training.options import TrainOptions, default_workers
from ..training.recipes import Recipe, recipe_of
from ..training.setup import load_datasets
from ..training.train import train
from .quantize import DEFAULT_CALIB_IMAGES, QuantizeOptions, QuantizeResult, engine_and_out, quantize_checkpoint

__all__ = ["QAT_METHOD", "QAT_LR_FRACTION", "QATOptions", "QATResult", "qat_recipe", "qat_run_dir", "finetune_qat"]

QAT_METHOD = "minmax"  # the engines' calibration that matches the simulation: plain min/max ranges
QAT_LR_FRACTION = 0.05  # default fine-tuning learning rate, relative to the checkpoint recipe's


@dataclass(frozen=True)
class QATOptions:
    """A quantization-aware fine-tune: the checkpoint, its data, the int8 artifact to write, and the run's settings."""

    checkpoint: str
    data: str
    out: str
    run_dir: str | None = None  # the fine-tuning run; default: the output's path with the suffix .qat
    epochs: int = 1
    lr: float | None = None  # for a global batch of 256; default: QAT_LR_FRACTION of the recipe's
    batch_size: int | None = None
    engine: str | None = None
    calib_images: int = DEFAULT_CALIB_IMAGES
    workers: int | None = None
    channels_last: bool | None = None  # None (and threads None): the speed probe chooses
    threads: int | None = None
    seed: int = 0
    cache_dir: str | None = None


@dataclass
class QATResult:
    """The fine-tuning run's summary (``train_top1``: the simulated int8 model) and the int8 artifact."""

    run_dir: str
    summary: dict
    quantized: QuantizeResult


def qat_recipe(ckpt: Checkpoint, epochs: int, lr: float | None = None, batch_size: int | None = None) -> Recipe:
    """The recipe the checkpoint was trained with (strides and image sizes as saved) turned into a short fine-tune:
    no warm-up, EMA, mixup or cutmix, and a small cosine learning rate."""
    meta, trained = ckpt.metadata, recipe_of(ckpt.metadata)
    sizes = meta.get("preprocess") or {}
    return replace(trained, epochs=epochs, lr=lr or trained.lr * QAT_LR_FRACTION,
                   batch_size=batch_size or trained.batch_size, warmup_epochs=0.0, ema_decay=0.0, mixup=0.0,
                   cutmix=0.0, strides=tuple(meta.get("strides") or trained.strides),
                   img_size=sizes.get("crop") or trained.img_size,
                   eval_resize=sizes.get("resize") or trained.eval_resize)


def _training_checkpoint(path: str) -> Checkpoint:
    """The checkpoint to fine-tune, which must be a training-time (multi-branch) RepVGG."""
    ckpt = read_checkpoint(path)
    if ckpt.deploy:
        raise RepVGGError(f"{path} is a deploy checkpoint; quantization-aware training fine-tunes the training-time "
                          f"(multi-branch) model it came from")
    return ckpt


def _check_classes(ckpt: Checkpoint, class_names: Sequence[str]) -> None:
    """The fine-tuning data must have the classes the checkpoint was trained on."""
    saved = ckpt.metadata.get("class_names")
    count = ckpt.metadata.get("num_classes")
    if (saved and list(saved) != list(class_names)) or (count and count != len(class_names)):
        raise RepVGGError(f"the data's {len(class_names)} classes differ from the {count or len(saved)} that "
                          f"{ckpt.path} was trained on")


def _qat_model(ckpt: Checkpoint) -> nn.Module:
    """The checkpoint's model with its weights, every block fake-quantized."""
    return prepare_qat(model_from_checkpoint(ckpt)[0])


def qat_run_dir(opts: QATOptions) -> Path:
    """The fine-tuning run's folder: ``opts.run_dir``, else the int8 output's path with the suffix ``.qat``."""
    return Path(opts.run_dir) if opts.run_dir else Path(opts.out).with_suffix(".qat")


def finetune_qat(opts: QATOptions, train_set: Dataset | None = None, val_set: Dataset | None = None,
                 class_names: Sequence[str] | None = None) -> QATResult:
    """Fine-tune ``opts.checkpoint`` quantization-aware on ``opts.data`` (or the given datasets), then write the
    int8 artifact. Re-running resumes an interrupted fine-tune, or reuses a finished one of the same checkpoint
    (its hash is recorded in the run; another checkpoint's run is refused)."""
    if not Path(opts.data).exists():
        raise RepVGGError(f"data not found: {opts.data}")
    quantize = QuantizeOptions(checkpoint=opts.checkpoint, calib=opts.data, out=opts.out, engine=opts.engine,
                               method=QAT_METHOD, calib_images=opts.calib_images, cache_dir=opts.cache_dir)
    engine, _, out = engine_and_out(quantize)
    ckpt = _training_checkpoint(opts.checkpoint)
    meta = ckpt.metadata
    train_opts = TrainOptions(
        data=opts.data, out_dir=str(qat_run_dir(opts)), model=meta.get("architecture", "?"),
        origin={"source_sha256": file_sha256(opts.checkpoint)},
        recipe=qat_recipe(ckpt, opts.epochs, opts.lr, opts.batch_size), model_factory=lambda _: _qat_model(ckpt),
        block=meta.get("block", "repvgg"), branches=meta.get("branches", "full"),
        workers=default_workers() if opts.workers is None else opts.workers, amp="none",
        channels_last=opts.channels_last, threads=opts.threads,
        seed=opts.seed, resume="auto", cache_dir=opts.cache_dir, tensorboard=False)
    if train_set is None or val_set is None or class_names is None:
        train_set, val_set, class_names = load_datasets(train_opts)
    _check_classes(ckpt, class_names)
    summary = train(train_opts, train_set, val_set, class_names)
    quantized = quantize_checkpoint(replace(quantize, checkpoint=summary["checkpoint"], engine=engine, out=str(out)))
    return QATResult(train_opts.out_dir, summary, quantized)
