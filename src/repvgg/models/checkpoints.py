"""Checkpoints: this library's own files (.pth or .safetensors, with metadata), the official RepVGG release
layout (also as saved by its training script), timm's and mmpretrain's layouts, told apart by their keys and mapped
onto this library's module names. Torch files are read with ``weights_only=True``, always.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._version import __version__
from ..errors import RepVGGError
from ..files import atomic_write
from .architectures import MODEL_CONFIGS, RepVGG, build_model, canonical_name
from .reparam import is_deploy

__all__ = ["Checkpoint", "read_checkpoint", "load_checkpoint", "save_checkpoint", "model_metadata",
           "model_from_checkpoint", "infer_architecture", "check_finite", "describe_checkpoint", "CLASSIFIER_PREFIXES",
           "torch_bytes"]

FORMAT_NATIVE, FORMAT_OFFICIAL, FORMAT_TIMM, FORMAT_MMPRETRAIN = "repvgg", "official", "timm", "mmpretrain"
CLASSIFIER_PREFIXES = ("linear.", "aux.")
_TIMM_BLOCK_RENAMES = (("conv_kxk.", "rbr_dense."), ("conv_1x1.", "rbr_1x1."), ("identity.", "rbr_identity."),
                       ("attn.fc1.", "se.down."), ("attn.fc2.", "se.up."), ("reparam_conv.", "rbr_reparam."))
_MMPRETRAIN_BLOCK_RENAMES = (("branch_3x3.", "rbr_dense."), ("branch_1x1.", "rbr_1x1."),
                             ("branch_norm.", "rbr_identity."), ("branch_reparam.", "rbr_reparam."),
                             ("se_layer.conv1.conv.", "se.down."), ("se_layer.conv2.conv.", "se.up."))
# The official training script saves its yacs ``CfgNode`` beside the weights. The weights-only unpickler builds
# that one class as a plain OrderedDict instead (yacs itself is never imported, nor any code from the file run).
_SAFE_STAND_INS = [(OrderedDict, "yacs.config.CfgNode")]


@dataclass
class Checkpoint:
    """A checkpoint read from disk: tensors in this library's key layout, the source format, and metadata."""

    state_dict: dict[str, Tensor]
    format: str
    metadata: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    @property
    def deploy(self) -> bool:
        """True when the weights are already in the plain (re-parameterized) form (for an exported artifact,
        which holds no state dict here, as its metadata says)."""
        if not self.state_dict:
            return bool(self.metadata.get("deploy"))
        return any(".rbr_reparam." in k for k in self.state_dict) and not any(".rbr_dense." in k
                                                                             for k in self.state_dict)


