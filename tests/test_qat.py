"""Quantization-aware training: fake-quantized blocks run their int8 deploy conv while every branch trains, keep the
plain model's checkpoints, and ``repvgg qat`` fine-tunes a trained model into an int8 artifact with each engine."""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from imagefolders import TINY_ARCH, make_dataset
from repvgg import create_model, reparameterize, save_checkpoint
from repvgg.cli import main
from repvgg.deploy.artifacts import read_artifact_metadata
from repvgg.deploy.engines import INT8_ENGINES, INT8_SUFFIXES
from repvgg.deploy.qat import QAT_LR_FRACTION, qat_recipe
from repvgg.deploy.quantize import int8_engines_installed
from repvgg.models.checkpoints import read_checkpoint
from repvgg.models.fakequant import ActivationFakeQuant, FakeQuantBlock, fake_quant_weight, is_qat, prepare_qat
from repvgg.training.recipes import RECIPES, recipe_with

pytestmark = pytest.mark.usefixtures("one_thread")
PREPROCESS = {"resize": 16, "crop": 16, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
ENGINES = [pytest.param(e, marks=pytest.mark.skipif(e not in int8_engines_installed(), reason=f"{e} int8 missing"))
           for e in INT8_ENGINES]


def test_fake_quant_weight_is_per_channel_symmetric_int8() -> None:
    kernel = (torch.randn(8, 4, 3, 3) * torch.arange(1, 9).view(8, 1, 1, 1)).requires_grad_()
    rounded = fake_quant_weight(kernel)
    scale = kernel.detach().abs().amax((1, 2, 3), keepdim=True) / 127
    levels = rounded.detach() / scale
    assert torch.allclose(levels, levels.round(), atol=1e-3) and levels.abs().max() <= 127 + 1e-3
    assert (rounded - kernel).abs().le(scale / 2 + 1e-6).all()
    rounded.sum().backward()
    assert torch.equal(kernel.grad, torch.ones_like(kernel))  # straight through


def test_activation_ranges_are_learned_in_training_and_not_saved() -> None:
    quant = ActivationFakeQuant()
    x = torch.rand(2, 3, 4, 4) * 6
    assert torch.equal(quant.eval()(x), x)  # no range seen yet
    out = quant.train()(x)
    assert out.unique().numel() <= 256 and (out - x).abs().max() <= 6 / 255
    assert quant.state_dict() == {}


@pytest.mark.parametrize("block", ["repvgg", "qarepvgg"])
def test_fake_quant_blocks_run_the_int8_conv_and_train_every_branch(block: str) -> None:
    torch.manual_seed(0)
    model = create_model("repvgg_a0", num_classes=3, strides=(2, 2, 2, 2, 2), block=block)
    qat = prepare_qat(copy.deepcopy(model)).train()
    assert is_qat(qat) and not is_qat(model) and list(qat.state_dict()) == list(model.state_dict())
    stats = qat.stage1[1].rbr_dense.bn.running_mean.clone()
    x = torch.randn(4, 3, 32, 32)
    qat(x).sum().backward()
    b = qat.stage1[1]
    assert isinstance(b, FakeQuantBlock) and b.rbr_identity is not None
    grads = [b.rbr_dense.conv.weight.grad, b.rbr_1x1.weight.grad if block == "qarepvgg" else b.rbr_1x1.conv.weight.grad,
             b.bn.weight.grad if block == "qarepvgg" else b.rbr_identity.weight.grad]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert torch.equal(b.rbr_dense.bn.running_mean, stats)  # BN statistics frozen, as in the deploy conv
    feature = torch.rand(2, b.in_channels, 8, 8)
    kernel, bias = b.equivalent_kernel_bias()
    expected = F.relu(F.conv2d(b.input_quant(feature), fake_quant_weight(kernel), bias, 1, 1))
    assert torch.allclose(b.eval()(feature), expected)
    plain, converted = reparameterize(model), reparameterize(qat)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in converted.state_dict().items())


def test_qat_fine_tunes_with_the_values_the_model_was_trained_with(tmp_path: Path) -> None:
    """The trained recipe's values (a file that predates them: its recipe's registered ones), with no warm-up, EMA,
    mixup or cutmix and a fraction of the learning rate."""
    model = create_model(TINY_ARCH, num_classes=3, strides=(2, 2, 2, 2, 2))
    trained = recipe_with("cifar", lr=0.04, label_smoothing=0.15, weight_decay=1e-3, batch_size=64, ema_decay=0.99,
                          mixup=0.2, warmup_epochs=1)
    save_checkpoint(model, tmp_path / "new.pth", preprocess=PREPROCESS, recipe="cifar", recipe_values=asdict(trained))
    save_checkpoint(model, tmp_path / "old.pth", preprocess=PREPROCESS, recipe="cifar")
    tuned = qat_recipe(read_checkpoint(str(tmp_path / "new.pth")), epochs=2)
    assert tuned.lr == pytest.approx(0.04 * QAT_LR_FRACTION) and tuned.batch_size == 64 and tuned.epochs == 2
    assert (tuned.label_smoothing, tuned.weight_decay) == (0.15, 1e-3)
    assert (tuned.ema_decay, tuned.mixup, tuned.warmup_epochs) == (0, 0, 0)
    assert tuned.strides == (2, 2, 2, 2, 2) and tuned.img_size == tuned.eval_resize == 16
    older = qat_recipe(read_checkpoint(str(tmp_path / "old.pth")), epochs=2, lr=0.01, batch_size=32)
    assert (older.lr, older.batch_size, older.label_smoothing) == (0.01, 32, RECIPES["cifar"].label_smoothing)


@pytest.mark.parametrize("engine", ENGINES)
def test_qat_command_fine_tunes_into_an_int8_artifact(engine: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    data = make_dataset(tmp_path / "data", train=8, val=4)
    model = create_model(TINY_ARCH, num_classes=3, strides=(2, 2, 2, 2, 2))
    save_checkpoint(model.eval(), tmp_path / "a0.pth", class_names=["class0", "class1", "class2"],
                    preprocess=PREPROCESS, recipe="cifar")
    out = tmp_path / f"a0_int8{INT8_SUFFIXES[engine]}"
    argv = ["qat", str(tmp_path / "a0.pth"), "--data", str(data), "--out", str(out), "--epochs", "1",
            "--batch-size", "8", "--workers", "0", "--threads", "1", "--no-channels-last", "--calib-images", "8",
            "--val", str(data)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "simulated int8 top-1" in printed and "top-1 on" in printed
    run = out.with_suffix(".qat")
    assert (run / "model.pth").is_file() and (run / "model_deploy.pth").is_file()
    meta = read_artifact_metadata(str(out), "openvino" if engine == "openvino" else "onnx")
    assert meta["precision"] == "int8" and meta["quantization"]["method"] == "minmax"
    assert meta["class_names"] == ["class0", "class1", "class2"]
    assert main(argv) == 2  # run again: the artifact exists, so it is kept unless --overwrite says otherwise
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0  # the finished fine-tune is reused, the artifact rewritten
    assert "already complete" in capsys.readouterr().out
