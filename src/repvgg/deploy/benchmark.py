"""Speed and memory measurement: interleaved rounds over several models and engines on the same input, as medians.

:func:`run_benchmark` (``repvgg bench``) times the training-time model, the deploy model on every installed
engine and torchvision ResNets (built with ``weights=None``), together with a float32 matrix multiply that gives
the machine's attainable GFLOP/s. The RepVGG is a registered architecture with random weights, a checkpoint (its own
model, strides and input size), or an exported ``.onnx``/``.xml``/TorchScript file, float32 or int8, timed on each
engine that runs it. Every round runs every configuration in turn, starting one further along each
round, so load from other processes hits all of them alike. Peak memory is measured afterwards, one fresh
subprocess per configuration: the rise of the process's peak resident set size (Linux VmHWM, reset through
``/proc/self/clear_refs`` once libraries are imported and inputs exist) while it builds the engine and runs every
batch size. It counts weights, runtime workspaces and activations, i.e. what the configuration really costs.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import RepVGGError
from ..files import atomic_write
from ..hardware import machine_description, matmul_gflops, time_interleaved
from ..models.profile import count_macs, count_params
from ..optional import EXTRAS, is_installed, require
from .engines import ENGINES

__all__ = ["BenchConfig", "BenchSource", "BENCH_ENGINES", "BASELINES", "bench_source", "default_configs",
           "run_benchmark", "format_table", "plot_report", "report_figure"]

BENCH_ENGINES = ("torch", "torch-channels-last", *ENGINES[1:])  # torch timed in both memory formats
BASELINES = ("resnet18", "resnet34", "resnet50")
MATMUL_SIZE = 2048
METHOD = {
    "speed": "interleaved rounds (start rotates each round), same input arrays; images/s = batch / median call time",
    "latency": "per-call wall time percentiles over all rounds",
    "weights": "random (speed and memory do not depend on values); torchvision models built with weights=None",
    "memory": "fresh subprocess per configuration: VmHWM rise after /proc/self/clear_refs, over engine build and "
              "two calls at every batch size",
    "gflops": "2 * MACs (convs + linears, count_macs) * images/s; fraction_of_matmul divides it by the float32 "
              "matmul GFLOP/s measured once per round on all torch threads (null for int8 rows, whose integer "
              "operations that float32 rate does not measure)",
    "int8": "form int8: the deploy model post-training quantized for its engine (repvgg.deploy.quantize, default "
            "method, calibrated on random images), same float32 inputs",
}


@dataclass(frozen=True)
class BenchConfig:
    """One measured configuration: a network (RepVGG name or torchvision model) in a form on an engine, with random
    weights or those of ``source`` (a checkpoint, or an exported file run on its own runtime)."""

    label: str
    network: str  # registry name, torchvision model, or "" (an exported file that does not say)
    form: str  # "train", "deploy", "int8" or "baseline"
    engine: str  # one of BENCH_ENGINES
    source: str | None = None
    exported: bool = False

    @property
    def onnx_based(self) -> bool:
        """True for rows that run the ONNX graph the benchmark exports from the deploy model."""
        return self.engine in ("onnxruntime", "openvino") and not self.exported

    @property
    def precision(self) -> str:
        return "int8" if self.form == "int8" else "float32"


@dataclass(frozen=True)
class BenchSource:
    """A file to time: a checkpoint (its own model) or an exported file (on the engines that read its format)."""

    path: str
    network: str  # registry name, the name of the file's own architecture, or "" (an exported file that does not say)
    format: str | None  # the exported format; None for a checkpoint
    deploy: bool  # already the deploy form: there is no training-time model to time
    precision: str  # "float32" or "int8"
    img_size: tuple[int, int]

    @property
    def name(self) -> str:
        return Path(self.path).name


def bench_source(path: str | os.PathLike, model: str | None = None,
                 img_size: tuple[int, int] | None = None) -> BenchSource:
    """What :func:`run_benchmark` needs of a checkpoint or exported file: architecture (``model`` where the file
    does not say), form, precision and input size (the metadata's crop unless ``img_size`` overrides it; an exported
    file's graph has a fixed size, so another one is refused)."""
    from ..models.architectures import canonical_name, registered_name
    from ..models.checkpoints import model_from_checkpoint
    from ..models.preprocess import input_size
    from .artifacts import artifact_format, read_artifact_metadata

    path = str(path)
    if not os.path.isfile(path):
        raise RepVGGError(f"model file not found: {path}")
    fmt = artifact_format(path)
    if fmt is None:
        net, ckpt = model_from_checkpoint(path, model, headless=True)
        if net.stage0.in_channels != 3:
            raise RepVGGError(f"{path} takes {net.stage0.in_channels}-channel images; bench times 3-channel ones")
        return BenchSource(path, registered_name(net.config) or net.config.official_name, None, ckpt.deploy, "float32",
                           tuple(img_size or input_size(ckpt.metadata)))
    meta = read_artifact_metadata(path, fmt)
    own = input_size(meta)
    if meta and img_size and tuple(img_size) != own:
        raise RepVGGError(f"{path} was exported for {own[0]}x{own[1]} images; leave --img-size out")
    network = meta.get("architecture") or (canonical_name(model) if model else "")
    return BenchSource(path, network, fmt, True, "int8" if meta.get("precision") == "int8" else "float32",
                       tuple(img_size or own))


def _exported_configs(source: BenchSource, engines: Sequence[str]) -> list[BenchConfig]:
    """An exported file's rows: one per engine of ``engines`` that runs its format."""
    from .engines import ARTIFACT_ENGINES

    readers = [e for e in engines if e in ARTIFACT_ENGINES[source.format]]
    if not readers:
        raise RepVGGError(f"{source.path} is {source.format}: it runs on {' or '.join(ARTIFACT_ENGINES[source.format])}"
                          f", which --engines leaves out (or which is not installed)")
    form = "int8" if source.precision == "int8" else "deploy"
    return [BenchConfig(f"{source.name} {form} ({e})", source.network, form, e, source.path, exported=True)
            for e in readers]


def default_configs(model: str = "repvgg_a0", engines: Sequence[str] = BENCH_ENGINES,
                    baselines: Sequence[str] = BASELINES, train: bool = True,
                    int8: Sequence[str] = (), source: BenchSource | None = None) -> list[BenchConfig]:
    """Training-time model (eager), deploy model on each of ``engines`` (followed by its int8 form on those in
    ``int8``), then each baseline (eager). With ``source``, the model is that checkpoint's (no training-time row for
    a deploy checkpoint), or the exported file on each engine that runs it; rows are named after the file."""
    from ..models.architectures import canonical_name, get_config

    unknown = [e for e in engines if e not in BENCH_ENGINES]
    if unknown:
        raise RepVGGError(f"unknown bench engine {unknown[0]!r}; choose from: {', '.join(BENCH_ENGINES)}")
    if source is not None and source.format:
        configs = _exported_configs(source, engines)
    else:
        name = source.network if source else canonical_name(model)
        title, path = (source.name, source.path) if source else (get_config(model).official_name, None)
        train = train and not (source and source.deploy)
        configs = [BenchConfig(f"{title} train (torch)", name, "train", "torch", path)] if train else []
        for e in engines:
            configs.append(BenchConfig(f"{title} deploy ({e})", name, "deploy", e, path))
            if e in int8:
                configs.append(BenchConfig(f"{title} deploy int8 ({e})", name, "int8", e, path))
    for base in baselines:
        if not base.startswith("resnet") or not hasattr(_torchvision_models(), base):
            raise RepVGGError(f"unknown baseline {base!r}; use torchvision ResNets such as {', '.join(BASELINES)}")
        configs.append(BenchConfig(f"ResNet-{base[6:]} (torch)", base, "baseline", "torch"))
    return configs


def _torchvision_models() -> Any:
    import torchvision

    return torchvision.models


ModelKey = tuple[str, str, str | None, bool]


def _build_model(network: str, form: str, source: str | None = None, exported: bool = False) -> nn.Module | None:
    """The PyTorch model of a configuration: the checkpoint's (``source``), else random weights (speed and memory
    do not depend on their values); for an exported file the architecture its metadata describes (to count
    parameters and MACs), None when it does not say."""
    from ..models.architectures import build_model
    from ..models.checkpoints import architecture_of, model_from_checkpoint
    from ..models.reparam import reparameterize

    if form == "baseline":
        return getattr(_torchvision_models(), network)(weights=None).eval()
    if exported:
        if not network:
            return None
        meta = _exported_metadata(source)
        config = architecture_of(meta, {}) if meta.get("architecture") else network
        return build_model(config, meta.get("num_classes", 1000), deploy=True,
                           **{k: meta[k] for k in ("in_chans", "strides", "groups") if k in meta}).eval()
    if source is None:
        return build_model(network, deploy=form == "deploy").eval()
    model, ckpt = model_from_checkpoint(source, headless=True)  # the file's own architecture, checked by bench_source
    return model if form == "train" or ckpt.deploy else reparameterize(model)


def _exported_metadata(path: str) -> dict[str, Any]:
    from .artifacts import artifact_format, read_artifact_metadata

    return read_artifact_metadata(path, artifact_format(path))


def _model_key(config: BenchConfig) -> ModelKey:
    """(network, form, source, exported) of the PyTorch model a configuration runs, was exported from, or is."""
    form = "deploy" if config.onnx_based else config.form
    return config.network, form, config.source, config.exported


def _open_exported(config: BenchConfig, batch_size: int) -> Any:
    """An exported file's configuration opened on its engine (an :class:`~repvgg.deploy.sources.Artifact`)."""
    from .sources import open_artifact

    return open_artifact(config.source, config.engine, batch_size)


def _build_runner(config: BenchConfig, batch_size: int, onnx_path: str | None,
                  model: nn.Module | None = None) -> Callable[[np.ndarray], np.ndarray]:
    from .engines import OnnxRuntimeEngine, OpenVINOEngine, TorchEngine

    if config.exported:
        return _open_exported(config, batch_size).run
    if config.form == "int8":
        from .quantize import int8_engine

        return int8_engine(_int8_path(onnx_path, config.engine), config.engine, batch_size)
    if config.engine == "onnxruntime":
        return OnnxRuntimeEngine(onnx_path)
    if config.engine == "openvino":
        return OpenVINOEngine(_ir_path(onnx_path), batch_size)
    model = model if model is not None else _build_model(*_model_key(config))
    return TorchEngine(model, channels_last=config.engine == "torch-channels-last")


def _ir_path(onnx_path: str) -> str:
    """Where :func:`run_benchmark` writes the float32 OpenVINO IR (converted once, compiled for each batch size)."""
    return str(Path(onnx_path).with_suffix(".xml"))


def _write_deploy_files(model: nn.Module, configs: Sequence[BenchConfig], int8_engines: Sequence[str],
                        onnx_path: str, img_size: tuple[int, int]) -> None:
    """The deploy model as the ONNX-based configurations read it: ONNX, OpenVINO IR where a float32 OpenVINO
    configuration runs, and each int8 engine's quantized file."""
    from ..optional import require
    from .formats import onnx_bytes, to_openvino

    Path(onnx_path).write_bytes(onnx_bytes(model, img_size, dynamic_batch=True))
    float32 = any(c.onnx_based and c.engine == "openvino" and c.form != "int8" for c in configs)
    ir = to_openvino(onnx_path, batch_size=None) if float32 or "openvino" in int8_engines else None  # converted once
    if float32:
        require("openvino").save_model(ir, _ir_path(onnx_path), compress_to_fp16=False)
    _write_int8(model, int8_engines, onnx_path, img_size, ir)


def _int8_path(onnx_path: str, engine: str) -> str:
    """Where :func:`run_benchmark` writes ``engine``'s int8 model: beside the float32 ONNX file."""
    return str(Path(onnx_path).with_name(f"int8_{engine}" + (".xml" if engine == "openvino" else ".onnx")))


def _write_int8(model: nn.Module, engines: Sequence[str], onnx_path: str, img_size: tuple[int, int],
                ir: Any = None) -> None:
    """Quantize the deploy model for each engine, calibrated on random images (speed does not depend on values);
    ``ir``: its OpenVINO conversion, for OpenVINO's int8."""
    from .quantize import quantize_model, random_calibration, save_int8

    for e in engines:
        save_int8(quantize_model(model, e, random_calibration(img_size), img_size=img_size, ir=ir), e,
                  _int8_path(onnx_path, e), {})


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}


