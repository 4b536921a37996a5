"""Every benchmark script's --help: its usage examples as written, a help line for every option, and the defaults."""

from __future__ import annotations

import importlib.util

import pytest

from imagefolders import REPO

SCRIPTS = ["cifar10", "ablation", "quantization", "deploy_speed", "exactness", "segmentation", "train_speed"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_help", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_option_has_help_and_shows_its_default(name: str) -> None:
    module = load(name)
    parser = module.build_parser()
    assert all(action.help for action in parser._actions), name
    text = parser.format_help()
    example = next(line for line in module.__doc__.splitlines() if line.startswith("    "))
    assert example in text  # the docstring's usage examples are kept as written, not re-wrapped
    assert "(default: " in text and "(default: None)" not in text and "(default: False)" not in text
