"""The demo's embedded data set: scikit-learn's digits as normalized 3-channel tensors, split per class."""

from __future__ import annotations

import pytest
import torch

from repvgg.demo import digits_datasets


def test_digits_datasets() -> None:
    pytest.importorskip("sklearn")
    train, test, classes = digits_datasets()
    assert (len(train), len(test), classes) == (1437, 360, [str(d) for d in range(10)])
    image, target = train[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and 0 <= target < 10
    assert test.images.min() >= -1 and test.images.max() <= 1
    assert torch.bincount(test.targets).min() >= 35  # stratified
