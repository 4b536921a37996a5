"""``repvgg quantize``: post-training int8 quantization of the deploy model with the engine's own tool (NNCF for
OpenVINO, onnxruntime.quantization for ONNX Runtime), calibrated on an image folder, checked before it is written."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..files import Outputs
from .args import output_file, positive_int

WRITES = True


def inputs(args: argparse.Namespace) -> list[str | None]:
    return [args.checkpoint]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..deploy.quantize import METHODS

    p.add_argument("checkpoint", help="any checkpoint (training-time ones are re-parameterized first)")
    p.add_argument("--calib", required=True, metavar="DIR", help="calibration images: a folder or archive "
                   "(its train/ split, else val/ or test/, else the class folders themselves)")
    p.add_argument("--method", help="activation calibration: " + "; ".join(
        f"{e}: {', '.join(m)}" for e, m in METHODS.items()) + " (default: each engine's first)")
    p.add_argument("--model", help="architecture, when the file does not say")
    add_int8_arguments(p)


def add_int8_arguments(p: argparse.ArgumentParser) -> None:
    """The options of every command that ends in an int8 artifact (``quantize``, ``qat``)."""
    from ..deploy.engines import INT8_ENGINES
    from ..deploy.quantize import DEFAULT_CALIB_IMAGES

    p.add_argument("--out", required=True, type=output_file, help="int8 output file: .xml (openvino, with a .bin "
                   "beside it) or .onnx (onnxruntime); without a suffix, the engine's is appended")
    p.add_argument("--engine", choices=list(INT8_ENGINES), help="default: the one --out's suffix names, else the "
                   "faster int8 engine here (probed once, cached)")
    p.add_argument("--calib-images", type=positive_int, default=DEFAULT_CALIB_IMAGES,
                   help="calibration images used at most")
    p.add_argument("--val", metavar="DIR", help="also report float32 vs int8 top-1 on this folder")
    p.add_argument("--cache-dir", help="where archives are unpacked")


def val_top1(data: str, source: str, model_name: str | None, cache_dir: str | None) -> float:
    """Top-1 of a checkpoint or int8 artifact on ``data`` (its val/ or test/ split, else the folder itself)."""
    from ..deploy.sources import load_model_source
    from ..training.evaluate import EvalSettings, evaluate_folder

    model, ckpt = load_model_source(source, model_name)
    return evaluate_folder(model, ckpt.metadata, EvalSettings(data=data, cache_dir=cache_dir)).result.top1


def print_val(val: str, float_top1: float, source: str, cache_dir: str | None) -> None:
    """The float32 vs int8 top-1 line of ``--val``."""
    int8 = val_top1(val, source, None, cache_dir)
    print(f"top-1 on {val}: float32 {float_top1:.2f}%  int8 {int8:.2f}%  ({int8 - float_top1:+.2f} points)")


def run(args: argparse.Namespace, outputs: Outputs) -> None:
    from ..deploy.quantize import QuantizeOptions, engine_and_out, quantize_checkpoint

    opts = QuantizeOptions(checkpoint=args.checkpoint, calib=args.calib, out=args.out, engine=args.engine,
                           method=args.method, calib_images=args.calib_images, model=args.model,
                           cache_dir=args.cache_dir)
    out = outputs.file(engine_and_out(opts)[2])
    float_top1 = val_top1(args.val, args.checkpoint, args.model, args.cache_dir) if args.val else None
    result = quantize_checkpoint(opts)
    print(f"quantized {args.checkpoint} -> {', '.join(result.files)} (int8, {result.engine}, method "
          f"{result.method}, {result.calib_images} calibration images); on them: top-1 agreement with float32 "
          f"{result.agreement:.1%}, max difference {result.rel_diff:.2e} of the output scale")
    if float_top1 is not None:
        print_val(args.val, float_top1, str(Path(out)), args.cache_dir)
