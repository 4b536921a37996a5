"""``repvgg list``: every architecture with its parameters, MACs, published top-1 and where its weights are."""

from __future__ import annotations

import argparse

from ..files import Outputs
from .args import nonneg_int

WRITES = False


def inputs(args: argparse.Namespace) -> list[str]:
    return []


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-classes", type=nonneg_int, default=1000, help="classifier outputs (0: none)")


def run(args: argparse.Namespace, outputs: Outputs) -> None:
    from ..models.architectures import MODEL_CONFIGS
    from ..models.pretrained import PUBLISHED
    from ..models.profile import architecture_stats

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
