"""The ``repvgg`` command line: one sub-command per task; bad input ends with a one-line error and exit code 2."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from ._version import __version__
from .cliargs import DefaultsFormatter, nonneg_float, nonneg_int, output_file, positive_float, positive_int
from .errors import Interrupted, RepVGGError

EXIT_BAD_INPUT = 2
PRETRAINED_HELP = ("published weights by model name (repvgg_a0: timm's, from the Hugging Face Hub, cached), "
                   "a Hub id (timm/repvgg_a0.rvgg_in1k) or a file")


def _cmd_list(args: argparse.Namespace) -> None:
    from .models.architectures import MODEL_CONFIGS
    from .models.pretrained import PUBLISHED
    from .models.profile import architecture_stats

    print(f"{'model':<18}{'official name':<18}{'train params':>14}{'deploy params':>15}{'GMACs@224':>11}"
          f"{'top-1 %':>9}  weights")
    for name, cfg in MODEL_CONFIGS.items():
        stats, published = architecture_stats(cfg, num_classes=args.num_classes), PUBLISHED[name]
        top1 = "-" if published.top1 is None else f"{published.top1:.2f}{'*' if published.test_size != 224 else ''}"
        print(f"{name:<18}{cfg.official_name:<18}{stats.train_params / 1e6:>13.2f}M"
              f"{stats.deploy_params / 1e6:>14.2f}M{stats.macs / 1e9:>11.2f}{top1:>9}  {published.weights}")
    print("top-1: published ImageNet top-1 (* tested at 320x320)\n"
          "weights: hub = fetched by name (pretrained=True, --pretrained NAME); release file = download the "
          "official file, pass its path")


def _cmd_info(args: argparse.Namespace) -> None:
    from .models.checkpoints import describe_checkpoint

    for key, value in describe_checkpoint(args.checkpoint).items():
        if isinstance(value, list) and len(value) > 12:
            value = f"{value[:12]} ... ({len(value)} items)"
        print(f"{key:>16}: {value}")


def _cmd_convert(args: argparse.Namespace) -> None:
    from .models.convert import convert_checkpoint

    result = convert_checkpoint(args.src, args.dst, args.model, args.img_size, args.tolerance, args.headless)
    head = f"{result.num_classes} classes" if result.num_classes else "headless: no classifier"
    print(f"converted {result.src} ({result.source_format}, {result.architecture}, {head}) -> {result.dst}; "
          f"max relative difference {result.rel_diff:.2e}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DemoOptions, run_demo

    run_demo(DemoOptions())


def _cmd_train(args: argparse.Namespace) -> None:
    from .training.options import describe, options_from_args
    from .training.train import train

    opts = options_from_args(args)
    if args.print_config:
        print(describe(opts))
        return
    train(opts)


def _cmd_eval(args: argparse.Namespace) -> None:
    from dataclasses import fields

    from .training.evaluate import EvalOptions, run_eval

    run_eval(EvalOptions(**{f.name: getattr(args, f.name) for f in fields(EvalOptions)}))


def _cmd_plot(args: argparse.Namespace) -> None:
    from .training.plot import plot_run

    print(f"curves -> {plot_run(args.run_dir, args.out)}")


def _cmd_export(args: argparse.Namespace) -> None:
    from .deploy.engines import input_size
    from .deploy.export import export_model
    from .deploy.sources import deploy_model_source

    model, ckpt, label = deploy_model_source(args.checkpoint, args.pretrained, args.model)
    img_size = tuple(args.img_size) if args.img_size else input_size(ckpt.metadata)
    result = export_model(model, args.out, args.format, img_size, args.dynamic_batch, args.tolerance,
                          metadata=ckpt.metadata)
    batch = "dynamic batch" if args.dynamic_batch or args.format == "torchscript" else "batch 1"
    print(f"exported {label} -> {', '.join(result.files)} ({args.format}, {batch}, "
          f"{img_size[0]}x{img_size[1]}); checked on input {tuple(result.input_shape)}: max difference vs PyTorch "
          f"{result.max_abs_diff:.2e} ({result.rel_diff:.2e} of the output scale)")


def _cmd_predict(args: argparse.Namespace) -> None:
    from .deploy.artifacts import artifact_format
    from .deploy.predict import predict
    from .deploy.probe import fastest_engine
    from .deploy.sources import deploy_model_source, open_artifact

    images = [args.checkpoint, *args.images] if args.pretrained else args.images
    if not args.pretrained and artifact_format(args.checkpoint):
        model, metadata = open_artifact(args.checkpoint, args.engine, max(len(images), 1)), None
        engine = model.engine
    else:
        model, ckpt, _ = deploy_model_source(None if args.pretrained else args.checkpoint, args.pretrained, args.model)
        engine, metadata = args.engine or fastest_engine(batch_size=max(len(images), 1)), ckpt.metadata
    results = predict(model, images, engine, metadata, args.top)
    print(f"engine: {engine}")
    for image, top in zip(images, results, strict=True):
        print(f"{image}:")
        for name, prob in top:
            print(f"  {prob:8.2%}  {name}")


def _cmd_quantize(args: argparse.Namespace) -> None:
    from dataclasses import fields

    from .deploy.quantize import QuantizeOptions, run_quantize

    result = run_quantize(QuantizeOptions(**{f.name: getattr(args, f.name) for f in fields(QuantizeOptions)}))
    print(f"quantized {args.checkpoint} -> {', '.join(result.files)} (int8, {result.engine}, method "
          f"{result.method}, {result.calib_images} calibration images); on them: top-1 agreement with float32 "
          f"{result.agreement:.1%}, max difference {result.rel_diff:.2e} of the output scale")
    _print_val_top1(args.val, result.top1)


def _print_val_top1(val: str | None, top1: dict[str, float]) -> None:
    """The float32 vs int8 top-1 line of ``quantize``/``qat --val`` (nothing without ``--val``)."""
    if top1:
        print(f"top-1 on {val}: float32 {top1['float32']:.2f}%  int8 {top1['int8']:.2f}%  "
              f"({top1['int8'] - top1['float32']:+.2f} points)")


def _cmd_qat(args: argparse.Namespace) -> None:
    from dataclasses import fields

    from .deploy.qat import QATOptions, run_qat

    result = run_qat(QATOptions(**{f.name: getattr(args, f.name) for f in fields(QATOptions)}))
    s, q = result.summary, result.quantized
    print(f"fine-tuned quantization-aware in {result.run_dir} ({s['epochs']} epochs): simulated int8 top-1 "
          f"{s['train_top1']:.2f}%, float32 deploy top-1 {s['deploy_top1']:.2f}%")
    print(f"wrote {', '.join(q.files)} (int8, {q.engine}, method {q.method}, {q.calib_images} calibration images); "
          f"top-1 agreement with float32 on them {q.agreement:.1%}")
    _print_val_top1(args.val, q.top1)


def _cmd_bench(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from .deploy.benchmark import format_table, plot_report, run_benchmark
    from .files import atomic_write

    report = run_benchmark(args.model, tuple(args.img_size), args.batch_sizes, args.rounds, args.images_per_round,
                           args.engines, args.baselines, train=not args.no_train, memory=not args.no_memory,
                           log=lambda msg: print(msg, file=sys.stderr, flush=True), int8=args.int8)
    print(format_table(report))
    atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    print(f"results -> {args.json}")
    if args.plot:
        try:
            plot_report(report, args.plot)
            print(f"chart -> {args.plot}")
        except RepVGGError as e:
            print(f"chart skipped: {e}")


def _defines(command: str | None, name: str) -> bool:
    """Whether to define ``name``'s options: yes for help (``command`` None) and for the command being run. Training
    and evaluation options import torchvision, which other commands (``repvgg list``) should not wait for."""
    return command is None or command == name


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    """``list``, ``info``, ``convert`` and ``demo``: the model and conversion side."""
    p = sub.add_parser("list", help="every architecture with train/deploy parameters and GMACs at 224x224")
    p.add_argument("--num-classes", type=nonneg_int, default=1000, help="classifier outputs (0: none)")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="tell what a checkpoint file holds")
    p.add_argument("checkpoint", help="checkpoint file of any supported layout")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("convert", help="re-parameterize a training-time checkpoint into a deploy checkpoint")
    p.add_argument("src", help="training-time checkpoint (this library's, official or timm format)")
    p.add_argument("dst", type=output_file, help="output file (.pth or .safetensors)")
    p.add_argument("--model", help="architecture, when the file does not say (e.g. repvgg_a0 or RepVGG-A0)")
    p.add_argument("--img-size", type=positive_int, default=64, help="side of the random check batch")
    p.add_argument("--tolerance", type=nonneg_float, default=1e-4,
                   help="largest relative output difference accepted")
    p.add_argument("--headless", action="store_true",
                   help="convert a checkpoint without a classifier (linear.*) as a backbone")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("demo", help="the main job on an embedded default, end to end")
    p.set_defaults(func=_cmd_demo)


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    """``quantize``: post-training int8 quantization with NNCF (OpenVINO) or onnxruntime.quantization."""
    from .deploy.quantize import DEFAULT_CALIB_IMAGES, INT8_ENGINES, METHODS

    p = sub.add_parser("quantize", help="post-training int8 quantization of the deploy model, calibrated on images")
    p.add_argument("checkpoint", help="any checkpoint (training-time ones are re-parameterized first)")
    p.add_argument("--calib", required=True, metavar="DIR", help="calibration images: a folder or archive "
                   "(its train/ split, else val/ or test/, else the class folders themselves)")
    p.add_argument("--out", required=True, type=output_file, help="output file: .xml (openvino, with a .bin beside "
                   "it) or .onnx (onnxruntime); without either suffix, the engine's is appended")
    p.add_argument("--engine", choices=list(INT8_ENGINES), help="default: the one --out's suffix names, else the "
                   "faster int8 engine here (probed once, cached)")
    p.add_argument("--method", help="activation calibration: " + "; ".join(
        f"{e}: {', '.join(m)}" for e, m in METHODS.items()) + " (default: each engine's first)")
    p.add_argument("--calib-images", type=positive_int, default=DEFAULT_CALIB_IMAGES,
                   help="calibration images used at most")
    p.add_argument("--val", metavar="DIR", help="also report float32 vs int8 top-1 on this folder")
    p.add_argument("--model", help="architecture, when the file does not say")
    p.add_argument("--cache-dir", help="where archives are unpacked")
    p.set_defaults(func=_cmd_quantize)


def _add_qat(sub: argparse._SubParsersAction, command: str | None) -> None:
    """``qat``: quantization-aware fine-tuning that ends in an int8 artifact (options defined only when needed:
    they import the training side)."""
    p = sub.add_parser("qat", help="quantization-aware fine-tuning of a trained model, then its int8 artifact")
    p.set_defaults(func=_cmd_qat)
    if not _defines(command, "qat"):
        return
    from .deploy.qat import QAT_LR_FRACTION, QATOptions
    from .deploy.quantize import DEFAULT_CALIB_IMAGES, INT8_ENGINES

    p.add_argument("checkpoint", help="a training-time checkpoint (its recipe, strides and block are reused)")
    p.add_argument("--data", required=True, metavar="DIR", help="folder or archive with train/ and val/ (or test/); "
                   "its train/ split also calibrates the int8 artifact")
    p.add_argument("--out", required=True, type=output_file, help="int8 output file: .xml (openvino) or .onnx "
                   "(onnxruntime); without either suffix, the engine's is appended")
    p.add_argument("--run-dir", help="the fine-tuning run (resumed when run again); default: --out with suffix .qat")
    p.add_argument("--epochs", type=positive_int, default=QATOptions.epochs, help="fine-tuning epochs")
    p.add_argument("--lr", type=positive_float, help="peak learning rate for a global batch of 256 (cosine to 0); "
                   f"default: {QAT_LR_FRACTION:g} x the checkpoint recipe's")
    p.add_argument("--batch-size", type=positive_int, help="default: the checkpoint recipe's")
    p.add_argument("--engine", choices=list(INT8_ENGINES), help="default: the one --out's suffix names, else the "
                   "faster int8 engine here (probed once, cached)")
    p.add_argument("--calib-images", type=positive_int, default=DEFAULT_CALIB_IMAGES,
                   help="calibration images used at most")
    p.add_argument("--val", metavar="DIR", help="also report float32 vs int8 top-1 on this folder")
    p.add_argument("--workers", type=nonneg_int, help="data-loading processes (default: the cores less one)")
    p.add_argument("--threads", type=positive_int, help="PyTorch threads (default: probed)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--cache-dir", help="where archives are unpacked")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    """``bench``: measurements only (acceptance targets are checked by benchmarks/deploy_speed.py)."""
    from .deploy.benchmark import BASELINES, BENCH_ENGINES

    p = sub.add_parser("bench", help="speed and memory of train/deploy forms on each engine vs ResNets, side by side")
    p.add_argument("--model", default="repvgg_a0", help="architecture to time (see `repvgg list`)")
    p.add_argument("--img-size", type=positive_int, nargs=2, default=[224, 224], metavar=("H", "W"),
                   help="input height and width")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 16], help="batch sizes to time")
    p.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds; speeds are medians over them")
    p.add_argument("--images-per-round", type=positive_int, default=8,
                   help="images timed per configuration and batch size")
    p.add_argument("--engines", nargs="+", choices=list(BENCH_ENGINES), default=list(BENCH_ENGINES),
                   help="engines to time the deploy model on")
    p.add_argument("--baselines", nargs="*", default=list(BASELINES), help="torchvision ResNets (random weights)")
    p.add_argument("--no-train", action="store_true", help="leave out the training-time model")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration peak-memory subprocesses")
    p.add_argument("--int8", action="store_true", help="also the int8 model (post-training quantized, random "
                   "calibration) on each ONNX-based engine, beside its float32 row")
    p.add_argument("--json", type=output_file, default="bench.json", help="results file")
    p.add_argument("--plot", type=output_file, default="bench.png", help="chart file ('' for none)")
    p.set_defaults(func=_cmd_bench)


class _CommandParser(argparse.ArgumentParser):
    """A sub-command's parser: its --help shows every option's default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``repvgg`` parser; given the sub-command about to run, only its own heavy options are defined."""
    parser = argparse.ArgumentParser(prog="repvgg", description="RepVGG: train the multi-branch network, convert it "
                                     "exactly into a plain stack of 3x3 convs, deploy it fast.")
    parser.add_argument("--version", action="version", version=f"repvgg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)

    _add_model_commands(sub)

    p = sub.add_parser("train", help="train on image folders (one process, or many with torchrun)")
    if _defines(command, "train"):
        from .training import options

        options.add_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5, loss and speed of a checkpoint on an image folder")
    if _defines(command, "eval"):
        from .training import evaluate

        evaluate.add_arguments(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("plot", help="draw a training run's loss, top-1 and lr curves to a PNG")
    p.add_argument("run_dir", help="a `repvgg train` output directory")
    p.add_argument("--out", type=output_file, help="image file (default RUN_DIR/curves.png)")
    p.set_defaults(func=_cmd_plot)

    from .deploy.engines import ENGINES
    from .deploy.export import FORMATS

    p = sub.add_parser("export", help="export the deploy model to ONNX, TorchScript or OpenVINO, verified")
    p.add_argument("checkpoint", nargs="?", help="any checkpoint (training-time ones are re-parameterized first)")
    p.add_argument("--pretrained", metavar="WEIGHTS", help=PRETRAINED_HELP + "; instead of CHECKPOINT")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="file format to write")
    p.add_argument("--out", required=True, type=output_file,
                   help="output file (.onnx, .pt, or .xml with a .bin beside it)")
    p.add_argument("--img-size", type=positive_int, nargs=2, metavar=("H", "W"),
                   help="input size (default: the checkpoint's preprocessing crop, else 224 224)")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: batch 1)")
    p.add_argument("--model", help="architecture, when the file does not say")
    p.add_argument("--tolerance", type=nonneg_float, default=1e-4,
                   help="largest output difference, relative to its scale")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("predict", help="top-5 classes of images, with the checkpoint's class names and preprocessing")
    p.add_argument("checkpoint", help="checkpoint, or exported .onnx/.xml/TorchScript file (with --pretrained: the "
                   "first image)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files to classify")
    p.add_argument("--pretrained", metavar="WEIGHTS", help=PRETRAINED_HELP + "; instead of CHECKPOINT")
    p.add_argument("--engine", choices=list(ENGINES), help="default: the fastest one here (probed once, cached)")
    p.add_argument("--top", type=positive_int, default=5, help="classes shown per image")
    p.add_argument("--model", help="architecture, when the file does not say")
    p.set_defaults(func=_cmd_predict)

    _add_quantize(sub)
    _add_qat(sub, command)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command; returns the exit code (2 for bad input; 128 + the signal when interrupted, as shells
    report it: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv and not argv[0].startswith("-") else None).parse_args(argv)
    try:
        args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (`repvgg list | head`): stop quietly, and keep Python's exit-time flush from failing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (RepVGGError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"repvgg: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:
        print("repvgg: interrupted", file=sys.stderr)
        return 128 + (e.signum if isinstance(e, Interrupted) else signal.SIGINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
