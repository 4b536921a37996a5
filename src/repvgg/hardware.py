"""Measuring on the machine at hand: its CPU model and the vector/matrix extensions that decide which precision and
engine are fast, its float32 and bfloat16 matmul rates (the yardsticks that make throughput comparable across
machines), side-by-side timing of alternatives, and the cache that keeps such timings per machine."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch

from .cache import MATMUL_FILE, cache_dir, mark_used
from .files import atomic_write

__all__ = ["CPU_FEATURES", "cpu_info", "device_name", "machine_description", "measurement_key", "Timing",
           "BUSY_ELSEWHERE", "busy_elsewhere", "busy_probe_warning", "keep_speeds", "cached_speeds", "matmul_gflops",
           "matmul_measurement", "machine_matmul_gflops", "time_interleaved", "measure_throughput"]

K = TypeVar("K")
T = TypeVar("T")

# Flags (as /proc/cpuinfo names them) that change what is fastest: AVX2 only, AVX-512, VNNI int8, bf16, AMX tiles.
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_info() -> dict[str, Any]:
    """CPU model name, core count and which of :data:`CPU_FEATURES` it has (Linux; elsewhere the model only)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "features": [f for f in CPU_FEATURES if f in flags]}


def device_name(device: torch.device) -> str:
    """What a measurement on ``device`` ran on: the GPU's name, or ``cpu`` (whose model :func:`cpu_info` gives)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def machine_description() -> dict[str, Any]:
    """What a measurement ran on: CPU model and flags, cores, torch threads, and library versions."""
    from importlib import metadata

    from ._version import __version__

    versions = {"repvgg": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for package in ("onnxruntime", "openvino"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    cpu = cpu_info()
    return {"cpu": cpu["model"], "cpu_features": cpu["features"], "cpu_count": cpu["cores"],
            "torch_threads": torch.get_num_threads(), "versions": versions}


def measurement_key(what: Mapping[str, Any]) -> str:
    """The short key a cached measurement is stored under: a hash of what it depends on."""
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


class Timing(NamedTuple):
    """Speeds from :func:`cached_speeds`: whether they were read from the cache, and the share of the cores that other
    processes kept busy while they were measured (0 when read from the cache)."""

    speeds: dict[str, Any]
    cached: bool
    busy_elsewhere: float = 0.0


# a timing taken while other processes kept more than this share of the cores busy is used once, never kept
BUSY_ELSEWHERE = 0.2


def _cpu_busy_s() -> tuple[float, int] | None:
    """Busy CPU-seconds of the whole machine since boot and its CPU count, from /proc/stat (None elsewhere)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        ticks = [float(v) for v in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, IndexError, ValueError):
        return None
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), max(1, cpus)


def busy_elsewhere(run: Callable[[], T], min_wall_s: float = 0.25) -> tuple[T, float]:
    """``run()``'s result, and the share of the machine's cores that other processes kept busy meanwhile (0 where
    the kernel does not say, or for runs shorter than ``min_wall_s``, below the clock ticks' resolution)."""
    before, own, start = _cpu_busy_s(), time.process_time(), time.monotonic()
    result = run()
    after, own, wall = _cpu_busy_s(), time.process_time() - own, time.monotonic() - start
    if before is None or after is None or wall < min_wall_s:
        return result, 0.0
    return result, max(0.0, (after[0] - before[0] - own) / (wall * after[1]))


def busy_probe_warning(busy: float, chosen: str) -> str | None:
    """The warning for a speed probe timed while other processes kept more than :data:`BUSY_ELSEWHERE` of the cores
    busy (None under it): its choice ranks the modes for a loaded machine, and a run keeps it to the end."""
    if busy <= BUSY_ELSEWHERE:
        return None
    return (f"warning: other processes kept {busy:.0%} of the cores busy during the speed probe; this run keeps its "
            f"choice ({chosen}) to the end, resumes included: start it afresh on idle cores to train in the mode "
            f"fastest there")


