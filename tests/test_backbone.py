"""RepVGG as a backbone: output stride 8/16/32 with dilated 3x3 convs (exact conversion, real reductions, the same
weights at every output stride, checkpoints), and whole networks holding RepVGG blocks through every tool of the
library (convert, compare, export, quantize, QAT, engines) and through timm's re-parameterization convention."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import trained_looking
from repvgg import (
    RepVGG,
    RepVGGBlock,
    RepVGGConfig,
    RepVGGError,
    create_model,
    load_checkpoint,
    model_from_checkpoint,
    output_difference,
    relative_difference,
    reparameterize,
    save_checkpoint,
)
from repvgg.deploy.artifacts import read_artifact_metadata
from repvgg.deploy.engines import available_engines, create_engine, load_artifact
from repvgg.deploy.export import export_model
from repvgg.deploy.quantize import int8_engine, int8_engines_installed, quantize_model
from repvgg.models.checkpoints import read_checkpoint
from repvgg.models.fakequant import FakeQuantBlock, prepare_qat
from repvgg.models.profile import architecture_stats, count_macs, count_params
from repvgg.models.reparam import is_deploy

pytestmark = pytest.mark.usefixtures("one_thread")
FAST_ENGINES = [e for e in ("torch", "onnxruntime") if e in available_engines()]
CLASS_NAMES = ["road", "car", "sky"]
OUTPUT_STRIDES = (8, 16, 32)
# small stand-ins for each family: A and B depth patterns, grouped layers (B1g4), SE before (D2se) and after the
# ReLU (L2pse, auxiliary heads included); a stage4 of two blocks reaches dilation 4 at output stride 8
FAMILIES = {
    "A": RepVGGConfig("tiny-A", (1, 2, 3, 1), (0.125, 0.125, 0.125, 0.125)),
    "B": RepVGGConfig("tiny-B", (2, 2, 3, 2), (0.25, 0.25, 0.25, 0.125)),
    "grouped": RepVGGConfig("tiny-B-g4", (2, 2, 3, 2), (0.25, 0.25, 0.25, 0.125), groups=4),
    "SE": RepVGGConfig("tiny-D-se", (2, 2, 3, 1), (0.25, 0.25, 0.25, 0.125), se="pre", se_reduction=4),
    "SE-post": RepVGGConfig("tiny-L-pse", (2, 2, 3, 1), (0.25, 0.25, 0.25, 0.125), se="post", se_reduction=4,
                            aux_heads=True),
}
# stage4 takes stage3's channels (32 -> 32): dilating it must not give its first block an identity branch
SAME_WIDTH = RepVGGConfig("same-width", (1, 1, 2, 2), (0.125, 0.125, 0.125, 0.0625))


def assert_exact(model: nn.Module, x: torch.Tensor, float64: bool = True) -> None:
    """Conversion within 1e-5 of the output scale in float32 and (with ``float64``) 1e-10 in float64 (``model`` then
    ends in float64)."""
    assert output_difference(model, x) < 1e-5
    if float64:
        assert output_difference(model.double(), x.double()) < 1e-10


def stage_outputs(model: RepVGG, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model._forward_stages(x)[0]


@pytest.mark.parametrize("output_stride", OUTPUT_STRIDES)
@pytest.mark.parametrize("family", FAMILIES)
def test_conversion_is_exact_at_every_output_stride(family: str, output_stride: int) -> None:
    model = trained_looking(RepVGG(FAMILIES[family], num_classes=7, output_stride=output_stride))
    dilations = {b.dilation for b in model.modules() if isinstance(b, RepVGGBlock)}
    one_block_stage4 = FAMILIES[family].depths[3] == 1  # its block keeps stage3's dilation
    assert max(dilations) == {8: (4, 2), 16: (2, 1), 32: (1, 1)}[output_stride][one_block_stage4]
    assert_exact(model, torch.randn(1, 3, 64, 48))
    qa = trained_looking(RepVGG(FAMILIES[family], num_classes=7, output_stride=output_stride, block="qarepvgg"))
    assert_exact(qa, torch.randn(1, 3, 64, 48))


@pytest.mark.parametrize("name", ["repvgg_a0", "repvgg_b0", "repvgg_b1g4", "repvgg_d2se"])
def test_registered_models_convert_exactly_when_dilated(name: str) -> None:
    """float64 too, except for the 133M-parameter D2se (its SE blocks are checked in float64 at every output stride
    above)."""
    model = trained_looking(create_model(name, num_classes=5, output_stride=8, out_indices=(3, 4)))
    assert {b.dilation for b in model.modules() if isinstance(b, RepVGGBlock)} == {1, 2}  # stage4: one block
    assert_exact(model, torch.randn(1, 3, 48, 40), float64=name != "repvgg_d2se")


@pytest.mark.parametrize("output_stride", OUTPUT_STRIDES)
def test_feature_info_reports_the_real_reductions(output_stride: int) -> None:
    model = create_model("repvgg_a0", out_indices=(0, 1, 2, 3, 4), output_stride=output_stride).eval()
    reductions = [info["reduction"] for info in model.feature_info]
    assert reductions == [min(r, output_stride) for r in (2, 4, 8, 16, 32)]
    features = model(torch.randn(1, 3, 64, 96))
    assert [f.shape[-2:] for f in features] == [(64 // r, 96 // r) for r in reductions]
    assert [f.shape[1] for f in features] == [info["num_chs"] for info in model.feature_info]


def test_a_backbone_runs_no_stage_after_its_last_output() -> None:
    model = create_model("repvgg_a0", out_indices=(1, 3), output_stride=16).eval()
    ran = []
    for i, stage in enumerate(model.stages):
        stage.register_forward_hook(lambda *_, i=i: ran.append(i))
    features = model(torch.randn(1, 3, 64, 64))
    assert ran == [0, 1, 2, 3] and [f.shape[1:] for f in features] == [(48, 16, 16), (192, 4, 4)]


def test_dilation_follows_the_dilated_resnet_convention() -> None:
    """A stage made stride 1 keeps the previous dilation in its first block and doubles it in the later ones; its
    3x3 convs are padded by their dilation, the 1x1 and identity branches are unchanged."""
    model = create_model("repvgg_b0", output_stride=8)
    stage3, stage4 = list(model.stage3), list(model.stage4)
    assert [(b.stride, b.dilation) for b in stage3[:2]] == [(1, 1), (1, 2)]
    assert [(b.stride, b.dilation) for b in stage4] == [(1, 2)]
    for block in stage3[1:]:
        conv = block.rbr_dense.conv
        assert (conv.dilation, conv.padding, conv.stride) == ((2, 2), (2, 2), (1, 1))
        assert block.rbr_1x1.conv.dilation == (1, 1) and block.rbr_identity is not None
    fused = reparameterize(model).stage3[1].rbr_reparam
    assert (fused.dilation, fused.padding, fused.kernel_size) == ((2, 2), (2, 2), (3, 3))
    strided = create_model("repvgg_b0", output_stride=16)
    assert [(b.stride, b.dilation) for b in strided.stage3[:2]] == [(2, 1), (1, 1)]


def test_a_dilated_network_computes_the_strided_one_densely() -> None:
    """Same weights, output stride 8: every stage's map, sampled at the strided network's positions, is the
    output-stride-32 map (the a-trous identity); so the first block of a stage made stride 1 must keep the previous
    dilation, the later ones take the new one."""
    strided = trained_looking(create_model("repvgg_a0", num_classes=0))
    dense = create_model("repvgg_a0", num_classes=0, output_stride=8).eval()
    load_checkpoint(dense, strided.state_dict())
    x = torch.randn(1, 3, 70, 52)
    coarse, fine = stage_outputs(strided, x), stage_outputs(dense, x)
    for stage, step in ((2, 1), (3, 2), (4, 4)):
        assert relative_difference(coarse[stage], fine[stage][..., ::step, ::step]) < 1e-5


def test_same_weights_at_every_output_stride() -> None:
    """No identity branch appears where a stride-2 block was made stride 1, even when its channels match, so
    weights trained at one output stride load strictly into every other."""
    keys = {}
    for output_stride in OUTPUT_STRIDES:
        model = trained_looking(RepVGG(SAME_WIDTH, num_classes=3, output_stride=output_stride))
        keys[output_stride] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert model.stage4[0].rbr_identity is None and model.stage4[1].rbr_identity is not None
    assert keys[8] == keys[16] == keys[32]
    stats = {os_: architecture_stats(SAME_WIDTH, 3, (64, 64), output_stride=os_) for os_ in OUTPUT_STRIDES}
    for os_, s in stats.items():
        model = RepVGG(SAME_WIDTH, num_classes=3, output_stride=os_)
        assert s.train_params == count_params(model)
        assert s.macs == count_macs(reparameterize(model), (64, 64))
    assert stats[8].macs > stats[16].macs > stats[32].macs


def test_timm_dilated_repvgg_gives_the_same_features() -> None:
    timm = pytest.importorskip("timm")
    x = torch.randn(1, 3, 64, 48)
    for output_stride in (8, 16):
        theirs = trained_looking(timm.create_model("repvgg_a0", num_classes=4, output_stride=output_stride))
        ours = create_model("repvgg_a0", num_classes=4, output_stride=output_stride).eval()
        load_checkpoint(ours, theirs.state_dict())
        assert [i["reduction"] for i in ours.feature_info] == [i["reduction"] for i in theirs.feature_info]
        with torch.no_grad():
            assert relative_difference(theirs(x), ours(x)) < 1e-6


@pytest.mark.parametrize("value", [4, 64, 0, 16.0, "16", True, None])
def test_output_stride_is_validated(value: object) -> None:
    with pytest.raises(RepVGGError, match=r"^output_stride must be one of 8, 16, 32, got"):
        create_model("repvgg_a0", output_stride=value)


def test_checkpoints_record_output_stride_and_load_into_any(tmp_path) -> None:
    model = trained_looking(create_model("repvgg_a0", num_classes=3, output_stride=16))
    save_checkpoint(model, tmp_path / "os16.pth")
    save_checkpoint(reparameterize(model), tmp_path / "os16_deploy.safetensors")
    x = torch.randn(1, 3, 64, 64)
    for path in (tmp_path / "os16.pth", tmp_path / "os16_deploy.safetensors"):
        assert read_checkpoint(path).metadata["output_stride"] == 16
        loaded, _ = model_from_checkpoint(path)
        assert loaded.output_stride == 16 and output_difference(model, x, loaded) < 1e-5
        dense, _ = model_from_checkpoint(path, output_stride=8)
        assert dense.feature_info[-1]["reduction"] == 8
    with pytest.raises(RepVGGError, match="output_stride"):
        save_checkpoint(model, tmp_path / "bad.pth", output_stride=8)  # metadata that contradicts the model
    old = read_checkpoint(tmp_path / "os16.pth")
    del old.metadata["output_stride"]  # a file written before output_stride existed
    assert model_from_checkpoint(old)[0].output_stride == 32


def test_pretrained_weights_load_at_any_output_stride(tmp_path) -> None:
    published = trained_looking(create_model("repvgg_a0"))
    save_checkpoint(published, tmp_path / "a0.pth")
    x = torch.randn(1, 3, 64, 64)
    for output_stride in OUTPUT_STRIDES:
        backbone = create_model("repvgg_a0", pretrained=str(tmp_path / "a0.pth"), output_stride=output_stride,
                                out_indices=(4,)).eval()
        with torch.no_grad():
            step = 32 // output_stride
            reference = stage_outputs(published, x)[4]
            assert relative_difference(reference, backbone(x)[0][..., ::step, ::step]) < 1e-5


def test_fake_quant_blocks_keep_the_dilation() -> None:
    """A fake-quantized block runs its int8 conv with the block's dilation: close to the float block, where a conv
    run undilated would be far off."""
    block = trained_looking(RepVGGBlock(16, 16, dilation=2))
    x = torch.randn(2, 16, 12, 12)
    qat = FakeQuantBlock.from_block(block).train()
    qat(x)  # learn the input range
    qat.eval()  # and the block's BatchNorms, which it shares
    with torch.no_grad():
        reference, quantized = block(x), qat(x)
        kernel, bias = block.equivalent_kernel_bias()
        undilated = torch.relu(F.conv2d(x, kernel, bias, padding=1))
    assert 0 < relative_difference(reference, quantized) < 0.02
    assert relative_difference(reference, undilated) > 0.2
    assert torch.allclose(torch.relu(F.conv2d(x, kernel, bias, padding=2, dilation=2)), reference, atol=1e-5)


class Segmenter(nn.Module):
    """A small semantic segmenter: our dilated backbone (stage 2 and 4 maps) and torchvision's DeepLabV3 head,
    upsampled to the input size; nothing in it but the backbone knows RepVGG."""

    def __init__(self, num_classes: int = 3) -> None:
        from torchvision.models.segmentation.deeplabv3 import DeepLabHead

        super().__init__()
        config = RepVGGConfig("seg", (1, 2, 2, 1), (0.125, 0.125, 0.125, 0.0625))
        self.backbone = RepVGG(config, out_indices=(2, 4), output_stride=8)
        self.head = DeepLabHead(self.backbone.feature_info[4]["num_chs"], num_classes)
        self.skip = nn.Conv2d(self.backbone.feature_info[2]["num_chs"], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.backbone(x)
        return F.interpolate(self.head(high) + self.skip(low), size=x.shape[-2:], mode="bilinear")


def assert_exports(deploy: nn.Module, path: Path, fmt: str, x: torch.Tensor, reference: np.ndarray) -> None:
    """Exported, verified by its runtime, carrying its metadata, and giving PyTorch's outputs when loaded."""
    result = export_model(deploy, path, fmt, (32, 32), dynamic_batch=True, metadata={"class_names": CLASS_NAMES})
    assert result.rel_diff < 1e-5
    meta = read_artifact_metadata(path, fmt)
    assert meta["class_names"] == CLASS_NAMES and meta["deploy"] is True and meta["preprocess"]["crop"] == 32
    assert relative_difference(reference, load_artifact(path, fmt, 2)(x.numpy())) < 1e-5


