"""``repvgg demo``: the main job on an embedded default, end to end, with a small results table."""

from __future__ import annotations

import argparse

import torch

from .architectures import create_model
from .benchmark import measure_throughput
from .profile import count_macs, count_params
from .reparam import reparameterize


def randomize_bn(model: torch.nn.Module, generator: torch.Generator | None = None) -> None:
    """Give every BatchNorm non-trivial statistics and affine weights, as a trained network would have."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.5)


def compare_forms(name: str = "repvgg_a0", img_size: int = 224, batch_size: int = 8) -> list[dict]:
    """Build ``name``, convert it, check outputs agree, and measure both forms side by side."""
    torch.manual_seed(0)
    train = create_model(name).eval()
    randomize_bn(train)
    deploy = reparameterize(train)
    x = torch.randn(batch_size, 3, img_size, img_size)
    with torch.no_grad():
        err = ((train(x) - deploy(x)).abs().max() / train(x).abs().max()).item()
    speed = measure_throughput({"train": lambda: train(x), "deploy": lambda: deploy(x)}, batch_size, rounds=3)
    rows = []
    for form, model in (("train", train), ("deploy", deploy)):
        rows.append(dict(form=form, params_m=count_params(model) / 1e6,
                         gmacs=count_macs(model, (img_size, img_size)) / 1e9, **speed[form]))
    rows[1]["max_rel_diff"] = err
    return rows


def run_demo(args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = compare_forms()
    print("RepVGG-A0, 224x224, batch 8, float32 on CPU")
    print(f"{'form':<8}{'params':>10}{'GMACs':>8}{'images/s':>10}{'ms/batch':>10}")
    for r in rows:
        print(f"{r['form']:<8}{r['params_m']:>9.2f}M{r['gmacs']:>8.2f}{r['images_per_s']:>10.1f}{r['latency_ms']:>10.1f}")
    print(f"deploy vs train: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}x faster, "
          f"max relative output difference {rows[1]['max_rel_diff']:.1e}")
