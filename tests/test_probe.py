"""The default engine is the fastest one where it runs: a one-time probe, cached per CPU, thread count and engine
versions, and kept only when measured on otherwise idle cores. Tests inject the timings (a cache file, or the measuring
function); none depends on a real timing, and the one about load spins a process on every core."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repvgg import hardware
from repvgg.cache import ENGINE_PROBE_FILE, MATMUL_FILE
from repvgg.deploy.engines import available_engines
from repvgg.deploy.probe import engine_measurement, engine_speeds, fastest_engine, measure_engines
from repvgg.hardware import (
    BUSY_ELSEWHERE,
    busy_probe_warning,
    cached_speeds,
    keep_speeds,
    machine_matmul_gflops,
    measurement_key,
)


def seed_probe(cache: Path, speeds: dict[str, dict[str, float]]) -> None:
    keep_speeds(ENGINE_PROBE_FILE, engine_measurement(available_engines()), speeds, cache / ENGINE_PROBE_FILE)


def test_default_engine_follows_the_measured_speeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not {"onnxruntime", "openvino"} <= set(available_engines()):
        pytest.skip("needs onnxruntime and openvino")
    monkeypatch.setenv("REPVGG_CACHE_DIR", str(tmp_path))
    # as once measured on a 2-core machine: ONNX Runtime ahead at batch 1, OpenVINO ahead on batches
    seed_probe(tmp_path, {"1": {"onnxruntime": 48.9, "openvino": 45.4, "torch": 9.0},
                          "8": {"onnxruntime": 49.4, "openvino": 52.0, "torch": 12.0}})
    assert fastest_engine() == "onnxruntime" and fastest_engine(batch_size=16) == "openvino"
    assert fastest_engine(["torch", "openvino"]) == "openvino" and fastest_engine(["torch"]) == "torch"
    seed_probe(tmp_path, {"1": {"onnxruntime": 1.0, "openvino": 2.0, "torch": 3.0},
                          "8": {"onnxruntime": 1.0, "openvino": 2.0, "torch": 3.0}})
    assert fastest_engine() == "torch" and fastest_engine(batch_size=4) == "torch"


def test_probe_runs_once_per_machine_and_engine_set(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def measure(engines):
        calls.append(list(engines))
        return {1: {e: float(i + 1) for i, e in enumerate(engines)}, 8: {e: 1.0 for e in engines}}

    path = tmp_path / "sub" / ENGINE_PROBE_FILE
    first = engine_speeds(["torch", "onnxruntime"], measure, path)
    assert first == engine_speeds(["torch", "onnxruntime"], measure, path) and len(calls) == 1
    entry = next(iter(json.loads(path.read_text()).values()))
    assert entry["machine"]["engines"].keys() == {"torch", "onnxruntime"} and entry["machine"]["cpu"]
    engine_speeds(["torch"], measure, path)  # another engine set: measured, kept beside the first
    assert len(calls) == 2 and len(json.loads(path.read_text())) == 2
    path.write_text("{cut short")
    engine_speeds(["torch"], measure, path)
    assert len(calls) == 3 and len(json.loads(path.read_text())) == 1
    assert [p.name for p in path.parent.iterdir()] == [ENGINE_PROBE_FILE]  # written atomically, no temporaries left


def test_the_engine_measurement_names_threads_and_engines() -> None:
    machine = engine_measurement(["torch"], threads=1)
    assert machine["threads"] == 1 and machine["engines"]["torch"] != "unknown"
    one = measurement_key(machine)
    assert one != measurement_key(engine_measurement(["torch"], threads=2))
    assert one != measurement_key(engine_measurement(["torch", "openvino"], threads=1))


def test_the_real_probe_measures_each_engine() -> None:
    speeds = measure_engines(["torch"], img_size=(32, 32), batch_sizes=(1, 2), rounds=1)
    assert set(speeds) == {1, 2} and all(speeds[b]["torch"] > 0 for b in speeds)


SPIN = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end:\n    pass"


def test_a_timing_taken_beside_busy_cores_chooses_once_and_is_not_kept(tmp_path: Path) -> None:
    """Measured while a spinning process held every core, speeds are returned but not cached; measured alone (a
    measurement too short to be judged counts as alone), they are kept and read back."""
    path = tmp_path / "speeds.json"

    def beside_spinning_processes() -> dict[str, float]:
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(os.cpu_count() or 1)]
        assert all(p.wait() == 0 for p in spinners)
        return {"torch": 1.0}

    busy = cached_speeds(path.name, {"cpu": "test"}, beside_spinning_processes, path)
    assert busy.speeds == {"torch": 1.0} and not busy.cached and busy.busy_elsewhere > BUSY_ELSEWHERE
    assert not path.exists()
    alone = cached_speeds(path.name, {"cpu": "test"}, lambda: {"torch": 2.0}, path)
    assert alone.speeds == {"torch": 2.0} and not alone.cached and alone.busy_elsewhere == 0.0
    again = cached_speeds(path.name, {"cpu": "test"}, lambda: {"torch": 3.0}, path)
    assert again.speeds == {"torch": 2.0} and again.cached


@pytest.mark.parametrize(("busy", "warned"), [(0.0, False), (BUSY_ELSEWHERE, False), (0.21, True), (1.0, True)])
def test_only_a_probe_on_cores_busy_over_the_limit_is_warned_about(busy: float, warned: bool) -> None:
    warning = busy_probe_warning(busy, "bf16 channels-last 2 threads")
    assert (warning is not None) is warned
    if warned:
        assert f"kept {busy:.0%} of the cores busy" in warning and "(bf16 channels-last 2 threads)" in warning


def test_the_matmul_rate_is_measured_once_per_machine_threads_and_dtype(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Every training run's yardstick is read from the user cache after its first measurement."""
    monkeypatch.setenv("REPVGG_CACHE_DIR", str(tmp_path))
    measured: list[tuple[int, torch.dtype]] = []

    def fake(dtype: torch.dtype = torch.float32) -> float:
        measured.append((torch.get_num_threads(), dtype))
        return 40.0 + len(measured)

    monkeypatch.setattr(hardware, "matmul_gflops", fake)
    monkeypatch.setattr(hardware, "busy_elsewhere", lambda run: (run(), 0.0))
    threads = torch.get_num_threads()
    try:
        assert [machine_matmul_gflops() for _ in range(2)] == [41.0, 41.0]
        assert machine_matmul_gflops(torch.bfloat16) == 42.0
        torch.set_num_threads(threads + 1)
        assert machine_matmul_gflops() == 43.0
    finally:
        torch.set_num_threads(threads)
    assert machine_matmul_gflops() == 41.0 and len(measured) == 3
    assert (tmp_path / MATMUL_FILE).is_file()
