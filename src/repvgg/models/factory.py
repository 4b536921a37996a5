"""``create_model``: the one call that builds any registered RepVGG, randomly initialized or with weights."""

from __future__ import annotations

from ..errors import RepVGGError
from .architectures import RepVGG, build_model, canonical_name
from .pretrained import load_pretrained, read_pretrained

__all__ = ["create_model"]


def create_model(name: str, num_classes: int = 1000, deploy: bool = False, pretrained: bool | str | None = False,
                 **options) -> RepVGG:
    """Build a registered architecture by name (``repvgg_a0`` or the official ``RepVGG-A0``).

    ``pretrained``: True loads the published ImageNet weights (Hugging Face Hub, cached), or give a Hub id or a
    checkpoint path (see :func:`repvgg.models.pretrained.load_pretrained`); a model for other classes keeps
    its own new classifier. ``options`` are passed to :class:`RepVGG` (``in_chans``, ``strides``, ``out_indices``,
    ``output_stride``, ``aux_weight``, ``branches``, ``block``); ``groups`` overrides the config's grouped-conv
    setting. Weights load at any ``output_stride`` (dilation changes no weight).
    ``pretrained=False`` (or None) builds random weights; an empty string is refused, not taken for False.
    """
    if pretrained is False or pretrained is None:
        return build_model(name, num_classes, deploy, **options)
    ckpt = read_pretrained(pretrained, canonical_name(name))
    if ckpt.deploy and not deploy:
        raise RepVGGError(f"pretrained weights {pretrained} are re-parameterized; create the model with deploy=True")
    model = build_model(name, num_classes, ckpt.deploy, **options)
    load_pretrained(model, ckpt)
    if deploy:
        model.switch_to_deploy()
    return model
