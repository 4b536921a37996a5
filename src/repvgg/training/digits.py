"""scikit-learn's 8x8 handwritten digits as a tiny image-classification task that needs no files: what the demo
trains on, in seconds, on any CPU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import RepVGGError
from ..models.checkpoints import model_from_checkpoint
from ..models.profile import count_params
from .data import collate
from .evaluate import evaluate

__all__ = ["DIGITS_PREPROCESS", "TensorImages", "digits_datasets", "train_digits", "evaluate_digits"]

DIGITS_PREPROCESS = {"resize": 8, "crop": 8, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


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
    from .options import TrainOptions
    from .recipes import recipe_with
    from .train import train

    train_set, test_set, names = digits_datasets(classes=classes)
    recipe = recipe_with("cifar", epochs=epochs, batch_size=32, lr=0.1, img_size=8, eval_resize=8,
                         warmup_epochs=1, cutout=0, strides=(1, 2, 2, 2, 2))  # an 8-pixel Cutout would erase a digit
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
