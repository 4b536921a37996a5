"""``repvgg train``: train on image folders, one process or many (torchrun), resumable, into a run folder."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from ..files import Outputs
from .args import architecture, nonneg_float, nonneg_int, positive_float, positive_int, prob_float

if TYPE_CHECKING:
    from ..training.options import TrainOptions
    from ..training.recipes import Recipe

WRITES = False  # a run folder: never replaced, continued only with --resume


def inputs(args: argparse.Namespace) -> list[str | None]:
    return [args.pretrained]


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per recipe field, named as the field (``--weight-decay`` also ``--wd``); None keeps the recipe's."""
    g = p.add_argument_group("recipe overrides (default: the recipe's value)")
    g.add_argument("--epochs", type=positive_int, help="epochs to train (more than a checkpoint's plan extends it)")
    g.add_argument("--batch-size", type=positive_int, help="global batch over all processes")
    g.add_argument("--lr", type=positive_float, help="peak learning rate for a global batch of 256; the run uses "
                   "lr * batch / 256")
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", type=nonneg_float, help="weight decay")
    g.add_argument("--momentum", type=prob_float, help="SGD momentum")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="Nesterov momentum")
    g.add_argument("--img-size", type=positive_int, help="training crop side")
    g.add_argument("--eval-resize", type=positive_int, help="shorter side before the evaluation centre crop")
    g.add_argument("--crop", choices=["random_resized", "pad", "pad_reflect"],
                   help="random-resized crop, or a crop of the image padded (--crop-pad) with zeros (pad) or its "
                        "mirror image (pad_reflect)")
    g.add_argument("--crop-pad", type=nonneg_int, help="border in pixels of the pad crops, the largest shift they make "
                   "(default: an eighth of the side, 4 for 32x32 images)")
    g.add_argument("--auto-augment", choices=["none", "rand", "auto"], help="RandAugment or AutoAugment")
    g.add_argument("--flip", choices=["random", "alternate"], help="horizontal flip: random per image and epoch, or "
                   "alternate (each image mirrored every other epoch, from a random first; airbench's)")
    g.add_argument("--warmup-epochs", type=nonneg_float, help="linear warm-up length")
    g.add_argument("--schedule", choices=["cosine", "linear"], help="decay to zero after the warm-up: cosine or linear")
    g.add_argument("--label-smoothing", type=prob_float, help="label smoothing (0: off)")
    g.add_argument("--mixup", type=nonneg_float, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=nonneg_float, help="cutmix alpha (0: off)")
    g.add_argument("--cutout", type=nonneg_int, help="side in pixels of a square erased at a random place of each "
                   "training image (0: off)")
    g.add_argument("--bn-bias-lr-scale", type=positive_float, help="learning rate of BatchNorm biases relative to "
                   "the rest")
    g.add_argument("--ema-decay", type=prob_float, help="EMA of weights per step (0: off), e.g. 0.9998")
    g.add_argument("--lookahead", type=nonneg_int, metavar="K", help="Lookahead every K steps (0: off), scheduled as "
                   "airbench's: slow weights the model restarts from, averaging the last few dozen steps at the end "
                   "and giving the final model; e.g. 5")
    g.add_argument("--custom-l2", action=argparse.BooleanOptionalAction, default=None,
                   help="the official L2 on the equivalent kernel instead of plain decay on the branch kernels")
    g.add_argument("--strides", type=positive_int, nargs=5, metavar="S",
                   help="stride of stage0..stage4, e.g. 1 1 2 2 2 for 32x32 images")
    g.add_argument("--bn-init", choices=["default", "small"], help="start of the BatchNorms inside the blocks: as "
                   "built (weight 1, bias 0, as the official code) or small (weight ~ N(0.1, 0.1), bias ~ N(0, 0.1), "
                   "as timm's RepVGG)")


