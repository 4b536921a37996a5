"""Measuring on the machine at hand: its CPU model and the vector/matrix extensions that decide which precision and
engine are fast, its float32 matmul rate (the yardstick that makes throughput comparable across machines), and
side-by-side timing of alternatives."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["CPU_FEATURES", "cpu_info", "matmul_gflops", "measure_throughput"]

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


def matmul_gflops(n: int = 2048, repeats: int = 3) -> float:
    """Float32 GFLOP/s of an n x n matrix multiply on the current torch threads (median of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def measure_throughput(runners: Mapping[str, Callable[[], object]], batch_size: int, rounds: int = 5,
                       iters_per_round: int = 3, warmup: int = 2,
                       inference: bool = True) -> dict[str, dict[str, float]]:
    """Images/s of each runner (a no-argument callable that processes one batch), measured side by side.

    Every round times each runner in turn, so machine noise hits all of them alike; returns per-runner
    ``images_per_s`` (median over rounds) and ``latency_ms`` (median per-batch time). Runners that train
    (need autograd) pass ``inference=False``.
    """
    with torch.inference_mode(inference):
        for run in runners.values():
            for _ in range(warmup):
                run()
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(rounds):
            for name, run in runners.items():
                start = time.perf_counter()
                for _ in range(iters_per_round):
                    run()
                times[name].append((time.perf_counter() - start) / iters_per_round)
    return {name: {"images_per_s": batch_size / statistics.median(t), "latency_ms": 1e3 * statistics.median(t)}
            for name, t in times.items()}
