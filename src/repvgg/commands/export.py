"""``repvgg export``: the deploy model as ONNX, TorchScript or OpenVINO IR, with its metadata, verified against
PyTorch through the artifact's own runtime before it is written."""

from __future__ import annotations

import argparse

from ..errors import RepVGGError
from ..files import Outputs
from .args import PRETRAINED_HELP, nonneg_float, output_file, positive_int

WRITES = True


def inputs(args: argparse.Namespace) -> list[str | None]:
    return [args.checkpoint, args.pretrained]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..deploy.engines import FORMATS

    p.add_argument("checkpoint", nargs="?", help="any checkpoint (training-time ones are re-parameterized first)")
    p.add_argument("--pretrained", metavar="WEIGHTS", help=PRETRAINED_HELP + "; instead of CHECKPOINT")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="file format to write")
    p.add_argument("--out", type=output_file,
                   help="output file (.onnx, .pt, or .xml with a .bin beside it); default: beside the checkpoint, "
                        "named after it with the format's suffix (a0.pth -> a0.onnx), or in the current folder "
                        "after the published model (repvgg_a0.onnx)")
    p.add_argument("--img-size", type=positive_int, nargs=2, metavar=("H", "W"),
                   help="input size (default: the checkpoint's preprocessing crop, else 224 224)")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: batch 1)")
    p.add_argument("--model", help="architecture, when the file does not say")
    p.add_argument("--tolerance", type=nonneg_float, default=1e-4,
                   help="largest output difference, relative to its scale")


def run(args: argparse.Namespace, outputs: Outputs) -> None:
    from ..deploy.export import check_export_path, default_export_path, export_model
    from ..deploy.sources import deploy_model_source
    from ..models.preprocess import input_size

    if bool(args.checkpoint) == bool(args.pretrained):
        raise RepVGGError("give a checkpoint file or --pretrained (one of the two)")
    out = args.out or default_export_path(args.checkpoint or args.pretrained, args.format)
    out = outputs.file(check_export_path(out, args.format))
    model, ckpt, label = deploy_model_source(args.checkpoint, args.pretrained, args.model)
    img_size = tuple(args.img_size) if args.img_size else input_size(ckpt.metadata)
    result = export_model(model, out, args.format, img_size, args.dynamic_batch, args.tolerance,
                          metadata=ckpt.metadata)
    batch = "dynamic batch" if args.dynamic_batch or args.format == "torchscript" else "batch 1"
    print(f"exported {label} -> {', '.join(result.files)} ({args.format}, {batch}, "
          f"{img_size[0]}x{img_size[1]}); checked on input {tuple(result.input_shape)}: max difference vs PyTorch "
          f"{result.max_abs_diff:.2e} ({result.rel_diff:.2e} of the output scale)")
