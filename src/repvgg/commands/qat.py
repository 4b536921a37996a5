"""``repvgg qat``: quantization-aware fine-tuning of a trained multi-branch model (a resumable run folder), then
its int8 artifact."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..files import Outputs
from .args import nonneg_int, positive_float, positive_int

WRITES = True


def inputs(args: argparse.Namespace) -> list[str | None]:
    return [args.checkpoint]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..deploy.qat import QAT_LR_FRACTION, QATOptions
    from .quantize import add_int8_arguments

    p.add_argument("checkpoint", help="a training-time checkpoint (its recipe, strides and block are reused)")
    p.add_argument("--data", required=True, metavar="DIR", help="folder or archive with train/ and val/ (or test/); "
                   "its train/ split also calibrates the int8 artifact")
    add_int8_arguments(p)
    p.add_argument("--run-dir", help="the fine-tuning run (resumed when run again); default: --out with suffix .qat")
    p.add_argument("--epochs", type=positive_int, default=QATOptions.epochs, help="fine-tuning epochs")
    p.add_argument("--lr", type=positive_float, help="peak learning rate for a global batch of 256 (cosine to 0); "
                   f"default: {QAT_LR_FRACTION:g} x the checkpoint recipe's")
    p.add_argument("--batch-size", type=positive_int, help="default: the checkpoint recipe's")
    p.add_argument("--workers", type=nonneg_int, help="data-loading processes (default: the cores less one)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: the speed probe decides)")
    p.add_argument("--threads", type=positive_int, help="PyTorch threads (default: probed)")
    p.add_argument("--seed", type=int, default=0, help="random seed")


def run(args: argparse.Namespace, outputs: Outputs) -> None:
    from ..deploy.qat import QAT_METHOD, QATOptions, finetune_qat, qat_run_dir
    from ..deploy.quantize import QuantizeOptions, engine_and_out
    from ..errors import RepVGGError
    from .quantize import print_val, val_top1

    opts = QATOptions(checkpoint=args.checkpoint, data=args.data, out=args.out, run_dir=args.run_dir,
                      epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, engine=args.engine,
                      calib_images=args.calib_images, workers=args.workers, channels_last=args.channels_last,
                      threads=args.threads, seed=args.seed,
                      cache_dir=args.cache_dir)
    out = engine_and_out(QuantizeOptions(checkpoint=args.checkpoint, calib=args.data, out=args.out,
                                         engine=args.engine, method=QAT_METHOD))[2]
    outputs.file(out)
    outputs.folder(qat_run_dir(opts), "fine-tuning run folder")
    if args.val and not Path(args.val).exists():
        raise RepVGGError(f"--val folder not found: {args.val}")
    result = finetune_qat(opts)
    s, q = result.summary, result.quantized
    print(f"fine-tuned quantization-aware in {result.run_dir} ({s['epochs']} epochs): simulated int8 top-1 "
          f"{s['train_top1']:.2f}%, float32 deploy top-1 {s['deploy_top1']:.2f}%")
    print(f"wrote {', '.join(q.files)} (int8, {q.engine}, method {q.method}, {q.calib_images} calibration images); "
          f"top-1 agreement with float32 on them {q.agreement:.1%}")
    if args.val:  # the fine-tuned float32 model against its int8 artifact
        print_val(args.val, val_top1(args.val, s["checkpoint"], None, args.cache_dir), q.files[0], args.cache_dir)
