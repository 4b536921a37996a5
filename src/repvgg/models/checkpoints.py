"""Checkpoints: this library's own files (.pth or .safetensors, with metadata), the official RepVGG release
layout (also as saved by its training script), timm's and mmpretrain's layouts, told apart by their keys and mapped
onto this library's module names. Torch files are read with ``weights_only=True``, always.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from .._version import __version__
from ..errors import RepVGGError
from ..files import atomic_write
from .architectures import (
    MODEL_CONFIGS,
    STAGE_BASE_WIDTHS,
    RepVGG,
    RepVGGConfig,
    build_model,
    canonical_name,
    get_config,
    name_key,
    registered_name,
)
from .preprocess import preprocess_settings
from .reparam import is_deploy

__all__ = ["Checkpoint", "read_checkpoint", "load_checkpoint", "save_checkpoint", "model_metadata",
           "model_from_checkpoint", "infer_config", "architecture_of", "check_finite", "describe_checkpoint",
           "CLASSIFIER_PREFIXES", "torch_bytes", "check_metadata"]

FORMAT_NATIVE, FORMAT_OFFICIAL, FORMAT_TIMM, FORMAT_MMPRETRAIN = "repvgg", "official", "timm", "mmpretrain"
CLASSIFIER_PREFIXES = ("linear.", "aux.")
_TIMM_BLOCK_RENAMES = (("conv_kxk.", "rbr_dense."), ("conv_1x1.", "rbr_1x1."), ("identity.", "rbr_identity."),
                       ("attn.fc1.", "se.down."), ("attn.fc2.", "se.up."), ("reparam_conv.", "rbr_reparam."))
_MMPRETRAIN_BLOCK_RENAMES = (("branch_3x3.", "rbr_dense."), ("branch_1x1.", "rbr_1x1."),
                             ("branch_norm.", "rbr_identity."), ("branch_reparam.", "rbr_reparam."),
                             ("se_layer.conv1.conv.", "se.down."), ("se_layer.conv2.conv.", "se.up."))
# Training scripts save their configuration beside the weights: the official one a yacs ``CfgNode``, timm's
# train.py an ``argparse.Namespace`` (``args``). The weights-only unpickler builds these classes as plain data
# containers instead (an OrderedDict, a SimpleNamespace): neither module is imported, nor any code from the file run.
_SAFE_STAND_INS = [(OrderedDict, "yacs.config.CfgNode"), (SimpleNamespace, "argparse.Namespace")]
# Where wrapped files keep their weights: the plain weights first, then an EMA copy (read only when it is alone).
_PLAIN_ENTRIES, _EMA_ENTRIES = ("state_dict", "model", "net"), ("state_dict_ema", "model_ema", "ema")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile, in any order and repetition


@dataclass
class Checkpoint:
    """A checkpoint read from disk: tensors in this library's key layout, the source format, and metadata."""

    state_dict: dict[str, Tensor]
    format: str
    metadata: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    entry: str | None = None  # the file's entry holding the weights (None: a bare state dict)
    unread: tuple[str, ...] = ()  # other weight entries the file holds (an EMA copy beside the plain weights)

    def __repr__(self) -> str:
        """A summary (a notebook would otherwise print every tensor of the state dict)."""
        params = sum(t.numel() for t in self.state_dict.values() if t.is_floating_point())
        arch = self.metadata.get("architecture", "unknown architecture")
        return (f"Checkpoint({self.path or 'in memory'}: {self.format} format, {arch}, {len(self.state_dict)} "
                f"tensors, {params / 1e6:.2f}M values, {'deploy' if self.deploy else 'training-time'} form)")

    @property
    def deploy(self) -> bool:
        """True when the weights are already in the plain (re-parameterized) form (for an exported artifact,
        which holds no state dict here, as its metadata says)."""
        if not self.state_dict:
            return bool(self.metadata.get("deploy"))
        return any(".rbr_reparam." in k for k in self.state_dict) and not any(".rbr_dense." in k
                                                                             for k in self.state_dict)


