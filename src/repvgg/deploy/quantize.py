"""Post-training int8 quantization of the deploy model with each engine's own tool: NNCF for OpenVINO (IR with
FakeQuantize nodes and int8 weights) and ``onnxruntime.quantization`` for ONNX Runtime (QDQ ONNX). Weights are
quantized per output channel; activation ranges come from calibration images read with the checkpoint's
preprocessing. The artifact carries class names and preprocessing like an exported file, plus ``precision: int8``
and how it was calibrated, so ``repvgg eval``/``predict`` run it directly."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import RepVGGError
from ..files import atomic_write, check_output_path
from ..hardware import cpu_info
from ..models.preprocess import eval_transform, input_size, preprocess_settings
from ..models.reparam import relative_difference
from ..optional import is_installed, require
from .artifacts import METADATA_KEY, artifact_metadata, with_onnx_metadata
from .engines import (
    INT8_ENGINES,
    INT8_SUFFIXES,
    INT8_TOOLS,
    Engine,
    OnnxRuntimeEngine,
    OpenVINOEngine,
    available_engines,
)
from .formats import onnx_bytes, save_openvino, to_openvino
from .probe import PROBE_BATCH_SIZES, Speeds, engine_speeds, measure_engines, pick_fastest
from .sources import load_deploy_model

__all__ = ["METHODS", "DEFAULT_CALIB_IMAGES", "check_method", "calibration_batches",
           "random_calibration", "quantize_model", "int8_engine", "save_int8", "measure_int8_engines",
           "int8_engines_installed", "fastest_int8_engine", "QuantizeOptions", "QuantizeResult", "engine_and_out",
           "quantize_checkpoint"]

# first = default. openvino (NNCF): default = performance preset (symmetric activations) + fast bias correction;
# mixed = mixed preset (asymmetric activations); minmax = plain min/max ranges, no bias correction.
# onnxruntime: its CalibrationMethod MinMax / Percentile (99.999) / Entropy.
# naive (both): per-tensor weights and min/max activation ranges, no bias correction; the baseline that breaks RepVGG.
METHODS = {"openvino": ("default", "mixed", "minmax", "naive"),
           "onnxruntime": ("minmax", "percentile", "entropy", "naive")}
DEFAULT_CALIB_IMAGES = 128
CALIB_BATCH = 8


def check_method(engine: str, method: str | None) -> str:
    """``method`` (default: the engine's first) after checking that ``engine`` offers it and its tool is installed."""
    if engine not in INT8_ENGINES:
        raise RepVGGError(f"unknown int8 engine {engine!r}; choose one of: {', '.join(INT8_ENGINES)}")
    method = method or METHODS[engine][0]
    if method not in METHODS[engine]:
        raise RepVGGError(f"unknown {engine} calibration method {method!r}; choose one of: "
                          f"{', '.join(METHODS[engine])}")
    require(engine)
    require(INT8_TOOLS[engine])
    if engine == "onnxruntime":
        require("onnx")
    return method


def calibration_batches(data: str | os.PathLike, preprocess: dict[str, Any] | None, limit: int,
                        cache_dir: str | None = None) -> list[np.ndarray]:
    """Up to ``limit`` readable images, spread over the folder (its train/ split, else val/ or test/, else the
    folder itself; archives too), preprocessed like the checkpoint's evaluation, as float32 batches."""
    from ..training.data import BadImage, ImageFolder, resolve_split

    root = resolve_split(data, ("train", "val", "test"), cache_dir, fallback=True)
    dataset = ImageFolder(root, eval_transform(preprocess))
    order = np.random.default_rng(0).permutation(len(dataset))
    images = []
    for i in order:
        sample = dataset[int(i)]
        if not isinstance(sample, BadImage):
            images.append(sample[0].numpy())
        if len(images) == limit:
            break
    if not images:
        raise RepVGGError(f"no readable calibration images in {root}; nothing written")
    return [np.stack(images[i:i + CALIB_BATCH]) for i in range(0, len(images), CALIB_BATCH)]


def random_calibration(img_size: tuple[int, int], images: int = 4) -> list[np.ndarray]:
    """Random images for speed measurements only (speed does not depend on values)."""
    return [np.random.default_rng(0).standard_normal((images, 3, *img_size), dtype=np.float32)]


def _nncf_options(method: str) -> dict[str, Any]:
    """``nncf.quantize`` keyword arguments for a method of ``METHODS["openvino"]``."""
    nncf = require("nncf")
    if method == "mixed":
        return {"preset": nncf.QuantizationPreset.MIXED}
    if method in ("minmax", "naive"):
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        weights = QuantizationParameters(per_channel=False) if method == "naive" else None
        return {"advanced_parameters": AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX, disable_bias_correction=True,
            weights_quantization_params=weights)}
    return {"preset": nncf.QuantizationPreset.PERFORMANCE}


