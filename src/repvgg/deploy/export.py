"""Export the deploy model to ONNX, TorchScript or OpenVINO IR (see :mod:`.formats`), with its metadata, verified
against PyTorch through each runtime before it is written. OpenVINO IR is converted from the ONNX graph and saved
with float32 weights."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import RepVGGError
from ..files import atomic_write, companions
from ..models.profile import input_channels
from ..models.reparam import relative_difference
from ..optional import require
from .artifacts import METADATA_KEY, TORCHSCRIPT_EXTRA, artifact_metadata, with_onnx_metadata
from .engines import FORMATS, load_artifact
from .formats import onnx_bytes, save_openvino, single_output, to_openvino, to_torchscript, torchscript_bytes

__all__ = ["ExportResult", "check_export_path", "default_export_path", "export_model"]



@dataclass
class ExportResult:
    """What :func:`export_model` wrote and how closely the artifact reproduces PyTorch."""

    format: str
    files: list[str]
    max_abs_diff: float
    rel_diff: float
    input_shape: tuple[int, ...]


def export_model(model: nn.Module, out: str | os.PathLike, fmt: str, img_size: tuple[int, int] = (224, 224),
                 dynamic_batch: bool = False, tolerance: float = 1e-4, seed: int = 0,
                 metadata: Mapping[str, Any] | None = None) -> ExportResult:
    """Write ``model`` (deploy form) as ``fmt`` to ``out``, run the artifact through its own runtime on random
    input, and compare with PyTorch; raises :class:`RepVGGError` (leaving nothing behind) beyond ``tolerance``.
    ``model`` is any module with one tensor output: a RepVGG classifier, or e.g. a segmenter with a RepVGG backbone
    (converted with :func:`repvgg.reparameterize`) returning NxKxHxW logits.

    The file carries the checkpoint ``metadata`` (class names, preprocessing) with the architecture and library
    version: ONNX ``metadata_props``, OpenVINO ``rt_info`` or a TorchScript extra file, each under ``repvgg``."""

    if fmt not in FORMATS:
        raise RepVGGError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if min(img_size) < 1:
        raise RepVGGError(f"image size must be positive, got {tuple(img_size)}")
    if fmt != "torchscript":
        require("onnxruntime" if fmt == "onnx" else "openvino")  # the runtime that verifies the artifact
    model = model.eval()
    batch = 2 if dynamic_batch or fmt == "torchscript" else 1
    x = torch.randn(batch, input_channels(model), *img_size, generator=torch.Generator().manual_seed(seed))
    reference = single_output(model, x).numpy()
    if not np.isfinite(reference).all():
        raise RepVGGError("model outputs are not finite (NaN or inf): the weights are broken; nothing written")
    result = ExportResult(fmt, [str(out)], 0.0, 0.0, tuple(x.shape))
    meta = artifact_metadata(model, metadata, img_size)

    def verify(path: str) -> None:
        output = load_artifact(path, fmt)(x.numpy())
        result.max_abs_diff = float(np.abs(reference - output).max())
        result.rel_diff = relative_difference(reference, output)
        if not result.rel_diff <= tolerance:
            raise RepVGGError(f"exported {fmt} model differs from PyTorch by {result.rel_diff:.2e} of the output "
                              f"scale (tolerance {tolerance:.0e}); nothing written")

    if fmt == "onnx":
        data = with_onnx_metadata(onnx_bytes(model, img_size, dynamic_batch), meta)
        atomic_write(out, lambda tmp: (Path(tmp).write_bytes(data), verify(tmp)))
    elif fmt == "torchscript":
        data = torchscript_bytes(to_torchscript(model, img_size), {TORCHSCRIPT_EXTRA: json.dumps(meta)})
        atomic_write(out, lambda tmp: (Path(tmp).write_bytes(data), verify(tmp)))
    else:
        result.files = _export_openvino(model, Path(out), img_size, dynamic_batch, verify, meta)
    return result


def check_export_path(out: str | os.PathLike, fmt: str) -> Path:
    """``out`` for ``fmt``, refused before any work when the format needs another suffix (OpenVINO IR: .xml)."""
    out = Path(out)
    if fmt == "openvino" and out.suffix != ".xml":
        raise RepVGGError(f"OpenVINO output must end in .xml (a .bin is written beside it), got {out}")
    return out


def default_export_path(source: str | os.PathLike, fmt: str) -> Path:
    """Where ``repvgg export`` writes when no ``--out`` is given: beside a checkpoint file, named after it with
    ``fmt``'s suffix (``runs/x/model.pth`` -> ``runs/x/model.onnx``); for published weights named by model or Hub id,
    in the current folder after their name (``repvgg_a0.onnx``). When that name, or its companion (an IR's ``.bin``),
    would be the source itself (``model.pt`` to TorchScript, ``pytorch_model.bin`` to OpenVINO), the format's name
    goes before the suffix (``model.torchscript.pt``)."""
    if fmt not in FORMATS:
        raise RepVGGError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    path = Path(source)
    if path.is_file():
        stem = path.parent / path.stem
    else:  # a model name or a Hub id (timm/repvgg_a0.rvgg_in1k)
        stem = Path(path.name.replace("-", "_").lower() if "/" not in str(source) else path.name)
    out = stem.with_name(stem.name + FORMATS[fmt])
    if any(os.path.realpath(f) == os.path.realpath(path) for f in companions(out)):
        out = stem.with_name(f"{stem.name}.{fmt}{FORMATS[fmt]}")
    return out


def _export_openvino(model: nn.Module, out: Path, img_size: tuple[int, int], dynamic_batch: bool,
                     verify: Callable[[str], None], metadata: Mapping[str, Any]) -> list[str]:
    """Save IR (``.xml`` + ``.bin``) into a temporary folder beside ``out``, verify, then move both into place."""
    require("openvino")
    out = check_export_path(out, "openvino")
    ir = to_openvino(onnx_bytes(model, img_size, dynamic_batch), None if dynamic_batch else 1)
    ir.set_rt_info(json.dumps(metadata), [METADATA_KEY])
    return save_openvino(ir, out, verify)
