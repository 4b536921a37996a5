"""Shared fixtures: deterministic seeds and helpers to compare training-time and deploy outputs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from repvgg.demo import randomize_bn


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


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Largest absolute difference as a fraction of the reference output's largest magnitude."""
    return ((reference - other).abs().max() / reference.abs().max()).item()


def trained_looking(model: torch.nn.Module) -> torch.nn.Module:
    """Eval-mode model whose BatchNorms carry statistics and affine weights far from 0/1."""
    randomize_bn(model)
    return model.eval()
