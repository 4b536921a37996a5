"""Inference engines behind one call (float32 NCHW array in, logits out).

Engine settings are the ones ``repvgg bench`` found fastest on CPU: PyTorch eager in channels-last under
inference mode; ONNX Runtime with every graph optimization, one intra-op thread per torch thread and no
busy-waiting between operators (faster when other processes share the cores); OpenVINO in
float32 (its default on CPUs with bf16 support is bfloat16), the LATENCY hint for single images and, for
batches, THROUGHPUT streams that each take a slice of the batch.

Which engine is fastest on the machine at hand is measured by :mod:`repvgg.deploy.probe`.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import RepVGGError
from ..optional import is_installed, require
from .formats import onnx_bytes, single_output, to_openvino

__all__ = ["EngineSpec", "ENGINE_TABLE", "ENGINES", "INT8_ENGINES", "INT8_SUFFIXES", "INT8_TOOLS", "FORMATS",
           "ARTIFACT_ENGINES", "Engine", "TorchEngine", "OnnxRuntimeEngine", "OpenVINOEngine", "available_engines",
           "create_engine", "load_artifact", "class_names_for"]


@dataclass(frozen=True)
class EngineSpec:
    """What the project knows of one inference engine: the exported formats it runs, and for an engine with an
    int8 path the suffix of its int8 artifact and the module that quantizes for it."""

    reads: tuple[str, ...]
    int8_suffix: str | None = None
    int8_tool: str | None = None


# The one table of engines; int8 engines in order of preference (the first is the default where none is faster).
ENGINE_TABLE = {
    "torch": EngineSpec(reads=("torchscript",)),
    "openvino": EngineSpec(reads=("onnx", "openvino"), int8_suffix=".xml", int8_tool="nncf"),
    "onnxruntime": EngineSpec(reads=("onnx",), int8_suffix=".onnx", int8_tool="onnxruntime"),
}
# Exported formats (``repvgg export --format``): each one's file suffix, and the engines that run it, preferred first.
FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "openvino": ".xml"}
ENGINES = ("torch", "onnxruntime", "openvino")  # in the order ties are broken
ARTIFACT_ENGINES = {f: tuple(e for e in ENGINES if f in ENGINE_TABLE[e].reads) for f in FORMATS}
INT8_ENGINES = tuple(e for e, spec in ENGINE_TABLE.items() if spec.int8_tool)
INT8_SUFFIXES = {e: ENGINE_TABLE[e].int8_suffix for e in INT8_ENGINES}
INT8_TOOLS = {e: ENGINE_TABLE[e].int8_tool for e in INT8_ENGINES}

Engine = Callable[[np.ndarray], np.ndarray]


def available_engines() -> list[str]:
    """The engines whose runtime is installed (``torch`` always is)."""
    return [e for e in ENGINES if is_installed(e)]


def _threads(threads: int | None) -> int:
    return threads or torch.get_num_threads()


class TorchEngine:
    """Eager PyTorch (or a TorchScript module) under inference mode, channels-last unless told otherwise."""

    def __init__(self, model: nn.Module, channels_last: bool = True) -> None:
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last) if channels_last else model
        self.model.eval()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return single_output(self.model, torch.from_numpy(x).contiguous(memory_format=self.memory_format)).numpy()


class OnnxRuntimeEngine:
    """An ONNX Runtime CPU session over an ONNX file or its bytes: all graph optimizations, no busy-waiting."""

    def __init__(self, onnx: bytes | str | os.PathLike, threads: int | None = None) -> None:
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = _threads(threads)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # faster on a shared CPU
        source = onnx if isinstance(onnx, bytes) else str(onnx)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


class OpenVINOEngine:
    """OpenVINO on CPU in float32: LATENCY hint for ``batch_size`` 1, else THROUGHPUT streams over batch slices."""

    def __init__(self, model: Any, batch_size: int = 1, threads: int | None = None) -> None:
        ov = require("openvino")
        config = {"PERFORMANCE_HINT": "THROUGHPUT" if batch_size > 1 else "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": _threads(threads)}
        source = str(model) if isinstance(model, str | os.PathLike) else model  # an IR/ONNX file or ov.Model
        self.compiled = ov.Core().compile_model(source, "CPU", config)
        streams = self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS") if batch_size > 1 else 1
        self.request = self.compiled.create_infer_request()
        self.queue = ov.AsyncInferQueue(self.compiled, streams)
        self.outputs: list[np.ndarray] = []
        self.queue.set_callback(self._collect)

    def _collect(self, request: Any, index: int) -> None:
        self.outputs[index] = request.get_output_tensor(0).data.copy()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        slices = np.array_split(x, min(len(self.queue), len(x)))
        if len(slices) == 1:
            return self.request.infer({0: x})[0].copy()
        self.outputs = [np.empty(0)] * len(slices)
        for i, part in enumerate(slices):
            self.queue.start_async({0: part}, i)
        self.queue.wait_all()
        return np.concatenate(self.outputs)


def create_engine(model: nn.Module, engine: str, img_size: tuple[int, int] = (224, 224), batch_size: int = 1,
                  threads: int | None = None) -> Engine:
    """Run ``model`` (deploy form, eval mode; any module with one tensor output) on ``engine``
    (:func:`repvgg.fastest_engine` names the fastest)."""
    if engine not in ENGINES:
        raise RepVGGError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if engine == "torch":
        return TorchEngine(model)
    require(engine)
    if engine == "onnxruntime":
        return OnnxRuntimeEngine(onnx_bytes(model, img_size), threads)
    return OpenVINOEngine(to_openvino(onnx_bytes(model, img_size), batch_size=None), batch_size, threads)


def load_artifact(path: str | os.PathLike, fmt: str, batch_size: int = 1) -> Engine:
    """Run an exported file (``onnx``, ``torchscript`` or ``openvino`` .xml) through its own runtime."""
    if fmt == "onnx":
        return OnnxRuntimeEngine(path)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in favour of torch.export
            return TorchEngine(torch.jit.load(str(path), map_location="cpu"), channels_last=False)
    if fmt == "openvino":
        return OpenVINOEngine(Path(path), batch_size)
    raise RepVGGError(f"unknown artifact format {fmt!r}")


def class_names_for(metadata: dict[str, Any], num_classes: int) -> list[str]:
    """The checkpoint's ``class_names``, else ``class 0``, ``class 1``, ..."""
    names = metadata.get("class_names")
    if names is None:
        return [f"class {i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise RepVGGError(f"checkpoint lists {len(names)} class names but the model has {num_classes} outputs")
    return [str(n) for n in names]


