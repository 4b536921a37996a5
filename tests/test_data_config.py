"""timm's data-config habit: ``resolve_data_config`` tells what a model, checkpoint, exported file or metadata expects
its images to be, and ``create_transform`` turns that into the evaluation transform the commands use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import repvgg
from repvgg import RepVGGError, create_model, create_transform, resolve_data_config, save_checkpoint
from repvgg.models.preprocess import IMAGENET_PREPROCESS, eval_transform

CIFAR = {"resize": 36, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "a0.pth"
    save_checkpoint(create_model("repvgg_a0", num_classes=3), path, preprocess=CIFAR)
    return path


def test_every_source_resolves_to_its_preprocessing(ckpt: Path) -> None:
    model, checkpoint = repvgg.model_from_checkpoint(ckpt)
    pretrained = create_model("repvgg_a0", num_classes=3, pretrained=str(ckpt))
    for source in (model, checkpoint, checkpoint.metadata, pretrained, repvgg.reparameterize(model), CIFAR):
        assert resolve_data_config(source) == CIFAR, type(source)
    for source in (None, {}, {"architecture": "repvgg_a0"}, create_model("repvgg_a0")):
        assert resolve_data_config(source) == IMAGENET_PREPROCESS
    assert resolve_data_config({"crop": 320})["crop"] == 320  # settings themselves; the defaults fill the rest


def test_create_transform_is_the_commands_eval_transform(ckpt: Path) -> None:
    image = Image.new("RGB", (70, 50), (200, 40, 90))
    config = resolve_data_config(repvgg.model_from_checkpoint(ckpt)[0])
    expected = eval_transform(CIFAR)(image)
    for transform in (create_transform(config), create_transform(**config)):
        assert torch.equal(transform(image), expected)
    assert create_transform(config)(image).shape == (3, 32, 32)
    bigger = create_transform(config, crop=64)  # a crop alone resizes by the crop rule (64 / 0.875 = 73)
    assert torch.equal(bigger(image), eval_transform({**CIFAR, "crop": 64, "resize": 73})(image))


def test_what_does_not_exist_is_refused() -> None:
    with pytest.raises(RepVGGError, match="create_transform takes resize, crop, mean, std, not is_training"):
        create_transform(is_training=True)
    with pytest.raises(RepVGGError, match=r"not str: read the file first \(repvgg.read_checkpoint"):
        resolve_data_config("a0.pth")
    with pytest.raises(RepVGGError, match="preprocess 'crop' must be a positive integer"):
        resolve_data_config({"preprocess": {"crop": -1}})