def assert_quantizes(deploy: nn.Module, engine: str, x: torch.Tensor, reference: np.ndarray) -> None:
    """Post-training int8 for ``engine``, calibrated on random images: close to float32, not equal to it."""
    calibration = [torch.randn(8, 3, 32, 32).numpy()]
    quantized = int8_engine(quantize_model(deploy, engine, calibration, img_size=(32, 32)), engine, 2)
    assert 0 < relative_difference(reference, quantized(x.numpy())) < 0.1


def test_a_segmenter_goes_through_every_tool(tmp_path) -> None:
    """Convert, compare, export (three formats, verified, with metadata), quantize (PTQ), fine-tune
    quantization-aware and run on the engines: a network holding RepVGG blocks, with NxKxHxW outputs. (OpenVINO, the
    slow one to compile, is the next test.)"""
    net = trained_looking(Segmenter())
    x = torch.randn(2, 3, 32, 32)
    deploy = reparameterize(net)
    assert is_deploy(deploy) and isinstance(deploy.head[2], nn.BatchNorm2d)  # the head is left alone
    assert output_difference(net, x, deploy) < 1e-5
    with torch.no_grad():
        reference = deploy(x).numpy()
    assert reference.shape == (2, 3, 32, 32)

    for fmt in ("onnx", "torchscript"):
        if fmt == "torchscript" or "onnxruntime" in available_engines():
            assert_exports(deploy, tmp_path / f"seg.{fmt}", fmt, x, reference)

    for engine in FAST_ENGINES:  # what the benchmarks time
        run = create_engine(deploy, engine, (32, 32), batch_size=2)
        assert relative_difference(reference, run(x.numpy())) < 1e-5
    if "onnxruntime" in int8_engines_installed():
        assert_quantizes(deploy, "onnxruntime", x, reference)

    qat = prepare_qat(copy.deepcopy(net)).train()
    assert sum(isinstance(m, FakeQuantBlock) for m in qat.modules()) == sum(
        isinstance(m, RepVGGBlock) for m in net.modules())
    assert not any(isinstance(m, FakeQuantBlock) for m in qat.head.modules())
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01)
    F.cross_entropy(qat(x), torch.randint(0, 3, (2, 32, 32))).backward()
    assert qat.backbone.stage3[1].rbr_1x1.conv.weight.grad.abs().sum() > 0
    optimizer.step()
    plain = copy.deepcopy(net)
    plain.load_state_dict(qat.state_dict())  # the QAT network saves the plain network's checkpoints
    assert 0 < output_difference(plain, x, qat) < 0.1  # int8 simulated, dilation kept
    assert output_difference(plain, x, reparameterize(qat)) < 1e-5