def _read_cache(path: Path) -> dict[str, Any]:
    """A speed cache file's entries; empty when it is missing or cannot be read (it is measured again)."""
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def keep_speeds(name: str, what: Mapping[str, Any], speeds: dict[str, Any],
                path: str | os.PathLike | None = None) -> None:
    """Store ``speeds`` in the cache file ``name`` (or ``path``) under ``what`` they depend on, written atomically;
    a cache that cannot be written is left as it was."""
    path = Path(path) if path else cache_dir() / name
    cache = _read_cache(path)
    cache[measurement_key(what)] = {"machine": dict(what), "speeds": speeds,
                                    "measured": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    with contextlib.suppress(OSError):
        atomic_write(path, json.dumps(cache, indent=2) + "\n")


def cached_speeds(name: str, what: Mapping[str, Any], measure: Callable[[], dict[str, Any]],
                  path: str | os.PathLike | None = None) -> Timing:
    """A side-by-side timing of the machine at hand, kept in ``name`` in the user cache folder under ``what`` it
    depends on (CPU model and flags, threads, versions, model, sizes), so it is measured once. A timing taken while
    other processes kept the cores busy (over :data:`BUSY_ELSEWHERE`) is returned but not kept: it would rank the
    alternatives for a loaded machine forever. A cache that cannot be read is measured again; one that cannot be
    written costs a measurement per call, nothing else."""
    path = Path(path) if path else cache_dir() / name
    entry = _read_cache(path).get(measurement_key(what))
    if isinstance(entry, dict) and isinstance(entry.get("speeds"), dict):
        mark_used(path)
        return Timing(entry["speeds"], True)
    speeds, busy = busy_elsewhere(measure)
    if busy <= BUSY_ELSEWHERE:
        keep_speeds(name, what, speeds, path)
    return Timing(speeds, False, busy)


def matmul_gflops(n: int = 2048, repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of an n x n matrix multiply in ``dtype`` (float32, or bfloat16: the yardstick of bf16 autocast) on the
    current torch threads (median of ``repeats``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9



def matmul_measurement(threads: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """What a machine's matmul rate depends on: the CPU model and flags, torch's version and threads, the dtype."""
    return {**cpu_info(), "torch": torch.__version__, "threads": threads, "dtype": str(dtype).removeprefix("torch.")}


def machine_matmul_gflops(dtype: torch.dtype = torch.float32) -> float:
    """:func:`matmul_gflops` on the current torch threads, measured once per machine (kept in the user cache's
    :data:`repvgg.cache.MATMUL_FILE`): the yardstick of every training run's epoch line, which should not cost a
    second a run."""
    what = matmul_measurement(torch.get_num_threads(), dtype)
    return float(cached_speeds(MATMUL_FILE, what, lambda: {"gflops": matmul_gflops(dtype=dtype)}).speeds["gflops"])


def time_interleaved(calls: Mapping[K, Callable[[], object]], rounds: int = 5, repeats: Mapping[K, int] | int = 1,
                     warmup: int = 2, after_round: Callable[[int], None] | None = None,
                     inference: bool = True) -> dict[K, list[float]]:
    """Seconds of every call of each callable, measured side by side: every round runs each one ``repeats`` times
    in turn, starting one further along the list each round, so machine noise and ordering hit all of them alike.
    ``after_round(r)`` runs after round r (1-based); callables that train pass ``inference=False``."""
    keys = list(calls)
    times: dict[K, list[float]] = {key: [] for key in keys}
    with torch.inference_mode(inference):
        for call in calls.values():
            for _ in range(warmup):
                call()
        for r in range(rounds):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                for _ in range(repeats if isinstance(repeats, int) else repeats[key]):
                    start = time.perf_counter()
                    calls[key]()
                    times[key].append(time.perf_counter() - start)
            if after_round:
                after_round(r + 1)
    return times


def measure_throughput(runners: Mapping[str, Callable[[], object]], batch_size: int, rounds: int = 5,
                       iters_per_round: int = 3, warmup: int = 2,
                       inference: bool = True) -> dict[str, dict[str, float]]:
    """Images/s (``batch_size`` over the median call time) and median latency of each runner (a callable that
    processes one batch), timed side by side with :func:`time_interleaved`."""
    times = time_interleaved(runners, rounds, iters_per_round, warmup, inference=inference)
    return {name: {"images_per_s": batch_size / statistics.median(t), "latency_ms": 1e3 * statistics.median(t)}
            for name, t in times.items()}