def _unwrap(obj: Any) -> Checkpoint:
    """The state dict inside a loaded object (bare, or under one of :data:`_PLAIN_ENTRIES`, else
    :data:`_EMA_ENTRIES`) and our metadata, as a checkpoint still in the file's key layout."""
    if not isinstance(obj, Mapping) or not obj:
        raise RepVGGError("no state dict found (expected a mapping of tensors, bare or under 'state_dict'/'model')")
    metadata = dict(obj["repvgg"]) if isinstance(obj.get("repvgg"), Mapping) else {}
    entries = [k for k in (*_PLAIN_ENTRIES, *_EMA_ENTRIES) if isinstance(obj.get(k), Mapping)]
    weights = obj[entries[0]] if entries else obj
    tensors = {k: v for k, v in weights.items() if isinstance(v, Tensor)}
    if not tensors:
        where = f"under {entries[0]!r}" if entries else "in the checkpoint"
        raise RepVGGError(f"no tensors found {where} (its entries: {_first([str(k) for k in weights], 8)})")
    return Checkpoint(tensors, FORMAT_NATIVE, metadata, entry=entries[0] if entries else None,
                      unread=tuple(entries[1:]))


def _strip_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the wrappers' prefixes that every key shares (``module.module.``, ``_orig_mod.module.``, ...)."""
    while state_dict:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            break
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
    if isinstance(source, Mapping):
        ckpt = _unwrap(source)
    else:
        path = str(source)
        if os.path.isdir(path):
            raise RepVGGError(f"{path} is a folder, not a checkpoint file")
        if not os.path.isfile(path):
            raise RepVGGError(f"checkpoint not found: {path}")
        ckpt = _read_file(path)
        ckpt.path = path
    raw = _strip_prefix(ckpt.state_dict)
    ckpt.format = FORMAT_NATIVE if ckpt.metadata else detect_format(raw)
    convert = {FORMAT_TIMM: _from_timm, FORMAT_MMPRETRAIN: _from_mmpretrain}.get(ckpt.format, _from_official)
    ckpt.state_dict = convert(raw)
    return ckpt


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


def _is_torchscript(path: str) -> bool:
    """A zip archive holding TorchScript code (an exported model, not a checkpoint)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _looks_like_onnx(head: bytes) -> bool:
    """An ONNX ModelProto opens with its ``ir_version`` (field 1, a small varint), then a later field's tag."""
    return len(head) > 2 and head[0] == 0x08 and 1 <= head[1] <= 32 and head[2] in (0x12, 0x1A, 0x22, 0x28, 0x32,
                                                                                     0x3A, 0x42)


def _file_kind(path: str) -> str:
    """``torch`` (a zip archive or a pickle) or ``safetensors``, told by the file's first bytes; any other file is
    refused with a line saying what it is (an exported model, or not a model at all)."""
    with open(path, "rb") as f:
        head = f.read(1024)
    use = "not a checkpoint: use eval or predict with"
    if head.startswith(b"PK\x03\x04"):
        if _is_torchscript(path):
            raise RepVGGError(f"{path} is a TorchScript model, {use} it")
        return "torch"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # pickle protocol 2+
        return "torch"
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= os.path.getsize(path) - 8:
        return "safetensors"
    if path.lower().endswith(".onnx") or _looks_like_onnx(head):
        raise RepVGGError(f"{path} is an ONNX model, {use} it")
    if head.lstrip().startswith(b"<") and b"<net" in head:
        raise RepVGGError(f"{path} is an OpenVINO model (IR), {use} it")
    xml = Path(path).with_suffix(".xml")
    if path.lower().endswith(".bin") and xml.is_file():
        raise RepVGGError(f"{path} is the weights file of the OpenVINO model {xml}, {use} {xml}")
    if not head:
        raise RepVGGError(f"{path} is empty, not a checkpoint")
    raise RepVGGError(f"{path} is not a checkpoint (neither a torch zip archive, a pickle nor safetensors)")


def _read_file(path: str) -> Checkpoint:
    try:
        if path.endswith(".safetensors") or _file_kind(path) == "safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            metadata = json.loads(header["repvgg"]) if "repvgg" in header else {}
            return Checkpoint(tensors, FORMAT_NATIVE, metadata)
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
    """What is needed to rebuild ``model`` (empty for models that are not RepVGG): a registered architecture by
    name, any other with its whole ``config``, so that the file describes itself wherever it is read."""
    if not isinstance(model, RepVGG):
        return {}
    config = model.config
    name = registered_name(config)
    meta = dict(architecture=name or config.official_name, num_classes=model.num_classes,
                in_chans=model.stage0.in_channels, strides=list(model.strides), output_stride=model.output_stride,
                groups=config.groups, branches=model.branches, block=model.block, deploy=is_deploy(model))
    return meta if name else {**meta, "config": config.as_dict()}


