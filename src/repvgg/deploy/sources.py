"""The model a command runs: a checkpoint of any layout, published or local pretrained weights, or an exported
``.onnx``/``.xml``/TorchScript file opened on its own runtime with the metadata it carries."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import RepVGGError
from ..models.checkpoints import Checkpoint, model_from_checkpoint
from ..models.preprocess import input_size
from ..models.pretrained import read_pretrained
from ..models.reparam import reparameterize
from ..optional import is_installed
from .artifacts import artifact_format, read_artifact_metadata
from .engines import ARTIFACT_ENGINES, load_artifact
from .probe import fastest_engine

__all__ = ["Artifact", "ArtifactModel", "open_artifact", "load_model_source", "load_deploy_model",
           "deploy_model_source"]


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
    batch_limit: int | None = None  # the fixed batch size it was exported with (larger batches run in chunks)


def open_artifact(path: str | os.PathLike, engine: str | None = None, batch_size: int = 1) -> Artifact:
    """Open an ``.onnx``, ``.xml`` or TorchScript file on ``engine`` (default: the fastest installed one that reads
    it: ONNX runs on ONNX Runtime or OpenVINO, IR on OpenVINO, TorchScript on torch)."""
    path = str(path)
    if not os.path.isfile(path):
        raise RepVGGError(f"model file not found: {path}")
    fmt = artifact_format(path)
    if fmt is None:
        raise RepVGGError(f"not an exported model file (.onnx, .xml or TorchScript): {path}")
    engines = ARTIFACT_ENGINES[fmt]
    metadata = read_artifact_metadata(path, fmt)
    if engine is None and metadata.get("precision") == "int8":
        engine = engines[0]  # an int8 ONNX file was quantized for ONNX Runtime, its QDQ format and kernels
    if engine is None:
        engine = fastest_engine([e for e in engines if is_installed(e)] or engines[:1], batch_size)
    if engine not in engines:
        raise RepVGGError(f"{path} is {fmt}: it runs on {' or '.join(engines)}, not {engine}")
    run = load_artifact(path, "openvino" if engine == "openvino" else fmt, batch_size)
    limit = _batch_limit(run)
    return Artifact(_in_chunks(run, limit) if limit else run, fmt, engine, metadata, path, limit)


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
    artifact = open_artifact(path, engine)
    meta = {"deploy": True, **artifact.metadata}
    num_classes = meta.get("num_classes")
    if num_classes is None:  # exported elsewhere: ask the model
        num_classes = artifact.run(np.zeros((1, 3, *input_size(meta)), np.float32)).shape[1]
    return ArtifactModel(artifact, int(num_classes)).eval(), Checkpoint({}, artifact.format, meta, path)


def load_model_source(checkpoint: str | os.PathLike | None, model_name: str | None = None,
                      pretrained: str | None = None, engine: str | None = None) -> tuple[nn.Module, Checkpoint]:
    """The model a command runs and what describes it: published/pretrained weights (``pretrained``), an exported
    artifact (run by its own runtime), or any checkpoint file. A backbone loads too: the commands that need
    classes (eval, predict) refuse it in their own words."""
    if pretrained:
        return model_from_checkpoint(read_pretrained(pretrained, model_name), model_name, headless=True)
    if checkpoint is None:
        raise RepVGGError("no model given: name a checkpoint or exported file, or --pretrained")
    if artifact_format(checkpoint) is not None:
        return _artifact_model(str(checkpoint), engine)
    return model_from_checkpoint(checkpoint, model_name, headless=True)


def load_deploy_model(source: str | os.PathLike | Checkpoint, model_name: str | None = None
                      ) -> tuple[nn.Module, Checkpoint]:
    """Load any supported checkpoint (a backbone too) and return its deploy (re-parameterized) model in eval
    mode."""
    model, ckpt = model_from_checkpoint(source, model_name, headless=True)
    return (model if ckpt.deploy else reparameterize(model)).eval(), ckpt


def deploy_model_source(checkpoint: str | None, pretrained: str | None,
                        model_name: str | None = None) -> tuple[nn.Module, Checkpoint, str]:
    """(deploy model, its checkpoint, a label) from a checkpoint file or pretrained weights: exactly one of them."""
    if bool(checkpoint) == bool(pretrained):
        raise RepVGGError("give a checkpoint file or --pretrained (one of the two)")
    source = read_pretrained(pretrained, model_name) if pretrained else checkpoint
    return *load_deploy_model(source, model_name), checkpoint or f"pretrained {pretrained}"