def test_a_segmenter_exports_and_runs_on_openvino_in_float32_and_int8(tmp_path) -> None:
    if "openvino" not in int8_engines_installed():
        pytest.skip("openvino or nncf not installed")
    deploy = reparameterize(trained_looking(Segmenter()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = deploy(x).numpy()
    assert_exports(deploy, tmp_path / "seg.xml", "openvino", x, reference)
    assert relative_difference(reference, create_engine(deploy, "openvino", (32, 32), 2)(x.numpy())) < 1e-5
    assert_quantizes(deploy, "openvino", x, reference)


def test_export_refuses_a_model_with_several_outputs(tmp_path) -> None:
    backbone = reparameterize(create_model("repvgg_a0", out_indices=(3, 4)))
    with pytest.raises(RepVGGError, match=r"^RepVGG returns a list of 2, not one tensor"):
        export_model(backbone, tmp_path / "b.pt", "torchscript", (32, 32))
    with pytest.raises(RepVGGError, match="not one tensor"):
        create_engine(backbone, "torch")(np.zeros((1, 3, 32, 32), np.float32))
    assert not list(tmp_path.iterdir())


def test_output_difference_compares_every_output() -> None:
    backbone = trained_looking(create_model("repvgg_a0", out_indices=(1, 4))).train()
    x = torch.randn(1, 3, 32, 32)
    deploy = reparameterize(backbone)
    assert output_difference(backbone, x) < 1e-5 and output_difference(backbone, x, deploy) < 1e-5
    assert backbone.training  # run in eval mode, its own mode given back
    with torch.no_grad():
        deploy.stage4[0].rbr_reparam.bias += 1  # the second output only
    assert output_difference(backbone, x, deploy) > 0.01
    with pytest.raises(RepVGGError, match="differ in number or shape"):
        output_difference(backbone, x, reparameterize(create_model("repvgg_a0", out_indices=(1,))))


class MixedNet(nn.Module):
    """Our block between timm's RepVGG and MobileOne blocks and a LeViT conv+BN (timm's ``fuse()``)."""

    def __init__(self) -> None:
        from timm.models.byobnet import MobileOneBlock, RepVggBlock
        from timm.models.levit import ConvNorm

        super().__init__()
        self.timm_repvgg = RepVggBlock(3, 8, stride=2)
        self.ours = RepVGGBlock(8, 8, dilation=2)
        self.mobileone = MobileOneBlock(8, 8, num_conv_branches=2)
        self.conv_norm = ConvNorm(8, 4, 3, padding=1)
        self.ours_last = RepVGGBlock(4, 4, se="pre", se_reduction=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ours_last(self.conv_norm(self.mobileone(self.ours(self.timm_repvgg(x)))))


@pytest.mark.parametrize("tool", ["repvgg", "timm"])
def test_timm_and_repvgg_reparameterize_each_others_blocks(tool: str) -> None:
    timm = pytest.importorskip("timm")
    net = trained_looking(MixedNet())
    x = torch.randn(2, 3, 20, 24)
    with torch.no_grad():
        reference = net(x)
    converted = reparameterize(net) if tool == "repvgg" else timm.utils.reparameterize_model(net).eval()
    assert converted.ours.deploy and converted.ours_last.deploy and is_deploy(converted)
    assert converted.timm_repvgg.reparam_conv is not None and converted.mobileone.reparam_conv is not None
    assert type(converted.conv_norm) is nn.Conv2d
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    with torch.no_grad():
        assert relative_difference(reference, converted(x)) < 1e-5