def _peak_rss(config: BenchConfig, img_size: Sequence[int], batch_sizes: Sequence[int], onnx_path: str | None,
              threads: int) -> float | None:
    """Rise of this process's peak RSS (MiB) while building ``config`` and running each batch size twice."""
    from . import engines, sources  # noqa: F401  (imports and library start-up are not the configuration's cost)

    torch.set_num_threads(threads)
    if config.engine in ("onnxruntime", "openvino"):
        require(config.engine)
    if config.form == "baseline":
        _torchvision_models()
    inputs = {b: np.random.default_rng(0).standard_normal((b, 3, *img_size), dtype=np.float32) for b in batch_sizes}
    with torch.inference_mode():
        nn.functional.conv2d(torch.ones(1, 3, 8, 8), torch.ones(4, 3, 3, 3))  # starts the thread pool
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    start = _status()["VmRSS"]
    for b in batch_sizes:
        runner = _build_runner(config, b, onnx_path)
        for _ in range(2):
            runner(inputs[b])
        del runner
    return (_status()["VmHWM"] - start) / 1024


def _peak_rss_main() -> None:
    """Subprocess entry: read the job as JSON on stdin, print the peak RSS rise as JSON."""
    job = json.load(sys.stdin)
    print(json.dumps(_peak_rss(BenchConfig(**job.pop("config")), **job)))


