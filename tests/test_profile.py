"""Parameter and MAC counts: computed from the configs (what ``repvgg list`` prints) equal what forward hooks
measure on the built modules, for every architecture and for non-default options."""

from __future__ import annotations

import pytest
import torch

from repvgg import RepVGGConfig, create_model, list_models
from repvgg.models.architectures import RepVGG
from repvgg.models.profile import architecture_stats, count_macs, count_params


@pytest.mark.parametrize("name", list_models())
def test_config_counts_equal_module_counts(name: str) -> None:
    for options, img_size in [({}, (224, 224)), (dict(num_classes=7, in_chans=1, strides=(1, 1, 2, 2, 2)), (40, 56))]:
        with torch.device("meta"):
            train, deploy = create_model(name, **options), create_model(name, deploy=True, **options)
        stats = architecture_stats(name, options.get("num_classes", 1000), img_size, options.get("in_chans", 3),
                                   options.get("strides", (2, 2, 2, 2, 2)))
        assert stats.train_params == count_params(train) and stats.deploy_params == count_params(deploy)
        assert stats.macs == count_macs(deploy, img_size, options.get("in_chans", 3))


def test_headless_and_custom_configs() -> None:
    config = RepVGGConfig("tiny", (1, 2, 1, 1), (0.25, 0.25, 0.5, 0.5), groups=2, se="post", se_reduction=4,
                          aux_heads=True)
    for num_classes in (0, 3):
        train, deploy = RepVGG(config, num_classes=num_classes), RepVGG(config, num_classes=num_classes, deploy=True)
        stats = architecture_stats(config, num_classes, (32, 32))
        assert (stats.train_params, stats.deploy_params) == (count_params(train), count_params(deploy))
        assert stats.macs == count_macs(deploy, (32, 32))
    assert architecture_stats("RepVGG-A0").deploy_params == 8_309_384  # the paper's 8.30M, truncated


def test_quantization_aware_blocks_count_as_the_conv_they_run() -> None:
    """A quantization-aware block runs its fused kernel through a functional conv, which module hooks never saw: its
    MACs counted 0 and QAT's epoch line read '0% of the float32 matmul rate'."""
    from repvgg.models.fakequant import prepare_qat
    from repvgg.models.reparam import reparameterize

    model = create_model("repvgg_a0", num_classes=10, strides=(1, 1, 2, 2, 2))
    deploy_macs = count_macs(reparameterize(model), (32, 32))
    assert count_macs(prepare_qat(model), (32, 32)) == deploy_macs == architecture_stats(
        "repvgg_a0", 10, (32, 32), strides=(1, 1, 2, 2, 2)).macs
