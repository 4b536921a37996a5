"""Exported files that carry what they need: class names, preprocessing, architecture and library version travel in
ONNX ``metadata_props``, OpenVINO ``rt_info`` and a TorchScript extra file, so that ``repvgg predict`` and
``repvgg eval`` run an ``.onnx``, ``.xml`` or TorchScript ``.pt`` file directly, as they run a checkpoint."""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._version import __version__
from ..errors import RepVGGError
from ..models.checkpoints import Checkpoint, model_metadata
from ..optional import is_installed, require

__all__ = ["METADATA_KEY", "TORCHSCRIPT_EXTRA", "ARTIFACT_ENGINES", "artifact_format", "artifact_metadata",
           "with_onnx_metadata", "read_artifact_metadata", "Artifact", "ArtifactModel", "open_artifact",
           "load_model_source"]

METADATA_KEY = "repvgg"  # ONNX metadata_props key, OpenVINO rt_info key, TorchScript extra file "repvgg.json"
TORCHSCRIPT_EXTRA = f"{METADATA_KEY}.json"
ARTIFACT_ENGINES = {"onnx": ("onnxruntime", "openvino"), "openvino": ("openvino",), "torchscript": ("torch",)}
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
    crop set to the exported input size), and the library version."""
    from ..training.data import preprocess_settings

    metadata = dict(metadata or {})
    try:
        described = model_metadata(model)
    except RepVGGError:  # a custom architecture, not in the registry
        described = {"num_classes": getattr(model, "num_classes", None), "deploy": True}
    preprocess = preprocess_settings(metadata.get("preprocess"))
    if tuple(img_size) != _pair(preprocess["crop"]):
        preprocess.update(crop=img_size[0] if img_size[0] == img_size[1] else list(img_size),
                          resize=round(min(img_size) / 0.875))
    carried = {k: metadata[k] for k in _CARRIED if k in metadata}
    return {"format": METADATA_KEY, **described, **carried, "preprocess": preprocess, "library_version": __version__}


def _pair(size: int | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def with_onnx_metadata(data: bytes, metadata: Mapping[str, Any]) -> bytes:
    """The ONNX model ``data`` with ``metadata`` as JSON under ``metadata_props[repvgg]``."""
    onnx = require("onnx")
    proto = onnx.load_from_string(data)
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(metadata)})
    return proto.SerializeToString()


def read_artifact_metadata(path: str | os.PathLike, fmt: str) -> dict[str, Any]:
    """The metadata an exported file carries ({} for files exported elsewhere)."""
    if fmt == "onnx":
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    elif fmt == "openvino":
        model = require("openvino").Core().read_model(str(path))
        text = model.get_rt_info([METADATA_KEY]).astype(str) if model.has_rt_info([METADATA_KEY]) else None
    else:
        extra = {TORCHSCRIPT_EXTRA: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in favour of torch.export
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        text = extra[TORCHSCRIPT_EXTRA] or None
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        raise RepVGGError(f"{path}: its {METADATA_KEY} metadata is not valid JSON") from None


def _batch_limit(run: Any) -> int | None:
    """The fixed batch size an artifact was exported with (None: any)."""
    if hasattr(run, "session"):
        dim = run.session.get_inputs()[0].shape[0]
        return dim if isinstance(dim, int) else None
    if hasattr(run, "compiled"):
        dim = run.compiled.input(0).get_partial_shape()[0]
        return dim.get_length() if dim.is_static else None
    return None


def _in_chunks(run: Callable[[np.ndarray], np.ndarray], limit: int) -> Callable[[np.ndarray], np.ndarray]:
    """Feed an artifact exported for ``limit`` images at a time batch by batch."""
    return lambda x: np.concatenate([run(np.ascontiguousarray(x[i:i + limit])) for i in range(0, len(x), limit)])


@dataclass
class Artifact:
    """An exported file opened for inference: its runner (float32 NCHW in, logits out), engine and metadata."""

    run: Callable[[np.ndarray], np.ndarray]
    format: str
    engine: str
    metadata: dict[str, Any]
    path: str


def open_artifact(path: str | os.PathLike, engine: str | None = None, batch_size: int = 1) -> Artifact:
    """Open an ``.onnx``, ``.xml`` or TorchScript file on ``engine`` (default: the fastest installed one that reads
    it: ONNX runs on ONNX Runtime or OpenVINO, IR on OpenVINO, TorchScript on torch)."""
    from .engines import fastest_engine, load_artifact

    path = str(path)
    fmt = artifact_format(path)
    if fmt is None or not os.path.isfile(path):
        raise RepVGGError(f"not an exported model file: {path}")
    engines = ARTIFACT_ENGINES[fmt]
    if engine is None:
        engine = fastest_engine([e for e in engines if is_installed(e)] or engines[:1], batch_size)
    if engine not in engines:
        raise RepVGGError(f"{path} is {fmt}: it runs on {' or '.join(engines)}, not {engine}")
    run = load_artifact(path, "openvino" if engine == "openvino" else fmt, batch_size)
    limit = _batch_limit(run)
    return Artifact(_in_chunks(run, limit) if limit else run, fmt, engine, read_artifact_metadata(path, fmt), path)


class ArtifactModel(nn.Module):
    """An opened artifact as a module (CPU, eval only), so that evaluation treats it like a PyTorch model."""

    def __init__(self, artifact: Artifact, num_classes: int) -> None:
        super().__init__()
        self.artifact = artifact
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        out = self.artifact.run(np.ascontiguousarray(x.detach().float().cpu().numpy()))
        return torch.from_numpy(np.ascontiguousarray(out)).to(x.device)


def _artifact_model(path: str, engine: str | None) -> tuple[ArtifactModel, Checkpoint]:
    from .engines import input_size

    artifact = open_artifact(path, engine)
    meta = {"deploy": True, **artifact.metadata}
    num_classes = meta.get("num_classes")
    if num_classes is None:  # exported elsewhere: ask the model
        num_classes = artifact.run(np.zeros((1, 3, *input_size(meta)), np.float32)).shape[1]
    return ArtifactModel(artifact, int(num_classes)).eval(), Checkpoint({}, artifact.format, meta, path)


def load_model_source(checkpoint: str | os.PathLike | None, model_name: str | None = None,
                      pretrained: str | None = None, engine: str | None = None) -> tuple[nn.Module, Checkpoint]:
    """The model a command runs and what describes it: published/pretrained weights (``pretrained``), an exported
    artifact (run by its own runtime), or any checkpoint file."""
    from ..models.checkpoints import model_from_checkpoint
    from ..models.pretrained import read_pretrained

    if pretrained:
        return model_from_checkpoint(read_pretrained(pretrained, model_name), model_name)
    if checkpoint is None:
        raise RepVGGError("no model given: name a checkpoint or exported file, or --pretrained")
    if artifact_format(checkpoint) is not None:
        return _artifact_model(str(checkpoint), engine)
    return model_from_checkpoint(checkpoint, model_name)
