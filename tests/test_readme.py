"""Every ```python block of the README runs as pasted (offline, in a scratch folder, in a few seconds)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


def test_readme_has_python_examples_without_placeholders() -> None:
    """An Ellipsis (``class_names=[...]``) would run, yet mean nothing; comments may abbreviate."""
    assert BLOCKS
    for block in BLOCKS:
        assert not any(isinstance(node, ast.Constant) and node.value is Ellipsis for node in ast.walk(ast.parse(block)))


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