def _reduce_range() -> bool:
    """7-bit weights on x86 CPUs without VNNI/AMX int8 (ONNX Runtime's advice against u8s8 saturation)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return x86 and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_info()["features"])


def _quantize_onnxruntime(model: nn.Module, batches: Sequence[np.ndarray], method: str,
                          img_size: tuple[int, int]) -> bytes:
    """QDQ ONNX with per-channel int8 weights and uint8 activations."""
    q = require("onnxruntime.quantization")

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return {"input": x} if (x := next(self.batches, None)) is not None else None

    calibrate = {"minmax": q.CalibrationMethod.MinMax, "percentile": q.CalibrationMethod.Percentile,
                 "entropy": q.CalibrationMethod.Entropy, "naive": q.CalibrationMethod.MinMax}[method]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_bytes(model, img_size, dynamic_batch=True))
        with _logger_level("", logging.ERROR):  # quantize_static warns on the root logger to pre-process graphs
            q.quantize_static(src, dst, Reader(), quant_format=q.QuantFormat.QDQ, per_channel=method != "naive",
                              reduce_range=_reduce_range(), activation_type=q.QuantType.QUInt8,
                              weight_type=q.QuantType.QInt8, calibrate_method=calibrate)
        return dst.read_bytes()


def quantize_model(model: nn.Module, engine: str, batches: Sequence[np.ndarray], method: str | None = None,
                   img_size: tuple[int, int] = (224, 224), ir: Any = None) -> Any:
    """``model`` (deploy form) quantized for ``engine``, calibrated on ``batches``: an ``openvino.Model``
    (dynamic batch) or QDQ ONNX bytes. ``ir``: ``model`` already converted to OpenVINO (dynamic batch), if at hand."""
    method = check_method(engine, method)
    model = model.eval()
    if engine == "onnxruntime":
        return _quantize_onnxruntime(model, batches, method, img_size)
    nncf = require("nncf")
    nncf.set_log_level(logging.ERROR)
    ir = ir if ir is not None else to_openvino(onnx_bytes(model, img_size, dynamic_batch=True), batch_size=None)
    dataset = nncf.Dataset([x[i:i + 1] for x in batches for i in range(len(x))])
    # NNCF's torch backend loads torch's C++-extension helpers, which warn "No CUDA runtime is found" on any
    # CPU-only machine that has a CUDA toolkit folder: nothing here uses CUDA, so that line is noise.
    with _logger_level("torch.utils.cpp_extension", logging.ERROR):
        return nncf.quantize(ir, dataset, subset_size=sum(map(len, batches)), **_nncf_options(method))


@contextlib.contextmanager
def _logger_level(name: str, level: int) -> Iterator[None]:
    """Raise a library logger's level for the duration (the root logger's level too, when ``name`` is "")."""
    log = logging.getLogger(name)
    previous = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(previous)


def int8_engine(quantized: Any, engine: str, batch_size: int = 1) -> Engine:
    """Run what :func:`quantize_model` returned (or a saved int8 file) on its engine."""
    if engine == "onnxruntime":
        return OnnxRuntimeEngine(quantized)
    return OpenVINOEngine(quantized, batch_size)


def save_int8(quantized: Any, engine: str, out: str | os.PathLike, metadata: dict[str, Any],
              verify: Callable[[str], None] = lambda _path: None) -> list[str]:
    """Write the int8 model with ``metadata`` atomically (``verify`` sees the written file before it is moved into
    place); returns the files written."""
    out = Path(out)
    if out.suffix != INT8_SUFFIXES[engine]:
        raise RepVGGError(f"{engine} int8 output must end in {INT8_SUFFIXES[engine]}, got {out}")
    if engine == "onnxruntime":
        data = with_onnx_metadata(quantized, metadata)
        atomic_write(out, lambda tmp: (Path(tmp).write_bytes(data), verify(tmp)))
        return [str(out)]
    quantized.set_rt_info(json.dumps(metadata), [METADATA_KEY])
    return save_openvino(quantized, out, verify)


def measure_int8_engines(engines: Sequence[str], img_size: tuple[int, int] = (224, 224),
                         batch_sizes: Sequence[int] = PROBE_BATCH_SIZES, rounds: int = 5) -> Speeds:
    """Images/s of the probe's RepVGG-A0 quantized (random calibration) on each engine, timed side by side, at
    224x224: at the float32 probe's 64x64, per-call overheads hide int8 kernel speed differences."""
    quantized: dict[str, Any] = {}

    def build(model: nn.Module, engine: str, size: tuple[int, int], batch_size: int) -> Engine:
        if engine not in quantized:
            quantized[engine] = quantize_model(model, engine, random_calibration(size), img_size=size)
        return int8_engine(quantized[engine], engine, batch_size)

    return measure_engines(engines, img_size, batch_sizes, rounds, build=build)


