"""Shared fixtures: deterministic seeds, one compute thread, and models with trained-looking BatchNorms."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from repvgg.models.reparam import randomize_bn


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, the workers share the cores: each gets its share of torch threads, not all of them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# the longest files (a minute or more each on a 2-core CPU), longest first; the rest follow in their usual order.
# ``make test`` hands whole files to the xdist workers in collection order (--no-loadscope-reorder; by default xdist
# puts the files with the most tests first), so that no long file starts last while the other worker runs dry
LONGEST_FIRST = ("test_train.py", "test_resume.py", "test_architectures.py", "test_quantization_study.py",
                 "test_quantize.py", "test_outputs.py", "test_benchmark.py", "test_qat.py", "test_backbone.py",
                 "test_cifar10_benchmark.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of :data:`LONGEST_FIRST` first, in that order; the order within a file is kept."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Train with one torch thread: with other processes on the cores, more threads are far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


FIXED_ENGINE_SPEEDS = {"1": {"openvino": 3.0, "onnxruntime": 2.0, "torch": 1.0},
                       "8": {"openvino": 3.0, "onnxruntime": 2.0, "torch": 1.0}}


FIXED_MATMUL_GFLOPS = {"float32": 100.0, "bfloat16": 50.0}


@pytest.fixture(autouse=True, scope="session")
def _user_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh REPVGG_CACHE_DIR per session (nothing lands in ~/.cache), its engine probe and matmul rates seeded
    with fixed figures for every thread count, so that no test waits for, or depends on, a real timing."""
    from repvgg.cache import ENGINE_PROBE_FILE, MATMUL_FILE
    from repvgg.deploy.engines import available_engines
    from repvgg.deploy.probe import engine_measurement
    from repvgg.hardware import keep_speeds, matmul_measurement

    cache = tmp_path_factory.mktemp("repvgg-cache")
    engines = available_engines()
    speeds = {b: {e: v for e, v in table.items() if e in engines} for b, table in FIXED_ENGINE_SPEEDS.items()}
    for threads in range(1, (os.cpu_count() or 1) + 1):
        keep_speeds(ENGINE_PROBE_FILE, engine_measurement(engines, threads), speeds, cache / ENGINE_PROBE_FILE)
        for dtype, gflops in FIXED_MATMUL_GFLOPS.items():
            keep_speeds(MATMUL_FILE, matmul_measurement(threads, getattr(torch, dtype)), {"gflops": gflops},
                        cache / MATMUL_FILE)
    patch = pytest.MonkeyPatch()
    patch.setenv("REPVGG_CACHE_DIR", str(cache))
    yield cache
    patch.undo()


def trained_looking(model: torch.nn.Module) -> torch.nn.Module:
    """Eval-mode model whose BatchNorms carry statistics and affine weights far from 0/1."""
    randomize_bn(model)
    return model.eval()


def fit_colours(model: torch.nn.Module, data: Path, preprocess: dict, steps: int) -> torch.nn.Module:
    """``model`` trained ``steps`` Adam steps to name each image's dominant colour (the test folders' classes);
    returned in eval mode."""
    from repvgg.deploy.quantize import calibration_batches
    from repvgg.models.preprocess import preprocess_settings

    x = torch.from_numpy(np.concatenate(calibration_batches(data, preprocess_settings(preprocess), 24)))
    labels = x.mean((2, 3)).argmax(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), labels).backward()
        optimizer.step()
    return model.eval()