def _peak_memory(configs: Sequence[BenchConfig], img_size: tuple[int, int], batch_sizes: Sequence[int],
                 onnx_path: str | None, threads: int) -> dict[str, float | None]:
    """Peak RSS rise of each configuration, each in a fresh Python process."""
    out = {}
    for config in configs:
        job = dict(config=asdict(config), img_size=list(img_size), batch_sizes=list(batch_sizes),
                   onnx_path=onnx_path, threads=threads)
        code = "from repvgg.deploy.benchmark import _peak_rss_main; _peak_rss_main()"
        proc = subprocess.run([sys.executable, "-c", code],
                              input=json.dumps(job), capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RepVGGError(f"memory probe for {config.label} failed: {proc.stderr.strip().splitlines()[-1:]}")
        out[config.label] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _time_interleaved(runners: Mapping[tuple[str, int], Callable[[np.ndarray], object]],
                      inputs: Mapping[int, np.ndarray], rounds: int, images_per_round: int,
                      on_round: Callable[[int], None]) -> tuple[dict[tuple[str, int], list[float]], list[float]]:
    """Per-call seconds of every (label, batch) runner over interleaved rounds, and matmul GFLOP/s per round."""
    matmul: list[float] = []

    def after_round(r: int) -> None:
        matmul.append(matmul_gflops())
        on_round(r)

    calls = {key: (lambda run=run, x=inputs[key[1]]: run(x)) for key, run in runners.items()}
    repeats = {key: max(1, images_per_round // key[1]) for key in runners}
    return time_interleaved(calls, rounds, repeats, warmup=2, after_round=after_round, inference=False), matmul


def _result_row(model: nn.Module | None, img_size: tuple[int, int], times: Mapping[int, Sequence[float]],
                machine_gflops: float, precision: str) -> dict[str, Any]:
    """Size, MACs, and per batch size: images/s (median), latency p50/p90, achieved GFLOP/s and its fraction of
    the float32 matmul rate (float32 rows only; all None where the model is unknown)."""
    macs = count_macs(model, img_size) if model is not None else None
    per_batch = {}
    for b, t in times.items():
        ips = b / statistics.median(t)
        gflops = 2 * macs * ips / 1e9 if macs else None
        fraction = gflops / machine_gflops if gflops is not None and precision == "float32" else None
        per_batch[str(b)] = {"images_per_s": ips, "latency_ms_p50": 1e3 * statistics.median(t),
                             "latency_ms_p90": 1e3 * float(np.percentile(t, 90)), "calls": len(t),
                             "gflops": gflops, "fraction_of_matmul": fraction}
    return {"params_m": count_params(model) / 1e6 if model is not None else None,
            "gmacs": macs / 1e9 if macs else None, "precision": precision, "batch": per_batch}


def run_benchmark(model: str | None = None, img_size: tuple[int, int] | None = None,
                  batch_sizes: Sequence[int] = (1, 16), rounds: int = 5, images_per_round: int = 8,
                  engines: Sequence[str] | None = None, baselines: Sequence[str] = BASELINES, train: bool = True,
                  memory: bool = True, log: Callable[[str], None] | None = None, int8: bool = False,
                  source: str | os.PathLike | None = None) -> dict[str, Any]:
    """Measure every configuration side by side; returns the JSON-ready report (see :func:`format_table`).
    ``int8`` adds each ONNX-based engine's int8 model (post-training quantized) beside its float32 row.

    The RepVGG is ``model`` (default RepVGG-A0) with random weights, or ``source``: a checkpoint (its own model;
    ``model`` names the architecture of a file that does not say) or an exported file (float32 or int8, on each
    engine that runs it). ``img_size`` defaults to the source's input size, else 224x224.
    Each round runs, per configuration and batch size, ``max(1, images_per_round // batch)`` timed calls.
    Engines whose runtime is missing are skipped and listed under ``skipped``.
    """
    from .probe import fastest_engine

    log = log or (lambda _msg: None)
    if rounds < 1 or images_per_round < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise RepVGGError("rounds, images per round and batch sizes must be positive")
    subject = bench_source(source, model, img_size) if source is not None else None
    if subject is not None and subject.format and int8:
        raise RepVGGError(f"{source} is an exported file: --int8 quantizes a checkpoint's deploy model; time the int8 "
                          f"file that `repvgg quantize` writes instead")
    model = model or "repvgg_a0"
    img_size = tuple(img_size or (subject.img_size if subject else (224, 224)))
    batch_sizes = sorted(set(batch_sizes))
    wanted = list(BENCH_ENGINES if engines is None else engines)
    skipped = _missing_runtimes(wanted)
    int8_engines, int8_skipped = _int8_engines(wanted, skipped) if int8 else ([], {})
    skipped |= int8_skipped
    configs = default_configs(model, [e for e in wanted if e not in skipped], baselines, train, int8_engines,
                              subject)
    load_before, started = os.getloadavg(), time.perf_counter()
    models, samples, matmul, peak, fixed = _measure(configs, img_size, batch_sizes, rounds, images_per_round,
                                                    int8_engines, memory, log)
    machine_gflops = statistics.median(matmul)
    results = [{**asdict(c), **_result_row(models[_model_key(c)], img_size, {b: samples[c.label, b] for b in
                                                                               batch_sizes}, machine_gflops,
                                           c.precision),
                "fixed_batch": fixed.get(c.label), "peak_rss_mib": peak.get(c.label)} for c in configs]
    report = {
        "tool": "repvgg bench", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": _title(subject.network if subject else model), "source": subject.path if subject else None,
        "img_size": list(img_size), "input_dtype": "float32",
        "precisions": sorted({r["precision"] for r in results}), "batch_sizes": batch_sizes,
        "rounds": rounds, "images_per_round": images_per_round, "machine": machine_description(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "matmul": {"size": MATMUL_SIZE, "gflops": machine_gflops, "per_round": matmul}, "method": METHOD,
        "default_engine": fastest_engine(batch_size=max(batch_sizes)), "skipped": skipped,
        **({"default_int8_engine": _fastest_int8(int8_engines)} if int8_engines else {}),
        "wall_s": time.perf_counter() - started, "results": results,
    }
    return {**report, "summary": summarize(report)}


def _title(network: str) -> str:
    """The official name of a registered architecture, the name of any other ("unknown architecture" for "")."""
    from ..models.architectures import MODEL_CONFIGS

    return MODEL_CONFIGS[network].official_name if network in MODEL_CONFIGS else network or "unknown architecture"


def _measure(configs: Sequence[BenchConfig], img_size: tuple[int, int], batch_sizes: Sequence[int], rounds: int,
             images_per_round: int, int8_engines: Sequence[str], memory: bool, log: Callable[[str], None]
             ) -> tuple[dict[ModelKey, nn.Module | None], dict[tuple[str, int], list[float]], list[float],
                        dict[str, float | None], dict[str, int | None]]:
    """Build and time every configuration: (models, per-call seconds, matmul GFLOP/s per round, peak memory, the
    fixed batch of each exported file's graph)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        models = {key: _build_model(*key) for key in dict.fromkeys(_model_key(c) for c in configs)}
        onnx_path = None
        deploy = next((_model_key(c) for c in configs if c.onnx_based), None)
        if deploy is not None:
            onnx_path = str(Path(tmp) / "deploy.onnx")
            _write_deploy_files(models[deploy], configs, int8_engines, onnx_path, img_size)
        runners, fixed = {}, {}
        for c, b in ((c, b) for c in configs for b in batch_sizes):
            if c.exported:
                artifact = _open_exported(c, b)
                runners[c.label, b], fixed[c.label] = artifact.run, artifact.batch_limit
            else:
                runners[c.label, b] = _build_runner(c, b, onnx_path, None if c.onnx_based else models[_model_key(c)])
        rng = np.random.default_rng(0)
        inputs = {b: rng.standard_normal((b, 3, *img_size), dtype=np.float32) for b in batch_sizes}
        samples, matmul = _time_interleaved(runners, inputs, rounds, images_per_round,
                                            lambda r: log(f"round {r}/{rounds} done "
                                                          f"({time.perf_counter() - started:.0f} s)"))
        del runners
        peak = {}
        if memory:
            log("measuring peak memory, one subprocess per configuration")
            peak = _peak_memory(configs, img_size, batch_sizes, onnx_path, torch.get_num_threads())
    return models, samples, matmul, peak, fixed


def _missing_runtimes(engines: Sequence[str]) -> dict[str, str]:
    """The optional engines among ``engines`` that are not installed, each with the install command."""
    return {e: f"pip install 'repvgg[{EXTRAS[e]}]'" for e in engines
            if e in ("onnxruntime", "openvino") and not is_installed(e)}


def _int8_engines(wanted: Sequence[str], skipped: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The engines of ``wanted`` whose int8 model can be built here, and install hints for the others."""
    from .engines import INT8_ENGINES
    from .quantize import int8_engines_installed

    ready = [e for e in int8_engines_installed() if e in wanted]
    return ready, {f"{e} int8": "pip install 'repvgg[quantize]'" for e in INT8_ENGINES
                   if e in wanted and e not in skipped and e not in ready}


def _fastest_int8(engines: Sequence[str]) -> str:
    from .quantize import fastest_int8_engine

    return fastest_int8_engine(engines)


def summarize(report: Mapping[str, Any]) -> dict[str, Any]:
    """Ratios at the largest batch: fastest deploy engine vs training-time model and ResNet-18, how close the
    default engine (:func:`repvgg.fastest_engine`) comes to the fastest one, and the fastest int8 row vs it."""
    batch = str(max(report["batch_sizes"]))
    results = report["results"]

    def speed(row: Mapping[str, Any] | None) -> float | None:
        return row["batch"][batch]["images_per_s"] if row else None

    deploy = [r for r in results if r["form"] == "deploy"]
    if not deploy:
        return {}
    best = max(deploy, key=speed)
    train = next((r for r in results if r["form"] == "train"), None)
    resnet18 = next((r for r in results if r["network"] == "resnet18"), None)
    default = {"torch": "torch-channels-last"}.get(report["default_engine"], report["default_engine"])
    default_row = next((r for r in deploy if r["engine"] == default), None)
    int8 = [r for r in results if r["form"] == "int8"]
    best_int8 = max(int8, key=speed) if int8 else None
    return {"batch_size": int(batch), "fastest_deploy": best["label"], "fastest_deploy_images_per_s": speed(best),
            "default_config": default_row["label"] if default_row else None,
            "deploy_vs_train": speed(best) / speed(train) if train else None,
            "deploy_vs_resnet18": speed(best) / speed(resnet18) if resnet18 else None,
            "default_vs_fastest": speed(default_row) / speed(best) if default_row else None,
            "fastest_int8": best_int8["label"] if best_int8 else None,
            "int8_vs_float32": speed(best_int8) / speed(best) if best_int8 else None}


def _fraction(stats: Mapping[str, Any]) -> str:
    return "-" if stats["fraction_of_matmul"] is None else f"{stats['fraction_of_matmul']:.0%}"


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _what(report: Mapping[str, Any]) -> str:
    """What the rows timed: the source or architecture, input size and the precisions of the rows."""
    h, w = report["img_size"]
    subject = report["model"] if not report.get("source") else f"{Path(report['source']).name} ({report['model']})"
    return f"{subject} at {h}x{w}, {' and '.join(report['precisions'])}"


def _threads(report: Mapping[str, Any]) -> str:
    n = report["machine"]["torch_threads"]
    return f"{n} thread{'s' if n != 1 else ''}"


def format_table(report: Mapping[str, Any]) -> str:
    """The report as a text table plus the machine's matmul GFLOP/s and the summary ratios."""
    sizes = [str(b) for b in report["batch_sizes"]]
    small, large = sizes[0], sizes[-1]
    head = (f"{'configuration':<40}{'params':>8}{'GMACs':>7}" + "".join(f"{'img/s b' + b:>11}" for b in sizes)
            + f"{'p50 ms b' + small:>11}{'p90 ms b' + small:>11}{'GFLOP/s b' + large:>13}{'of f32 mm':>10}"
            + f"{'peak MiB':>10}")
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        first, last = r["batch"][small], r["batch"][large]
        peak = f"{r['peak_rss_mib']:.0f}" if r["peak_rss_mib"] is not None else "n/a"
        params = _number(r["params_m"], ".2f") + ("M" if r["params_m"] is not None else "")
        lines.append(f"{r['label']:<40}{params:>8}{_number(r['gmacs'], '.2f'):>7}"
                     + "".join(f"{r['batch'][b]['images_per_s']:>11.1f}" for b in sizes)
                     + f"{first['latency_ms_p50']:>11.1f}{first['latency_ms_p90']:>11.1f}"
                     + f"{_number(last['gflops'], '.1f'):>13}{_fraction(last):>10}{peak:>10}")
    lines.append(f"{_what(report)}; {_threads(report)}, {report['rounds']} rounds, load "
                 f"average {report['load_average_before'][0]:.1f} -> {report['load_average_after'][0]:.1f}")
    lines.append(f"float32 matmul {report['matmul']['size']}x{report['matmul']['size']}: "
                 f"{report['matmul']['gflops']:.1f} GFLOP/s; 'of f32 mm' = a row's 2*MACs*img/s over that float32 "
                 f"rate (it can pass 100%: an engine's convolutions can beat torch's matmul on the same cores)"
                 + ("; int8 rows: '-', their integer operations are not float32 FLOPs" if "int8" in
                    report["precisions"] else ""))
    lines += _notes(report)
    return "\n".join(lines)


def _notes(report: Mapping[str, Any]) -> list[str]:
    """The summary ratios, exported graphs of a fixed batch size, and the engines skipped."""
    lines = []
    s = report.get("summary") or {}
    if s:
        def ratio(key: str) -> str:
            return "n/a" if s.get(key) is None else f"{s[key]:.2f}x"

        lines.append(f"batch {s['batch_size']}: fastest deploy = {s['fastest_deploy']}; vs training-time model "
                     f"{ratio('deploy_vs_train')}; vs ResNet-18 {ratio('deploy_vs_resnet18')}; default engine "
                     f"{report['default_engine']} at {ratio('default_vs_fastest')} of the fastest")
        if s.get("fastest_int8"):
            lines.append(f"batch {s['batch_size']}: fastest int8 = {s['fastest_int8']} at {ratio('int8_vs_float32')} "
                         f"the fastest float32 deploy; default int8 engine {report['default_int8_engine']}")
    for r in report["results"]:
        if r.get("fixed_batch") and r["fixed_batch"] < max(report["batch_sizes"]):
            lines.append(f"{r['label']}: the file was exported for batch {r['fixed_batch']}; larger batches run "
                         f"as calls of {r['fixed_batch']} (export with --dynamic-batch to time real batches)")
    for engine, hint in report.get("skipped", {}).items():
        lines.append(f"skipped {engine}: not installed ({hint})")
    return lines


def plot_report(report: Mapping[str, Any], path: str | os.PathLike) -> None:
    """A PNG with images/s per configuration and batch size, and peak memory per configuration when it was
    measured; the title names what was timed (file or architecture, input size, the rows' precisions)."""
    fig = report_figure(report)
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def report_figure(report: Mapping[str, Any]) -> Any:
    """The matplotlib figure of :func:`plot_report`."""
    require("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    labels = [r["label"] for r in results]
    y = np.arange(len(results))
    sizes = [str(b) for b in report["batch_sizes"]]
    memory = any(r["peak_rss_mib"] is not None for r in results)
    fig, axes = plt.subplots(1, 2 if memory else 1, figsize=(13 if memory else 10, 0.5 * len(results) + 2),
                             squeeze=False, gridspec_kw={"width_ratios": [3, 1] if memory else [1]}, sharey=True)
    ax_speed = axes[0][0]
    height = 0.8 / len(sizes)
    for i, b in enumerate(sizes):
        ax_speed.barh(y + (i - (len(sizes) - 1) / 2) * height, [r["batch"][b]["images_per_s"] for r in results],
                      height, label=f"batch {b}")
    ax_speed.set_yticks(y, labels)
    ax_speed.invert_yaxis()
    ax_speed.set_xlabel("images/s (median over rounds)")
    ax_speed.legend()
    if memory:
        axes[0][1].barh(y, [r["peak_rss_mib"] or 0 for r in results], color="gray")
        axes[0][1].set_xlabel("peak RSS rise (MiB)")
    fig.suptitle(f"{_what(report)} on {report['machine']['cpu']} ({_threads(report)}); "
                 f"float32 matmul {report['matmul']['gflops']:.0f} GFLOP/s")
    fig.tight_layout()
    return fig
