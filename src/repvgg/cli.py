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
    from .models.architectures import MODEL_CONFIGS, create_model
    from .models.profile import count_macs, count_params
    from .models.reparam import reparameterize

    print(f"{'model':<18}{'official name':<18}{'train params':>14}{'deploy params':>15}{'GMACs@224':>11}")
    for name, cfg in MODEL_CONFIGS.items():
        with torch.device("meta"):
            model = create_model(name, num_classes=args.num_classes)
            deploy = reparameterize(model)
        print(f"{name:<18}{cfg.official_name:<18}{count_params(model) / 1e6:>13.2f}M"
              f"{count_params(deploy) / 1e6:>14.2f}M{count_macs(deploy) / 1e9:>11.2f}")


def _cmd_info(args: argparse.Namespace) -> None:
    from .models.checkpoints import infer_architecture, read_checkpoint

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
    from .models.checkpoints import model_from_checkpoint, save_checkpoint
    from .models.reparam import reparameterize

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


def _cmd_train(args: argparse.Namespace) -> None:
    from .training.loop import options_from_args, train

    train(options_from_args(args))


def _cmd_eval(args: argparse.Namespace) -> None:
    from .training.evaluate import run_eval

    run_eval(args)


def _cmd_plot(args: argparse.Namespace) -> None:
    from .training.plot import plot_run

    print(f"curves -> {plot_run(args.run_dir, args.out)}")


def _cmd_export(args: argparse.Namespace) -> None:
    from .deploy.engines import input_size
    from .deploy.export import export_model, load_deploy_model

    model, ckpt = load_deploy_model(args.checkpoint, args.model)
    img_size = tuple(args.img_size) if args.img_size else input_size(ckpt.metadata)
    result = export_model(model, args.out, args.format, img_size, args.dynamic_batch, args.tolerance)
    batch = "dynamic batch" if args.dynamic_batch or args.format == "torchscript" else "batch 1"
    print(f"exported {args.checkpoint} -> {', '.join(result.files)} ({args.format}, {batch}, "
          f"{img_size[0]}x{img_size[1]}); checked on input {tuple(result.input_shape)}: max difference vs PyTorch "
          f"{result.max_abs_diff:.2e} ({result.rel_diff:.2e} of the output scale)")


def _cmd_predict(args: argparse.Namespace) -> None:
    from .deploy.engines import fastest_engine, predict
    from .deploy.export import load_deploy_model

    model, ckpt = load_deploy_model(args.checkpoint, args.model)
    engine = args.engine or fastest_engine()
    results = predict(model, args.images, engine, ckpt.metadata, args.top)
    print(f"engine: {engine}")
    for image, top in zip(args.images, results, strict=True):
        print(f"{image}:")
        for name, prob in top:
            print(f"  {prob:8.2%}  {name}")


def _cmd_bench(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from .deploy.benchmark import format_table, plot_report, run_benchmark
    from .files import atomic_write

    report = run_benchmark(args.model, tuple(args.img_size), args.batch_sizes, args.rounds, args.images_per_round,
                           args.engines, args.baselines, train=not args.no_train, memory=not args.no_memory,
                           log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_table(report))
    atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    print(f"results -> {args.json}")
    if args.plot:
        try:
            plot_report(report, args.plot)
            print(f"chart -> {args.plot}")
        except RepVGGError as e:
            print(f"chart skipped: {e}")


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

    from .training import evaluate, loop

    p = sub.add_parser("train", help="train on image folders (one process, or many with torchrun)")
    loop.add_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5, loss and speed of a checkpoint on an image folder")
    evaluate.add_arguments(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("plot", help="draw a training run's loss, top-1 and lr curves to a PNG")
    p.add_argument("run_dir", help="a `repvgg train` output directory")
    p.add_argument("--out", help="image file (default RUN_DIR/curves.png)")
    p.set_defaults(func=_cmd_plot)

    from .deploy.benchmark import BASELINES, BENCH_ENGINES
    from .deploy.engines import ENGINES
    from .deploy.export import FORMATS

    p = sub.add_parser("export", help="export the deploy model to ONNX, TorchScript or OpenVINO, verified")
    p.add_argument("checkpoint", help="any checkpoint (training-time ones are re-parameterized first)")
    p.add_argument("--format", required=True, choices=list(FORMATS))
    p.add_argument("--out", required=True, help="output file (.onnx, .pt, or .xml with a .bin beside it)")
    p.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"),
                   help="input size (default: the checkpoint's preprocessing crop, else 224 224)")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: batch 1)")
    p.add_argument("--model", help="architecture, when the file does not say")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest output difference, relative to its scale")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("predict", help="top-5 classes of images, with the checkpoint's class names and preprocessing")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--engine", choices=list(ENGINES), help="default: the fastest installed one")
    p.add_argument("--top", type=int, default=5, help="classes shown per image")
    p.add_argument("--model", help="architecture, when the file does not say")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("bench", help="speed and memory of train/deploy forms on each engine vs ResNets, side by side")
    p.add_argument("--model", default="repvgg_a0")
    p.add_argument("--img-size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; speeds are medians over them")
    p.add_argument("--images-per-round", type=int, default=8, help="images timed per configuration and batch size")
    p.add_argument("--engines", nargs="+", choices=list(BENCH_ENGINES), default=list(BENCH_ENGINES))
    p.add_argument("--baselines", nargs="*", default=list(BASELINES), help="torchvision ResNets (random weights)")
    p.add_argument("--no-train", action="store_true", help="leave out the training-time model")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration peak-memory subprocesses")
    p.add_argument("--json", default="bench.json", help="results file")
    p.add_argument("--plot", default="bench.png", help="chart file ('' for none)")
    p.set_defaults(func=_cmd_bench)
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
