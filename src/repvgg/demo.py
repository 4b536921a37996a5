"""``repvgg demo``: the main job on an embedded default, end to end, with a small results table."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .errors import RepVGGError
from .hardware import measure_throughput
from .models.checkpoints import model_from_checkpoint
from .models.factory import create_model
from .models.profile import count_macs, count_params
from .models.reparam import is_batchnorm, relative_difference, reparameterize
from .training.data import collate
from .training.evaluate import evaluate

DIGITS_PREPROCESS = {"resize": 8, "crop": 8, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def randomize_bn(model: torch.nn.Module, generator: torch.Generator | None = None) -> None:
    """Give every BatchNorm non-trivial statistics and affine weights, as a trained network would have."""
    with torch.no_grad():
        for m in model.modules():
            if is_batchnorm(m):
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
        err = relative_difference(train(x), deploy(x))
    speed = measure_throughput({"train": lambda: train(x), "deploy": lambda: deploy(x)}, batch_size, rounds=3)
    rows = []
    for form, model in (("train", train), ("deploy", deploy)):
        rows.append(dict(form=form, name=train.config.official_name, params_m=count_params(model) / 1e6,
                         gmacs=count_macs(model, (img_size, img_size)) / 1e9, **speed[form]))
    rows[1]["max_rel_diff"] = err
    return rows


class TensorImages(Dataset):
    """Images held as one ``N x C x H x W`` tensor."""

    def __init__(self, images: Tensor, targets: Tensor) -> None:
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.targets[index])


def digits_datasets(seed: int = 0, classes: int = 10) -> tuple[TensorImages, TensorImages, list[str]]:
    """scikit-learn's 8x8 handwritten digits 0..classes-1 (shipped with the package), as normalized 3-channel
    tensors, split 80/20 per class (no augmentation: shifting an 8x8 digit by a pixel measured worse)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise RepVGGError("the demo trains on scikit-learn's digits: pip install 'repvgg[demo]'") from None
    digits = load_digits()
    keep = digits.target < classes
    images = torch.tensor(digits.images[keep], dtype=torch.float32).div(16).sub(0.5).div(0.5)
    images = images[:, None].expand(-1, 3, -1, -1).contiguous()
    targets = torch.tensor(digits.target[keep])
    train_idx, test_idx = train_test_split(range(len(targets)), test_size=0.2, stratify=digits.target[keep],
                                           random_state=seed)
    return (TensorImages(images[train_idx], targets[train_idx]),
            TensorImages(images[test_idx], targets[test_idx]), [str(d) for d in range(classes)])


def train_digits(out_dir: str | Path, epochs: int = 8, log: Callable[[str], None] = print, classes: int = 10,
                 **options: Any) -> dict[str, Any]:
    """Train RepVGG-A0 (strides for 8x8 inputs) on digits 0..classes-1 with the ``cifar`` recipe; ``options``
    go to :class:`~repvgg.training.options.TrainOptions` (e.g. ``pretrained``, ``freeze_stages``)."""
    from .training.options import TrainOptions
    from .training.recipes import recipe_with
    from .training.train import train

    train_set, test_set, names = digits_datasets(classes=classes)
    recipe = recipe_with("cifar", epochs=epochs, batch_size=32, lr=0.1, img_size=8, eval_resize=8,
                         warmup_epochs=1, strides=(1, 2, 2, 2, 2))
    opts = TrainOptions(data=None, out_dir=str(out_dir), recipe=recipe, workers=0, amp="none", channels_last=False,
                        probe=False, tensorboard=False, log=log, **options)
    return train(opts, train_set, test_set, names, preprocess=DIGITS_PREPROCESS)


def evaluate_digits(checkpoint: str | Path) -> dict[str, float]:
    """Re-load a digits checkpoint from disk and measure its test top-1 and images/s."""
    model, _ = model_from_checkpoint(checkpoint)
    _, test_set, _ = digits_datasets()
    loader = DataLoader(test_set, batch_size=128, collate_fn=collate)
    result = evaluate(model, loader, torch.device("cpu"), 10)
    return dict(params_m=count_params(model) / 1e6, top1=result.top1, images_per_s=result.images_per_s)


@dataclass(frozen=True)
class DemoOptions:
    """What ``repvgg demo`` runs: digits training epochs, then the model, input side and batch of the timing."""

    epochs: int = 8
    model: str = "repvgg_a0"
    img_size: int = 224
    batch_size: int = 8


def _train_in_temporary_folder(epochs: int) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Pre-train on digits 0-4, fine-tune on all ten from that checkpoint, in a folder removed afterwards;
    evaluate both forms of the fine-tuned model re-loaded from disk.

    Messages naming that folder are not shown, as nothing in it outlives the demo (not even on interruption).
    """
    with tempfile.TemporaryDirectory(prefix="repvgg-demo-") as tmp:
        def log(message: str) -> None:
            if not message.startswith("  "):
                print(message.replace(tmp, "<demo folder>"))

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


def run_demo(opts: DemoOptions = DemoOptions()) -> None:
    """Train on the digits, convert, evaluate both forms; then time both forms of A0 at 224x224."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    # 8x8 inputs are too small to split across cores: one thread is as fast, and unharmed by other busy processes
    torch.set_num_threads(1)
    try:
        summary, rows = _train_in_temporary_folder(opts.epochs)
    finally:
        torch.set_num_threads(threads)
    print(f"\nDigits test set after {summary['epochs']} epochs of fine-tuning, {summary['wall_time_s']:.0f}s "
          f"(checkpoints re-loaded from disk)")
    print(f"{'form':<8}{'params':>10}{'top-1':>9}{'images/s':>10}")
    for form, r in rows.items():
        print(f"{form:<8}{r['params_m']:>9.2f}M{r['top1']:>8.2f}%{r['images_per_s']:>10.0f}")
    print(f"top-1 difference train vs deploy: {abs(rows['train']['top1'] - rows['deploy']['top1']):.2f} points\n")
    rows = compare_forms(opts.model, opts.img_size, opts.batch_size)
    print(f"{rows[0]['name']}, {opts.img_size}x{opts.img_size}, batch {opts.batch_size}, float32 on CPU")
    print(f"{'form':<8}{'params':>10}{'GMACs':>8}{'images/s':>10}{'ms/batch':>10}")
    for r in rows:
        print(f"{r['form']:<8}{r['params_m']:>9.2f}M{r['gmacs']:>8.2f}{r['images_per_s']:>10.1f}{r['latency_ms']:>10.1f}")
    print(f"deploy vs train: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}x faster, "
          f"max relative output difference {rows[1]['max_rel_diff']:.1e}")
    print(f"demo finished in {time.perf_counter() - start:.0f}s")
