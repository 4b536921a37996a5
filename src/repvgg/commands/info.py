"""``repvgg info``: what a checkpoint, or an exported .onnx/.xml/TorchScript file, holds."""

from __future__ import annotations

import argparse

from ..files import Outputs

WRITES = False


def inputs(args: argparse.Namespace) -> list[str]:
    return [args.checkpoint]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint file of any supported layout, or an exported model file")


def run(args: argparse.Namespace, outputs: Outputs) -> None:
    from ..deploy.artifacts import describe_artifact
    from ..models.checkpoints import describe_checkpoint

    description = describe_artifact(args.checkpoint) or describe_checkpoint(args.checkpoint)
    for key, value in description.items():
        if isinstance(value, list) and len(value) > 12:
            value = f"{value[:12]} ... ({len(value)} items)"
        print(f"{key:>16}: {value}")
