"""The ``repvgg`` command line: one sub-command per task; bad input ends with a one-line error and exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from ._version import __version__
from .errors import RepVGGError

EXIT_BAD_INPUT = 2


def _cmd_list(args: argparse.Namespace) -> None:
    from .architectures import MODEL_CONFIGS, create_model
    from .profile import count_macs, count_params
    from .reparam import reparameterize

    print(f"{'model':<18}{'official name':<18}{'train params':>14}{'deploy params':>15}{'GMACs@224':>11}")
    for name, cfg in MODEL_CONFIGS.items():
        with torch.device("meta"):
            model = create_model(name, num_classes=args.num_classes)
            deploy = reparameterize(model)
        print(f"{name:<18}{cfg.official_name:<18}{count_params(model) / 1e6:>13.2f}M"
              f"{count_params(deploy) / 1e6:>14.2f}M{count_macs(deploy) / 1e9:>11.2f}")


def _cmd_info(args: argparse.Namespace) -> None:
    from .checkpoints import infer_architecture, read_checkpoint

    ckpt = read_checkpoint(args.checkpoint)
    meta = ckpt.metadata
    try:
        arch = meta.get("architecture") or infer_architecture(ckpt.state_dict)
    except RepVGGError as e:
        arch = f"unknown ({e})"
    n_params = sum(v.numel() for k, v in ckpt.state_dict.items() if not k.endswith(("running_mean", "running_var",
                                                                                      "num_batches_tracked")))
    linear = ckpt.state_dict.get("linear.weight")
    rows = {
        "file": args.checkpoint,
        "format": ckpt.format,
        "architecture": arch,
        "form": "deploy (re-parameterized)" if ckpt.deploy else "training-time (multi-branch)",
        "classes": meta.get("num_classes", linear.shape[0] if linear is not None else "none"),
        "parameters": f"{n_params / 1e6:.2f}M in {len(ckpt.state_dict)} tensors",
    }
    rows.update({k: v for k, v in meta.items() if k not in ("architecture", "num_classes", "format")})
    for key, value in rows.items():
        if isinstance(value, list) and len(value) > 12:
            value = f"{value[:12]} ... ({len(value)} items)"
        print(f"{key:>16}: {value}")


def _cmd_convert(args: argparse.Namespace) -> None:
    from .checkpoints import model_from_checkpoint, save_checkpoint
    from .reparam import reparameterize

    model, ckpt = model_from_checkpoint(args.src, args.model)
    deploy = reparameterize(model)
    x = torch.randn(2, model.stage0.in_channels, args.img_size, args.img_size)
    with torch.no_grad():
        ref, out = model(x), deploy(x)
    err = ((ref - out).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    if err > args.tolerance:
        raise RepVGGError(f"converted model differs from the source by {err:.2e} of the output scale "
                          f"(tolerance {args.tolerance:.0e}); nothing written")
    extra = {k: v for k, v in ckpt.metadata.items()
             if k not in ("architecture", "num_classes", "in_chans", "strides", "groups", "deploy", "format",
                          "library_version")}
    save_checkpoint(deploy, args.dst, source=str(args.src), source_format=ckpt.format, **extra)
    print(f"converted {args.src} ({ckpt.format}, {model.config.official_name}) -> {args.dst}; "
          f"max relative difference {err:.2e}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repvgg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"repvgg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="every architecture with train/deploy parameters and GMACs at 224x224")
    p.add_argument("--num-classes", type=int, default=1000)
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="tell what a checkpoint file holds")
    p.add_argument("checkpoint")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("convert", help="re-parameterize a training-time checkpoint into a deploy checkpoint")
    p.add_argument("src", help="training-time checkpoint (this library's, official or timm format)")
    p.add_argument("dst", help="output file (.pth or .safetensors)")
    p.add_argument("--model", help="architecture, when the file does not say (e.g. repvgg_a0 or RepVGG-A0)")
    p.add_argument("--img-size", type=int, default=64, help="side of the random check batch")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest relative output difference accepted")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("demo", help="the main job on an embedded default, end to end")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (RepVGGError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"repvgg: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("repvgg: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