def _machinery_arguments(p: argparse.ArgumentParser) -> None:
    from ..training.memory import MEMORY_SHARE
    from ..training.options import default_workers

    g = p.add_argument_group("machinery")
    g.add_argument("--data-path", choices=["auto", "memory", "loader"], default="auto",
                   help="memory: decode the images once into memory (cached) and augment whole batches in the "
                   "training process; loader: read and augment each image in --workers processes; auto: memory when "
                   f"the recipe's augmentation allows it (pad crop and flip) and the decoded images fit "
                   f"in {MEMORY_SHARE:.0%}% of the available memory")
    g.add_argument("--workers", type=nonneg_int, default=default_workers(),
                   help="data-loading processes per training process (the loader path)")
    g.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], default="auto",
                   help="mixed precision; auto: whichever the speed probe measures fastest (fp16: CUDA only)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: the speed probe decides)")
    g.add_argument("--threads", type=positive_int, help="torch threads per process (default: the probe decides)")
    g.add_argument("--no-probe", dest="probe", action="store_false",
                   help="skip the speed probe: float32, NCHW and torch's default threads unless given")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of initialization, shuffling and augmentation (kept in the run: a resume gives the same)")
    g.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                   help="continue from CKPT, or from <out>/last.pt when given alone (a new run if there is none), "
                        "with the recipe values it was begun with where no flag sets them")
    g.add_argument("--bad-images", choices=["skip", "error"], default="skip",
                   help="unreadable images: report and skip, or stop")
    g.add_argument("--cache-dir", help="where archives are unpacked (default $REPVGG_CACHE_DIR/datasets or "
                   "~/.cache/repvgg/datasets)")
    g.add_argument("--time-budget-min", type=positive_float, help="shrink the planned epochs to fit this many "
                   "minutes")
    g.add_argument("--save-every", dest="save_every_min", type=nonneg_float, default=10.0, metavar="MIN",
                   help="also checkpoint the run (last.pt) mid-epoch every MIN minutes, so that a kill or power cut "
                   "loses less; 0: at each epoch's end and on a stop signal only")
    g.add_argument("--eval-every", type=positive_int, default=1, help="validate every N epochs")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="no TensorBoard events")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``repvgg train`` options: data, model, recipe overrides and run machinery."""
    from ..models.blocks import BLOCK_KINDS, BRANCHES
    from ..training.recipes import DEFAULT_RECIPE, RECIPES

    p.add_argument("--data", help="folder with train/ and val/ (or test/) class folders, or .tar/.tar.gz archives "
                   "of them (required unless --print-config)")
    p.add_argument("--model", type=architecture, default="repvgg_a0",
                   help="architecture: a registered name (see `repvgg list`), or a .json file of one's own (the fields "
                   "of repvgg.RepVGGConfig: official_name, depths, widths, and optionally groups, se, se_reduction)")
    p.add_argument("--block", choices=BLOCK_KINDS, default="repvgg",
                   help="training-time block: RepVGG's, or QARepVGG's quantization-friendly one")
    p.add_argument("--branches", choices=BRANCHES, default="full",
                   help="the branches each block trains with (the paper's ablation); all convert to one 3x3 conv")
    p.add_argument("--recipe", choices=list(RECIPES), help="named preset, flags below override it "
                   f"(default: {DEFAULT_RECIPE}; with --resume, the run's own)")
    p.add_argument("--out", help="run directory (default runs/<model>-<recipe>)")
    p.add_argument("--print-config", action="store_true", help="print the recipe's values and options, then exit")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--pretrained", metavar="WEIGHTS", help="start from these weights: a checkpoint file, a Hugging "
                   "Face hub id, or 'true' for the model's published ImageNet weights; a classifier for another "
                   "class count is replaced")
    g.add_argument("--freeze-stages", type=nonneg_int, default=0, metavar="N",
                   help="keep stage0..stage(N-1) fixed (weights and BN statistics)")
    g.add_argument("--backbone-lr-scale", type=nonneg_float, default=1.0, metavar="F",
                   help="learning rate of all but the classifier, as a fraction of --lr")
    add_recipe_arguments(p)
    _machinery_arguments(p)


def recipe_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe fields the flags of :func:`add_recipe_arguments` set (those not given are left out), for
    ``recipe_with`` and ``TrainOptions.recipe_given``."""
    from ..training.recipes import Recipe

    given = {f.name: getattr(args, f.name, None) for f in fields(Recipe) if f.name != "name"}
    return {name: value for name, value in given.items() if value is not None}


def recipe_flags(recipe: Recipe, base: Recipe) -> list[str]:
    """The flags of :func:`add_recipe_arguments` that turn ``base`` into ``recipe``: how a command line reproduces a
    run's recipe."""
    flags: list[str] = []
    for f in fields(recipe):
        value = getattr(recipe, f.name)
        if f.name == "name" or value == getattr(base, f.name):
            continue
        flag = f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            flags += [f"--{flag}", *(map(str, value) if isinstance(value, tuple) else [str(value)])]
    return flags


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """TrainOptions from parsed ``repvgg train`` arguments."""
    from ..training.options import TrainOptions
    from ..training.recipes import DEFAULT_RECIPE, recipe_with

    overrides = recipe_overrides(args)
    given = frozenset(overrides) | ({"name"} if args.recipe else set())  # a resume takes the rest from its run
    opts = TrainOptions(data=args.data, out_dir=args.out or "", model=args.model,
                        recipe=recipe_with(args.recipe or DEFAULT_RECIPE, **overrides), recipe_given=given,
                        block=args.block, branches=args.branches, pretrained=args.pretrained,
                        freeze_stages=args.freeze_stages, backbone_lr_scale=args.backbone_lr_scale,
                        workers=args.workers, data_path=args.data_path, amp=None if args.amp == "auto" else args.amp,
                        channels_last=args.channels_last, threads=args.threads, probe=args.probe,
                        grad_checkpointing=args.grad_checkpointing, sync_bn=args.sync_bn, seed=args.seed,
                        resume=args.resume, bad_images=args.bad_images, cache_dir=args.cache_dir,
                        time_budget_min=args.time_budget_min, save_every_min=args.save_every_min,
                        device=args.device, eval_every=args.eval_every, tensorboard=args.tensorboard)
    opts.out_dir = opts.out_dir or f"runs/{opts.model_name}-{opts.recipe.name}"
    return opts


def run(args: argparse.Namespace, outputs: Outputs) -> None:
    from ..training.options import describe
    from ..training.setup import resumed_options
    from ..training.train import train

    opts = options_from_args(args)
    if args.print_config:  # with --resume: the values the run would go on with
        print(describe(resumed_options(opts)))
        return
    outputs.folder(opts.out_dir)
    train(opts)
