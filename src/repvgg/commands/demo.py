"""``repvgg demo``: the main job on an embedded default, end to end: pre-train RepVGG-A0 on scikit-learn's digits,
fine-tune it, convert it, evaluate both forms re-loaded from disk, then time both forms at 224x224."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from ..files import Outputs

WRITES = False  # it trains in a temporary folder, removed at the end

EPOCHS = 8
TIMING_MODEL, TIMING_SIZE, TIMING_BATCH = "repvgg_a0", 224, 8


def inputs(args: argparse.Namespace) -> list[str]:
    return []


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo takes no options."""


def compare_forms(name: str = TIMING_MODEL, img_size: int = TIMING_SIZE, batch_size: int = TIMING_BATCH
                  ) -> list[dict[str, Any]]:
    """Build ``name``, convert it, check outputs agree, and measure both forms side by side."""
    import torch

    from ..hardware import measure_throughput
    from ..models.factory import create_model
    from ..models.profile import count_macs, count_params
    from ..models.reparam import randomize_bn, relative_difference, reparameterize

    torch.manual_seed(0)
    train = create_model(name).eval()
    randomize_bn(train)
    deploy = reparameterize(train)
    x = torch.randn(batch_size, 3, img_size, img_size)
    with torch.no_grad():
        err = relative_difference(train(x), deploy(x))
    speed = measure_throughput({"train": lambda: train(x), "deploy": lambda: deploy(x)}, batch_size, rounds=3)
    rows = [dict(form=form, name=train.config.official_name, params_m=count_params(model) / 1e6,
                 gmacs=count_macs(model, (img_size, img_size)) / 1e9, **speed[form])
            for form, model in (("train", train), ("deploy", deploy))]
    rows[1]["max_rel_diff"] = err
    return rows


def _train_in_temporary_folder(epochs: int) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Pre-train on digits 0-4, fine-tune on all ten from that checkpoint, in a folder removed afterwards;
    evaluate both forms of the fine-tuned model re-loaded from disk. The run's lines about files are not shown:
    nothing in that folder outlives the demo (not even on interruption)."""
    from ..training.digits import evaluate_digits, train_digits

    with tempfile.TemporaryDirectory(prefix="repvgg-demo-") as tmp:
        def log(message: str) -> None:
            if not message.startswith("  ") and tmp not in message:
                print(message)

        try:
            print("Pre-training RepVGG-A0 on scikit-learn's handwritten digits 0-4 (8x8) ...")
            pre = train_digits(Path(tmp) / "pre", max(1, epochs - epochs // 2), log=log, classes=5)
            print("\nFine-tuning it on all ten digits (1437 train / 360 test): new classifier, stem frozen, "
                  "backbone at 0.3x the learning rate ...")
            summary = train_digits(Path(tmp) / "tuned", epochs // 2 or 1, log=log, pretrained=pre["checkpoint"],
                                   freeze_stages=1, backbone_lr_scale=0.3)
        except KeyboardInterrupt:
            print("demo interrupted: it keeps no files (it trains in a temporary folder, now removed)")
            raise
        rows = {form: evaluate_digits(Path(tmp) / "tuned" / name)
                for form, name in (("train", "model.pth"), ("deploy", "model_deploy.pth"))}
    return summary, rows


def _print_digits(summary: dict[str, Any], rows: dict[str, dict[str, float]]) -> None:
    print(f"\nDigits test set after {summary['epochs']} epochs of fine-tuning, {summary['wall_time_s']:.0f}s "
          f"(checkpoints re-loaded from disk)")
    print(f"{'form':<8}{'params':>10}{'top-1':>9}{'images/s':>10}")
    for form, r in rows.items():
        print(f"{form:<8}{r['params_m']:>9.2f}M{r['top1']:>8.2f}%{r['images_per_s']:>10.0f}")
    print(f"top-1 difference train vs deploy: {abs(rows['train']['top1'] - rows['deploy']['top1']):.2f} points\n")


def run(args: argparse.Namespace, outputs: Outputs) -> None:
    import torch

    start = time.perf_counter()
    threads = torch.get_num_threads()
    # 8x8 inputs are too small to split across cores: one thread is as fast, and unharmed by other busy processes
    torch.set_num_threads(1)
    try:
        summary, rows = _train_in_temporary_folder(EPOCHS)
    finally:
        torch.set_num_threads(threads)
    _print_digits(summary, rows)
    print(f"Timing both forms of {TIMING_MODEL} at {TIMING_SIZE}x{TIMING_SIZE}, batch {TIMING_BATCH}, float32 "
          f"(random weights; about a minute on 2 cores) ...", flush=True)
    timed = compare_forms()
    print(f"{'form':<8}{'params':>10}{'GMACs':>8}{'images/s':>10}{'ms/batch':>10}")
    for r in timed:
        print(f"{r['form']:<8}{r['params_m']:>9.2f}M{r['gmacs']:>8.2f}{r['images_per_s']:>10.1f}"
              f"{r['latency_ms']:>10.1f}")
    print(f"deploy vs train: {timed[1]['images_per_s'] / timed[0]['images_per_s']:.2f}x faster, "
          f"max relative output difference {timed[1]['max_rel_diff']:.1e}")
    print(f"demo finished in {time.perf_counter() - start:.0f}s")
