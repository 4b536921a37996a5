"""Speed measurement: interleaved rounds over several models on the same input, reported as medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch

__all__ = ["measure_throughput"]


def measure_throughput(runners: Mapping[str, Callable[[], object]], batch_size: int, rounds: int = 5,
                       iters_per_round: int = 3, warmup: int = 2) -> dict[str, dict[str, float]]:
    """Images/s of each runner (a no-argument callable that processes one batch), measured side by side.

    Every round times each runner in turn, so machine noise hits all of them alike; returns per-runner
    ``images_per_s`` (median over rounds) and ``latency_ms`` (median per-batch time).
    """
    with torch.inference_mode():
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
