"""Which inference engine is fastest where it runs: a short interleaved timing of a small deploy RepVGG on every
installed engine, at batch 1 and a small batch, measured once and cached per CPU (model and instruction-set flags),
torch thread count and engine versions in ``engine_probe.json`` under the user cache folder
(``$REPVGG_CACHE_DIR``, else ``~/.cache/repvgg``). No fixed order is right on every CPU: ONNX Runtime can win at
batch 1 where OpenVINO wins on batches."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata as dist_metadata
from typing import Any

import numpy as np
import torch

from ..cache import ENGINE_PROBE_FILE
from ..hardware import cached_speeds, cpu_info, measure_throughput
from .engines import ENGINES, Engine, available_engines, create_engine

__all__ = ["PROBE_BATCH_SIZES", "Speeds", "engine_measurement", "measure_engines",
           "engine_speeds", "pick_fastest", "fastest_engine"]

PROBE_BATCH_SIZES = (1, 8)
Speeds = dict[int, dict[str, float]]  # batch size -> engine -> images/s


def _version(engine: str) -> str:
    try:
        return dist_metadata.version(engine)
    except dist_metadata.PackageNotFoundError:
        return "unknown"


def engine_measurement(engines: Sequence[str], threads: int | None = None, precision: str = "float32"
                       ) -> dict[str, Any]:
    """What the engines' speeds depend on: CPU model and flags, torch threads (default: the current number), each
    engine's version, and the precision timed when it is not float32."""
    cpu = cpu_info()
    machine = {"cpu": cpu["model"], "features": cpu["features"], "threads": threads or torch.get_num_threads(),
               "engines": {e: _version(e) for e in sorted(engines)}}
    if precision != "float32":
        machine["precision"] = precision
    return machine


def measure_engines(engines: Sequence[str], img_size: tuple[int, int] = (64, 64),
                    batch_sizes: Sequence[int] = PROBE_BATCH_SIZES, rounds: int = 5,
                    build: Callable[[torch.nn.Module, str, tuple[int, int], int], Engine] = create_engine) -> Speeds:
    """Images/s of a RepVGG-A0 deploy model (random weights, small input) on each engine, timed side by side;
    ``build(model, engine, img_size, batch_size)`` makes each runner."""
    from ..models.architectures import build_model

    model = build_model("repvgg_a0", num_classes=10, deploy=True).eval()
    speeds: Speeds = {}
    for batch in batch_sizes:
        x = np.random.default_rng(0).standard_normal((batch, 3, *img_size), dtype=np.float32)
        runners = {e: build(model, e, img_size, batch) for e in engines}
        timed = measure_throughput({e: (lambda run=run, x=x: run(x)) for e, run in runners.items()}, batch, rounds,
                                   iters_per_round=2, warmup=1)
        speeds[batch] = {e: t["images_per_s"] for e, t in timed.items()}
    return speeds


def engine_speeds(engines: Sequence[str], measure: Callable[[Sequence[str]], Speeds] = measure_engines,
                  path: str | os.PathLike | None = None, precision: str = "float32") -> Speeds:
    """The engines' speeds on the machine at hand: cached when measured before with the same CPU, threads, engine
    versions and precision, else measured now with ``measure`` and cached (written atomically)."""
    machine = engine_measurement(engines, precision=precision)
    speeds = cached_speeds(ENGINE_PROBE_FILE, machine, lambda: {str(b): v for b, v in measure(engines).items()},
                           path).speeds
    return {int(b): dict(v) for b, v in speeds.items()}


def pick_fastest(names: Sequence[str], speeds: Callable[[], Speeds], batch_size: int = 1) -> str:
    """The fastest of ``names`` (in order of preference, which breaks ties) for ``batch_size`` images at a time;
    ``speeds`` (a cached probe) is asked only when there is a choice to make."""
    if len(names) <= 1:
        return names[0]
    measured = speeds()
    table = measured.get(PROBE_BATCH_SIZES[0] if batch_size == 1 else max(measured), {})
    return max(names, key=lambda e: table.get(e, 0.0))


def fastest_engine(installed: Iterable[str] | None = None, batch_size: int = 1) -> str:
    """The fastest float32 engine of ``installed`` (default: every installed engine), as a one-time probe of every
    installed engine measured it on this CPU (cached)."""
    wanted = set(available_engines() if installed is None else installed)
    names = [e for e in ENGINES if e in wanted] or ["torch"]
    return pick_fastest(names, lambda: engine_speeds(available_engines()), batch_size)
