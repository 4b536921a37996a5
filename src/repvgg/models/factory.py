"""``create_model`` and ``list_models``: the calls that find and build any registered RepVGG, randomly initialized or
with weights, as timm's do."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from ..errors import RepVGGError
from .architectures import MODEL_CONFIGS, RepVGG, RepVGGConfig, build_model, canonical_name, registered_name
from .pretrained import PUBLISHED, load_pretrained, read_pretrained

__all__ = ["create_model", "list_models"]

ALL_STAGES = (0, 1, 2, 3, 4)


def list_models(pattern: str | Sequence[str] = "", pretrained: bool = False) -> list[str]:
    """Names of the registered architectures, in registry order: those matching ``pattern`` (shell wildcards,
    ``"*b1*"``; several patterns: any of them; case-insensitive, on the registry or the official name), and with
    ``pretrained=True`` only those whose published weights are fetched by name (``create_model(name,
    pretrained=True)``)."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    patterns = [p.lower() for p in patterns if p]

    def matches(name: str) -> bool:
        spellings = (name, MODEL_CONFIGS[name].official_name.lower())
        return not patterns or any(fnmatch.fnmatchcase(s, p) for s in spellings for p in patterns)

    return [n for n in MODEL_CONFIGS if matches(n) and (not pretrained or PUBLISHED[n].hub_id is not None)]


def create_model(name: str | RepVGGConfig, num_classes: int = 1000, deploy: bool = False,
                 pretrained: bool | str | None = False, features_only: bool = False, **options) -> RepVGG:
    """Build a registered architecture by name (``repvgg_a0`` or the official ``RepVGG-A0``), or one of the user's
    own given as a :class:`RepVGGConfig`.

    ``pretrained``: True loads the published ImageNet weights (Hugging Face Hub, cached), or give a Hub id or a
    checkpoint path (see :func:`repvgg.models.pretrained.load_pretrained`); a model for other classes keeps
    its own new classifier. ``features_only=True`` builds a backbone that returns the feature maps of every stage
    (stage0..stage4), or of the stages in ``out_indices``, as timm's option does. ``options`` are passed to
    :class:`RepVGG` (``in_chans``, ``strides``, ``out_indices``, ``output_stride``, ``aux_weight``, ``branches``,
    ``block``); ``groups`` overrides the config's grouped-conv setting. Weights load at any ``output_stride``
    (dilation changes no weight). ``pretrained=False`` (or None) builds random weights; an empty string is refused,
    not taken for False.
    """
    if features_only and options.get("out_indices") is None:
        options["out_indices"] = ALL_STAGES
    if pretrained is False or pretrained is None:
        return build_model(name, num_classes, deploy, **options)
    known = registered_name(name) if isinstance(name, RepVGGConfig) else canonical_name(name)
    ckpt = read_pretrained(pretrained, known)
    if ckpt.deploy and not deploy:
        raise RepVGGError(f"pretrained weights {pretrained} are re-parameterized; create the model with deploy=True")
    model = build_model(name, num_classes, ckpt.deploy, **options)
    load_pretrained(model, ckpt)
    model.preprocess = ckpt.metadata.get("preprocess")
    if deploy:
        model.switch_to_deploy()
    return model