def check_metadata(described: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Refuse metadata that contradicts the model it is saved with (``described``), class names of another
    count than its classes, and ``preprocess`` settings that predict and eval would refuse."""
    for key, own in described.items():
        value = meta[key]
        if key == "architecture" and isinstance(value, str):
            with contextlib.suppress(RepVGGError):
                value = canonical_name(value)
        if value != own:
            raise RepVGGError(f"checkpoint metadata {key}={value!r:.60} contradicts the model saved, whose {key} "
                              f"is {own!r}; leave it out (the model describes itself)")
    names, classes = meta.get("class_names"), meta.get("num_classes")
    if names is not None and (not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names)):
        raise RepVGGError(f"checkpoint metadata class_names must be a list of strings, got {names!r:.60}")
    if names is not None and isinstance(classes, int) and len(names) != classes:
        raise RepVGGError(f"checkpoint metadata lists {len(names)} class names for a model with {classes} classes")
    if meta.get("preprocess") is not None:
        try:
            preprocess_settings(meta["preprocess"])
        except RepVGGError as e:
            raise RepVGGError(f"checkpoint metadata {e}") from None


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> None:
    """Write ``model``'s weights with metadata (architecture, classes, deploy flag, library version), atomically.

    A ``.safetensors`` suffix writes safetensors (metadata as JSON in its header); anything else, a torch file.
    Extra keyword metadata (``class_names``, preprocessing, ...) must be JSON-serializable and agree with the
    model; a file that reading would refuse is never written.
    """
    described = model_metadata(model)
    try:  # as JSON would hold it (tuples become lists), in either kind of file
        meta = json.loads(json.dumps({"format": FORMAT_NATIVE, "library_version": __version__, **metadata}))
    except (TypeError, ValueError) as e:
        raise RepVGGError(f"checkpoint metadata must be JSON-serializable: {e}") from None
    check_metadata(described, {**described, **meta})
    meta.update(described)  # the model's own spelling of what it is
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
    def kernel(block: str) -> Tensor | None:
        return state_dict.get(block + "rbr_dense.conv.weight", state_dict.get(block + "rbr_reparam.weight"))

    depths = tuple(len({m.group(1) for k in state_dict if (m := re.match(rf"stage{i}\.(\d+)\.", k))})
                   for i in range(1, 5))
    widths = []
    for prefix in ("stage0.", "stage1.0.", "stage2.0.", "stage3.0.", "stage4.0."):
        if (weight := kernel(prefix)) is None:
            raise RepVGGError(f"not a RepVGG checkpoint: no weights for {prefix.rstrip('.')}")
        widths.append(weight.shape[0])
    blocks = [f"stage{i}.{j}." for i, depth in enumerate(depths, start=1) for j in range(depth)]
    second = kernel(blocks[1]) if len(blocks) > 1 else None  # layer 2, the first grouped layer, after layer 1
    groups = kernel(blocks[0]).shape[0] // second.shape[1] if second is not None else 1
    se = "pre" if any(".se.down." in k for k in state_dict) else "post" if any(
        ".post_se.down." in k for k in state_dict) else None
    return depths, tuple(widths), groups, se


def infer_config(state_dict: Mapping[str, Tensor]) -> RepVGGConfig:
    """The architecture whose layout matches ``state_dict`` (in this library's key layout): the registered one,
    else one named ``custom`` with the depths, widths, groups and squeeze-excitation its shapes reveal."""
    depths, channels, groups, se = _signature(state_dict)
    matches = [c for c in MODEL_CONFIGS.values() if (c.depths, c.stage_channels, c.se) == (depths, channels, se)]
    if matches:  # an exact match before a registered model with its groups overridden
        return replace(min(matches, key=lambda c: c.groups != groups), groups=groups)
    widths = tuple(c / base for c, base in zip(channels[1:], STAGE_BASE_WIDTHS, strict=True))
    down = next((v for k, v in state_dict.items() if re.match(r"stage0\.(post_)?se\.down\.weight$", k)), None)
    config = None
    if down is not None or not se:  # every block has the SE when any has: a stage0 without it fits no config
        with contextlib.suppress(RepVGGError):
            config = RepVGGConfig("custom", depths, widths, groups, se, channels[0] // down.shape[0] if se else 16,
                                  any(k.startswith("aux.") for k in state_dict))
    if config is None or config.stage_channels != channels:
        raise RepVGGError(f"no RepVGG architecture has depths {depths}, stage channels {channels}, groups {groups}")
    return config


def architecture_of(metadata: Mapping[str, Any], state_dict: Mapping[str, Tensor],
                    model_name: str | None = None) -> RepVGGConfig:
    """The architecture a checkpoint holds: the config its metadata carries (one of the user's own), else the
    registered model that ``model_name`` or the metadata names, else the one its tensor shapes reveal."""
    saved, own = metadata.get("architecture"), metadata.get("config")
    if saved is not None and not isinstance(saved, str):
        raise RepVGGError(f"metadata architecture must be a model name, got {saved!r:.60}")
    if own is not None:
        try:
            config = RepVGGConfig.from_dict(own)
        except RepVGGError as e:
            raise RepVGGError(f"metadata {e}") from None
        if model_name and name_key(model_name) != name_key(config.official_name):
            raise RepVGGError(f"checkpoint holds its own architecture {config.official_name!r}, not {model_name}")
        return config
    if not (model_name or saved):
        return infer_config(state_dict)
    name = canonical_name(model_name or saved)
    if model_name and saved and name != canonical_name(saved):
        raise RepVGGError(f"checkpoint holds {saved}, not {name}")
    return get_config(name)


def check_finite(ckpt: Checkpoint) -> None:
    """Refuse weights holding NaN or infinity (a diverged run): every result computed from them would be NaN."""
    bad = [k for k, v in ckpt.state_dict.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise RepVGGError(f"{ckpt.path or 'checkpoint'}: weights are not finite (NaN or inf) in {_first(bad, 3)}")


def _classifier_outputs(ckpt: Checkpoint) -> int:
    """How many classes the checkpoint's classifier (``linear.*``) has, 0 when it has none; half a classifier
    (a weight without its bias, or the reverse) is refused."""
    weight, bias = ckpt.state_dict.get("linear.weight"), ckpt.state_dict.get("linear.bias")
    if (weight is None) != (bias is None):
        have, lack = ("linear.weight", "linear.bias") if bias is None else ("linear.bias", "linear.weight")
        raise RepVGGError(f"{ckpt.path or 'checkpoint'} has a partial classifier: {have} without {lack}")
    return 0 if weight is None else weight.shape[0]


def model_from_checkpoint(source: str | os.PathLike | Mapping[str, Any] | Checkpoint, model_name: str | None = None,
                          headless: bool = False, **options: Any) -> tuple[RepVGG, Checkpoint]:
    """Build the model a checkpoint describes (metadata, else ``model_name``, else inferred) and load it.

    A checkpoint without a classifier (a backbone) is refused unless ``headless=True`` (``--headless``)."""
    ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    check_finite(ckpt)
    meta, label = ckpt.metadata, ckpt.path or "checkpoint"
    try:
        config = architecture_of(meta, ckpt.state_dict, model_name)
    except RepVGGError as e:
        raise RepVGGError(f"{label}: {e}") from None
    num_classes = meta.get("num_classes", _classifier_outputs(ckpt))
    if not num_classes and not headless:
        raise RepVGGError(f"{label} has no classifier (no linear.* weights); pass --headless (headless=True) to use "
                          f"it as a backbone")
    build = {k: meta[k] for k in ("in_chans", "strides", "output_stride", "groups", "branches", "block") if k in meta}
    stem = ckpt.state_dict.get("stage0.rbr_dense.conv.weight", ckpt.state_dict.get("stage0.rbr_reparam.weight"))
    if "in_chans" not in build and stem is not None:
        build["in_chans"] = stem.shape[1]
    build.update(options)
    try:
        model = build_model(config, num_classes=num_classes, deploy=ckpt.deploy, **build)
    except RepVGGError as e:
        raise RepVGGError(f"{label}: {e}") from None
    load_checkpoint(model, ckpt.state_dict)
    model.preprocess = meta.get("preprocess")
    return model.eval(), ckpt


def describe_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint file holds, for ``repvgg info``: format, architecture, form, classes, parameter count and
    its metadata (the architecture is inferred from tensor shapes when the file does not say)."""
    ckpt = read_checkpoint(path)
    meta = ckpt.metadata
    try:
        config = architecture_of(meta, ckpt.state_dict)
        arch = registered_name(config) or f"{config.official_name} (its own: {_describe_config(config)})"
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
    if ckpt.entry and ckpt.format != FORMAT_NATIVE:  # where a foreign file kept them
        rows["weights"] = repr(ckpt.entry) + (f" ({', '.join(map(repr, ckpt.unread))} not read)" if ckpt.unread else "")
    rows.update({k: v for k, v in meta.items() if k not in ("architecture", "num_classes", "format", "config")})
    return rows


def _describe_config(config: RepVGGConfig) -> str:
    """The fields of an unregistered architecture, as ``repvgg info`` prints them."""
    return ", ".join(f"{k} {v}" for k, v in config.as_dict().items() if k != "official_name")