def int8_engines_installed() -> list[str]:
    """The int8 engines whose runtime and quantization tool are installed."""
    return [e for e in INT8_ENGINES if e in available_engines() and is_installed(INT8_TOOLS[e])]


def fastest_int8_engine(installed: Sequence[str] | None = None, batch_size: int = 1) -> str:
    """The int8 engine that runs fastest here (one-time probe of both, cached like the float32 probe)."""
    names = [e for e in INT8_ENGINES if e in (int8_engines_installed() if installed is None else installed)]
    return pick_fastest(names or list(INT8_ENGINES[:1]),
                        lambda: engine_speeds(names, measure_int8_engines, precision="int8"), batch_size)


@dataclass(frozen=True)
class QuantizeOptions:
    """What ``repvgg quantize`` does: the command's options, typed."""

    checkpoint: str
    calib: str
    out: str
    engine: str | None = None  # default: the one the suffix of ``out`` names, else the faster int8 engine here
    method: str | None = None  # default: the engine's first in METHODS
    calib_images: int = DEFAULT_CALIB_IMAGES
    model: str | None = None
    cache_dir: str | None = None


@dataclass
class QuantizeResult:
    """What :func:`quantize_checkpoint` wrote and how the int8 model compares with float32."""

    engine: str
    method: str
    files: list[str]
    calib_images: int
    agreement: float = 0.0  # top-1 agreement with float32 on the calibration images
    rel_diff: float = 0.0  # their largest output difference over the output scale


def engine_and_out(opts: QuantizeOptions) -> tuple[str, str, Path]:
    """(engine, method, output file): ``--engine``, else the one ``--out``'s suffix names (.xml openvino, .onnx
    onnxruntime), else the faster int8 engine here; an output without a suffix gets the engine's appended. Checked
    before any work."""
    if not Path(opts.calib).exists():
        raise RepVGGError(f"calibration data not found: {opts.calib}")
    out = Path(opts.out)
    by_suffix = {v: k for k, v in INT8_SUFFIXES.items()}.get(out.suffix)
    engine = opts.engine or by_suffix or fastest_int8_engine()
    method = check_method(engine, opts.method)
    if not out.suffix or not (opts.engine or by_suffix):
        out = out.with_name(out.name + INT8_SUFFIXES[engine])
    if out.suffix != INT8_SUFFIXES[engine]:
        raise RepVGGError(f"{engine} int8 output must end in {INT8_SUFFIXES[engine]}, got {out}")
    check_output_path(out)
    return engine, method, out


def quantize_checkpoint(opts: QuantizeOptions) -> QuantizeResult:
    """Load and convert the checkpoint, calibrate, quantize, check against float32 on the calibration images, and
    write the int8 artifact atomically (``opts.out``, its engine's suffix appended when it has none)."""
    engine, method, out = engine_and_out(opts)
    model, ckpt = load_deploy_model(opts.checkpoint, opts.model)
    preprocess = preprocess_settings(ckpt.metadata.get("preprocess"))
    batches = calibration_batches(opts.calib, preprocess, opts.calib_images, opts.cache_dir)
    img_size = input_size(ckpt.metadata)
    quantized = quantize_model(model, engine, batches, method, img_size)
    n = sum(map(len, batches))
    meta = {**artifact_metadata(model, ckpt.metadata, img_size), "precision": "int8",
            "quantization": {"engine": engine, "tool": INT8_TOOLS[engine], "method": method, "calibration_images": n,
                             "weights": ("per-tensor" if method == "naive" else "per-channel") + " int8"
                                        + (", 7-bit range" if engine == "onnxruntime" and _reduce_range() else "")}}
    result = QuantizeResult(engine, method, [], n)
    check = np.concatenate(batches)[:32]
    with torch.no_grad():
        reference = model(torch.from_numpy(check)).numpy()

    def verify(path: str) -> None:
        output = int8_engine(path, engine, len(check))(check)
        if not np.isfinite(output).all():
            raise RepVGGError("int8 model outputs are not finite (NaN or inf); nothing written")
        result.agreement = float((output.argmax(1) == reference.argmax(1)).mean())
        result.rel_diff = relative_difference(reference, output)

    result.files = save_int8(quantized, engine, out, meta, verify)
    return result