def _unwrap(obj: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Find the state dict inside a loaded object (bare, or under ``state_dict``/``model``) and our metadata."""
    metadata = {}
    if isinstance(obj, Mapping) and isinstance(obj.get("repvgg"), Mapping):
        metadata = dict(obj["repvgg"])
    for key in ("state_dict", "model", "model_ema", "state_dict_ema"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise RepVGGError("no state dict found (expected a mapping of tensors, bare or under 'state_dict'/'model')")
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise RepVGGError("no tensors found in the checkpoint")
    return tensors, metadata


def _strip_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _from_timm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^stem\.", "stage0.", key)
        key = re.sub(r"^stages\.(\d+)\.", lambda m: f"stage{int(m.group(1)) + 1}.", key)
        key = re.sub(r"^head\.fc\.", "linear.", key)
        for old, new in _TIMM_BLOCK_RENAMES:
            key = key.replace(f".{old}", f".{new}")
        out[key] = value
    return out


def _from_official(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official RepVGG keys already match; RepVGGplus nests blocks under ``.blocks.`` and splits stage3."""
    first = {int(m.group(1)) for k in state_dict if (m := re.match(r"stage3_first\.blocks\.(\d+)\.", k))}
    n_first = max(first) + 1 if first else 0
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^(stage\d)\.blocks\.", r"\1.", key)
        key = re.sub(r"^stage3_first\.blocks\.", "stage3.", key)
        key = re.sub(r"^stage3_second\.blocks\.(\d+)\.", lambda m: f"stage3.{int(m.group(1)) + n_first}.", key)
        key = re.sub(r"^(stage1|stage2|stage3_first)_aux\.0\.", r"aux.\1.", key)
        key = re.sub(r"^(stage1|stage2|stage3_first)_aux\.3\.", r"aux.\1.fc.", key)
        out[key] = value
    return out


def _from_mmpretrain(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """mmpretrain: ``backbone.stem``/``backbone.stage_N``, ``branch_*`` branches whose BN is ``norm``, ``head.fc``."""
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^backbone\.stem\.", "stage0.", key)
        key = re.sub(r"^backbone\.stage_(\d)\.", r"stage\1.", key)
        key = re.sub(r"^head\.fc\.", "linear.", key)
        for old, new in _MMPRETRAIN_BLOCK_RENAMES:
            key = key.replace(f".{old}", f".{new}")
        out[re.sub(r"\.(rbr_dense|rbr_1x1)\.norm\.", r".\1.bn.", key)] = value
    return out


def detect_format(state_dict: Mapping[str, Tensor]) -> str:
    """Tell this library's / the official layout from timm's and mmpretrain's by their keys."""
    if any(k.startswith(("stem.", "stages.")) for k in state_dict):
        return FORMAT_TIMM
    if any(k.startswith(("backbone.stem.", "backbone.stage_")) for k in state_dict):
        return FORMAT_MMPRETRAIN
    if any(k.startswith("stage0.") for k in state_dict):
        return FORMAT_OFFICIAL
    raise RepVGGError(f"unrecognised checkpoint layout (first keys: {', '.join(list(state_dict)[:3])})")


def read_checkpoint(source: str | os.PathLike | Mapping[str, Any]) -> Checkpoint:
    """Read a checkpoint file or an in-memory state dict, in any supported format, into this library's layout."""
    path = None
    if isinstance(source, Mapping):
        raw, metadata = _unwrap(source)
    else:
        path = str(source)
        if os.path.isdir(path):
            raise RepVGGError(f"{path} is a folder, not a checkpoint file")
        if not os.path.isfile(path):
            raise RepVGGError(f"checkpoint not found: {path}")
        raw, metadata = _read_file(path)
    raw = _strip_prefix(raw)
    fmt = FORMAT_NATIVE if metadata else detect_format(raw)
    convert = {FORMAT_TIMM: _from_timm, FORMAT_MMPRETRAIN: _from_mmpretrain}.get(fmt, _from_official)
    state_dict = convert(raw)
    return Checkpoint(state_dict, fmt, metadata, path)


def _refusal(message: str) -> str:
    """Why the weights-only reader refused a file, in words that name what it holds (torch's text is cut)."""
    if m := re.search(r"GLOBAL ([\w.]+)", message):
        return (f"it holds a pickled Python object ({m.group(1)}); only tensors, numbers, strings and plain "
                "containers are read, because unpickling other objects can run arbitrary code")
    if m := re.search(r"Unsupported operand (\d+)", message):
        return (f"it uses pickle opcode {m.group(1)} (pickle protocol 4 or later), which the safe reader of tensors "
                "does not accept; save it again with torch.save's default protocol")
    return ("it holds Python objects other than tensors, numbers, strings and plain containers, which are not read "
            "because unpickling them can run arbitrary code")


def _torch_load(path: str) -> Any:
    """``torch.load(weights_only=True)`` that also reads the official training script's files (their yacs config
    becomes an OrderedDict), keeps torch's pickle-protocol warnings off stderr, and explains a refusal."""
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_SAFE_STAND_INS):
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise RepVGGError(f"refusing to read {path}: {_refusal(str(e))}") from None


def _read_file(path: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            metadata = json.loads(header["repvgg"]) if "repvgg" in header else {}
            return tensors, metadata
        obj = _torch_load(path)
    except RepVGGError:
        raise
    except Exception as e:  # corrupt archives raise many unrelated types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RepVGGError(f"cannot read checkpoint {path}: {reason[:200]}") from None
    return _unwrap(obj)


def _first(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def load_checkpoint(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                    strict: bool = True, drop_classifier: bool = False) -> Checkpoint:
    """Load weights of any supported format into ``model``; returns what was read.

    Strict by default: missing or unexpected keys and shape mismatches raise :class:`RepVGGError` naming the
    first few. ``drop_classifier=True`` ignores the checkpoint's classifier (``linear``/auxiliary heads) and keeps
    the model's own, for fine-tuning on a different number of classes.
    """
    ckpt = read_checkpoint(path_or_state_dict)
    state_dict = dict(ckpt.state_dict)
    own = model.state_dict()
    if drop_classifier:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(CLASSIFIER_PREFIXES)}
    if ckpt.deploy != is_deploy(model) and isinstance(model, RepVGG):
        want, got = ("deploy", "training-time") if is_deploy(model) else ("training-time", "deploy")
        raise RepVGGError(f"checkpoint holds a {got} model but the model is {want}; "
                          f"create it with deploy={not is_deploy(model)} or convert the checkpoint")
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
                  if k in own and own[k].shape != v.shape]
    if mismatched:
        raise RepVGGError(f"checkpoint does not fit the model; shape mismatches (checkpoint vs model): "
                          f"{_first(mismatched, 3)}")
    # older exports lack BatchNorm's num_batches_tracked; torch's strict loading accepts that, and so do we
    missing = [k for k in own if k not in state_dict and not k.endswith(".num_batches_tracked")
               and not (drop_classifier and k.startswith(CLASSIFIER_PREFIXES))]
    unexpected = [k for k in state_dict if k not in own]
    if strict and (missing or unexpected):
        parts = ([f"missing keys: {_first(missing)}"] if missing else []) + (
            [f"unexpected keys: {_first(unexpected)}"] if unexpected else [])
        raise RepVGGError(f"checkpoint does not fit the model; {'; '.join(parts)}")
    model.load_state_dict(state_dict, strict=False)
    return ckpt


def model_metadata(model: nn.Module) -> dict[str, Any]:
    """What is needed to rebuild ``model`` with :func:`create_model` (empty for models that are not RepVGG)."""
    if not isinstance(model, RepVGG):
        return {}
    return dict(architecture=canonical_name(model.config.official_name), num_classes=model.num_classes,
                in_chans=model.stage0.in_channels, strides=list(model.strides), groups=model.config.groups,
                branches=model.branches, block=model.block, deploy=is_deploy(model))


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> None:
    """Write ``model``'s weights with metadata (architecture, classes, deploy flag, library version), atomically.

    A ``.safetensors`` suffix writes safetensors (metadata as JSON in its header); anything else, a torch file.
    Extra keyword metadata (``class_names``, preprocessing, ...) must be JSON-serializable.
    """
    meta = {"format": FORMAT_NATIVE, "library_version": __version__, **model_metadata(model), **metadata}
    try:
        json.dumps(meta)
    except TypeError as e:
        raise RepVGGError(f"checkpoint metadata must be JSON-serializable: {e}") from None
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save

        atomic_write(path, save(state_dict, metadata={"repvgg": json.dumps(meta)}))
    else:
        atomic_write(path, torch_bytes({"repvgg": meta, "state_dict": state_dict}))


def torch_bytes(obj: Any) -> bytes:
    """``torch.save`` into memory: the file is then written by Python, so a full disk is an ordinary OSError (torch's
    own file writer reports it as an unrelated RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _signature(state_dict: Mapping[str, Tensor]) -> tuple:
    """(depths, stage widths, groups of layer 2, SE position) as the keys and shapes reveal them."""
    depths = tuple(len({m.group(1) for k in state_dict if (m := re.match(rf"stage{i}\.(\d+)\.", k))})
                   for i in range(1, 5))
    widths, groups = [], 1
    for i in range(5):
        prefix = "stage0." if i == 0 else f"stage{i}.0."
        weight = state_dict.get(prefix + "rbr_dense.conv.weight", state_dict.get(prefix + "rbr_reparam.weight"))
        if weight is None:
            raise RepVGGError(f"not a RepVGG checkpoint: no weights for {prefix.rstrip('.')}")
        widths.append(weight.shape[0])
    second = state_dict.get("stage1.1.rbr_dense.conv.weight", state_dict.get("stage1.1.rbr_reparam.weight"))
    if second is not None:
        groups = second.shape[0] // second.shape[1]
    se = "pre" if any(".se.down." in k for k in state_dict) else "post" if any(
        ".post_se.down." in k for k in state_dict) else None
    return depths, tuple(widths), groups, se


def infer_architecture(state_dict: Mapping[str, Tensor]) -> str:
    """Name the registered architecture whose layout matches ``state_dict`` (in this library's key layout)."""
    depths, widths, groups, se = _signature(state_dict)
    for name, cfg in MODEL_CONFIGS.items():
        if (cfg.depths, cfg.stage_channels, cfg.groups, cfg.se) == (depths, widths, groups, se):
            return name
    raise RepVGGError(f"no registered architecture has depths {depths}, widths {widths}, groups {groups}")


def check_finite(ckpt: Checkpoint) -> None:
    """Refuse weights holding NaN or infinity (a diverged run): every result computed from them would be NaN."""
    bad = [k for k, v in ckpt.state_dict.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise RepVGGError(f"{ckpt.path or 'checkpoint'}: weights are not finite (NaN or inf) in {_first(bad, 3)}")


def model_from_checkpoint(source: str | os.PathLike | Mapping[str, Any] | Checkpoint, model_name: str | None = None,
                          **options: Any) -> tuple[RepVGG, Checkpoint]:
    """Build the model a checkpoint describes (metadata, else ``model_name``, else inferred) and load it."""
    ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    check_finite(ckpt)
    meta = ckpt.metadata
    name = model_name or meta.get("architecture") or infer_architecture(ckpt.state_dict)
    if model_name and meta.get("architecture") and canonical_name(model_name) != meta["architecture"]:
        raise RepVGGError(f"checkpoint holds {meta['architecture']}, not {canonical_name(model_name)}")
    linear = ckpt.state_dict.get("linear.weight")
    num_classes = meta.get("num_classes", linear.shape[0] if linear is not None else 0)
    build = {k: meta[k] for k in ("in_chans", "strides", "groups", "branches", "block") if k in meta}
    stem = ckpt.state_dict.get("stage0.rbr_dense.conv.weight", ckpt.state_dict.get("stage0.rbr_reparam.weight"))
    if "in_chans" not in build and stem is not None:
        build["in_chans"] = stem.shape[1]
    build.update(options)
    model = build_model(name, num_classes=num_classes, deploy=ckpt.deploy, **build)
    load_checkpoint(model, ckpt.state_dict)
    return model.eval(), ckpt


def describe_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint file holds, for ``repvgg info``: format, architecture, form, classes, parameter count and
    its metadata (the architecture is inferred from tensor shapes when the file does not say)."""
    ckpt = read_checkpoint(path)
    meta = ckpt.metadata
    try:
        arch = meta.get("architecture") or infer_architecture(ckpt.state_dict)
    except RepVGGError as e:
        arch = f"unknown ({e})"
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    n_params = sum(v.numel() for k, v in ckpt.state_dict.items() if not k.endswith(statistics))
    linear = ckpt.state_dict.get("linear.weight")
    rows = {
        "file": str(path),
        "format": ckpt.format,
        "architecture": arch,
        "form": "deploy (re-parameterized)" if ckpt.deploy else "training-time (multi-branch)",
        "classes": meta.get("num_classes", linear.shape[0] if linear is not None else 0) or "none (no classifier)",
        "parameters": f"{n_params / 1e6:.2f}M in {len(ckpt.state_dict)} tensors",
    }
    rows.update({k: v for k, v in meta.items() if k not in ("architecture", "num_classes", "format")})
    return rows
