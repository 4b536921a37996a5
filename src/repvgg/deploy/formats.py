"""The deploy model in other formats: an ONNX graph (opset 17, input ``input``, output ``logits``), a frozen
TorchScript module, an OpenVINO model. ONNX uses PyTorch's TorchScript-based exporter (``dynamo=False``): it runs
offline in well under a second and emits a plain graph (Conv, Relu, GlobalAveragePool, Flatten, Gemm).

Any module that takes one image batch and returns one tensor exports: a classifier's logits, a segmenter's NxKxHxW
logits, a network holding RepVGG blocks anywhere (its input channels are those of its first conv)."""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RepVGGError
from ..files import atomic_folder, companions, replace_together, write_failure
from ..models.profile import input_channels
from ..optional import is_installed, require

__all__ = ["ONNX_OPSET", "INPUT_NAME", "OUTPUT_NAME", "single_output", "save_openvino", "onnx_bytes",
           "to_torchscript", "torchscript_bytes", "to_openvino"]


ONNX_OPSET = 17


INPUT_NAME, OUTPUT_NAME = "input", "logits"


def single_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` without gradients, refused in one line unless it is one tensor: exported files and the engines
    carry one output."""
    with torch.no_grad():
        output = model(x)
    if not isinstance(output, torch.Tensor):
        count = f" of {len(output)}" if isinstance(output, list | tuple | dict) else ""
        raise RepVGGError(f"{type(model).__name__} returns a {type(output).__name__}{count}, not one tensor; export, "
                          f"quantization and the engines need a model with one tensor output (wrap a backbone "
                          f"with out_indices in a module that returns one tensor, e.g. its head's logits)")
    return output


def onnx_bytes(model: nn.Module, img_size: tuple[int, int] = (224, 224), dynamic_batch: bool = True,
               batch_size: int = 1) -> bytes:
    """The model as an ONNX graph (opset 17) with input ``input`` and output ``logits``."""
    x = torch.zeros(batch_size, input_channels(model), *img_size)
    single_output(model.eval(), x)
    buffer = io.BytesIO()
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter announces its successor
        torch.onnx.export(model.eval(), (x,), buffer, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes)
    return _without_weight_aliases(buffer.getvalue()) if is_installed("onnx") else buffer.getvalue()


def _without_weight_aliases(data: bytes) -> bytes:
    """The graph without the Identity nodes the exporter adds where it stores equal weights once (the SE biases of
    an untrained model, say): their consumers read the shared initializer directly."""
    model = require("onnx").load_from_string(data)
    graph = model.graph
    weights, outputs = {t.name for t in graph.initializer}, {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in weights and n.output[0] not in outputs}
    if not alias:
        return data
    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)
    return model.SerializeToString()


def torchscript_bytes(scripted: torch.jit.ScriptModule, extra_files: dict[str, str]) -> bytes:
    """A TorchScript archive in memory, so that it is written by Python (a full disk is then an ordinary OSError,
    where torch's own file writer aborts the process); its root folder is not named after a temporary file."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, buffer, _extra_files=extra_files)
    return buffer.getvalue()


def to_torchscript(model: nn.Module, img_size: tuple[int, int] = (224, 224)) -> torch.jit.ScriptModule:
    """Trace and freeze the model (weights become constants; any batch size works). Numerics-changing passes
    and trace re-checking are off: :func:`export_model` verifies the saved artifact instead."""
    x = torch.zeros(1, input_channels(model), *img_size)
    single_output(model.eval(), x)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in favour of torch.export
        return torch.jit.freeze(torch.jit.trace(model.eval(), x, check_trace=False), optimize_numerics=False)


def to_openvino(onnx: bytes | str | os.PathLike, batch_size: int | None = 1) -> Any:
    """An ``openvino.Model`` converted from ONNX; ``batch_size=None`` leaves the batch dimension dynamic."""
    ov = require("openvino")
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(onnx, bytes):
            path = Path(tmp) / "model.onnx"
            path.write_bytes(onnx)
            onnx = path
        model = ov.convert_model(str(onnx))
    shape = model.input(0).get_partial_shape()
    shape[0] = ov.Dimension(batch_size) if batch_size else ov.Dimension()
    model.reshape({model.input(0): shape})
    return model


def save_openvino(ir: Any, out: Path, verify: Callable[[str], None]) -> list[str]:
    """``out`` (.xml) and its .bin written into a temporary folder beside ``out``, verified, then moved into place
    as one artifact. OpenVINO's writer fails with a RuntimeError (on a full disk, say): that becomes an OSError."""
    files = companions(out)
    with atomic_folder(out) as tmp:
        try:
            require("openvino").save_model(ir, str(tmp / out.name), compress_to_fp16=False)
        except RuntimeError as e:
            raise write_failure(out, str(e)) from None
        verify(str(tmp / out.name))
        replace_together((tmp / f.name, f) for f in files)
    return [str(f) for f in files]
