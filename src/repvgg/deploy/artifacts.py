"""Exported files that carry what they need: class names, preprocessing, architecture and library version travel in
ONNX ``metadata_props``, OpenVINO ``rt_info`` and a TorchScript extra file, so that ``repvgg predict`` and
``repvgg eval`` run an ``.onnx``, ``.xml`` or TorchScript ``.pt`` file directly, as they run a checkpoint."""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..errors import RepVGGError
from ..files import companions
from ..models.checkpoints import check_metadata, model_metadata
from ..models.preprocess import preprocess_for_size
from ..models.reparam import is_deploy
from ..optional import require

__all__ = ["METADATA_KEY", "TORCHSCRIPT_EXTRA", "artifact_format", "artifact_metadata",
           "with_onnx_metadata", "read_artifact_metadata", "describe_artifact"]

METADATA_KEY = "repvgg"  # ONNX metadata_props key, OpenVINO rt_info key, TorchScript extra file "repvgg.json"
TORCHSCRIPT_EXTRA = f"{METADATA_KEY}.json"
_CARRIED = ("class_names", "preprocess", "source_format")


def artifact_format(path: str | os.PathLike) -> str | None:
    """``onnx`` (.onnx), ``openvino`` (.xml) or ``torchscript`` (a zip with TorchScript code); None for checkpoints."""
    suffix = Path(path).suffix.lower()
    if suffix in (".onnx", ".xml"):
        return "onnx" if suffix == ".onnx" else "openvino"
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any("/code/" in name for name in archive.namelist()):
                return "torchscript"
    return None


def artifact_metadata(model: nn.Module, metadata: Mapping[str, Any] | None, img_size: tuple[int, int]
                      ) -> dict[str, Any]:
    """What an exported file carries: the model's description, the checkpoint's class names and preprocessing (its
    crop set to the exported input size), and the library version; metadata that predict or eval would refuse
    (class names of another count than the outputs, say) is refused here, before anything is written."""
    metadata = dict(metadata or {})
    described = model_metadata(model)
    if not described:  # any other network (a segmenter with a RepVGG backbone, say): what it says of itself
        described = {"num_classes": getattr(model, "num_classes", None), "deploy": is_deploy(model)}
    preprocess = preprocess_for_size(metadata.get("preprocess"), img_size)
    carried = {k: metadata[k] for k in _CARRIED if k in metadata}
    check_metadata({}, {**described, **carried})
    return {"format": METADATA_KEY, **described, **carried, "preprocess": preprocess, "library_version": __version__}


def with_onnx_metadata(data: bytes, metadata: Mapping[str, Any]) -> bytes:
    """The ONNX model ``data`` with ``metadata`` as JSON under ``metadata_props[repvgg]``."""
    onnx = require("onnx")
    proto = onnx.load_from_string(data)
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(metadata)})
    return proto.SerializeToString()


def _runtime_load_errors(fmt: str) -> tuple[type[BaseException], ...]:
    """What a runtime raises for a file it cannot read (ONNX Runtime's own exception types are not RuntimeErrors)."""
    if fmt != "onnx":
        return (RuntimeError,)
    state = require("onnxruntime").capi.onnxruntime_pybind11_state
    return (RuntimeError, state.InvalidProtobuf, state.InvalidGraph, state.Fail, state.InvalidArgument,
            state.NoSuchFile, state.NotImplemented)


def read_artifact_metadata(path: str | os.PathLike, fmt: str) -> dict[str, Any]:
    """The metadata an exported file carries ({} for files exported elsewhere); a file its runtime cannot read is
    refused in one line."""
    try:
        text = _metadata_text(path, fmt)
    except _runtime_load_errors(fmt) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:160]
        raise RepVGGError(f"{path} is not a readable {fmt} model (truncated or corrupt?): {reason}") from None
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        raise RepVGGError(f"{path}: its {METADATA_KEY} metadata is not valid JSON") from None


def _metadata_text(path: str | os.PathLike, fmt: str) -> str | None:
    if fmt == "onnx":
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if fmt == "openvino":
        model = require("openvino").Core().read_model(str(path))
        return model.get_rt_info([METADATA_KEY]).astype(str) if model.has_rt_info([METADATA_KEY]) else None
    extra = {TORCHSCRIPT_EXTRA: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in favour of torch.export
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return extra[TORCHSCRIPT_EXTRA] or None


def describe_artifact(path: str | os.PathLike) -> dict[str, Any] | None:
    """What an exported file is and the metadata it carries (None when ``path`` is not an exported model file)."""
    fmt = artifact_format(path)
    if fmt is None:
        return None
    if not os.path.isfile(path):
        raise RepVGGError(f"model file not found: {path}")
    files = [str(f) for f in companions(path)]
    size = sum(os.path.getsize(f) for f in files if os.path.isfile(f))
    carried = {k: v for k, v in read_artifact_metadata(path, fmt).items() if k != "format"}  # "repvgg": its schema
    return {"file": str(path), "format": fmt, "files": files, "size_mb": round(size / 2**20, 2), **carried}
