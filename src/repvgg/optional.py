"""Optional dependencies (ONNX, ONNX Runtime, OpenVINO, matplotlib): import on demand, name the extra when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import RepVGGError

__all__ = ["EXTRAS", "require", "is_installed"]

EXTRAS = {"onnx": "onnx", "onnxruntime": "onnx", "openvino": "openvino", "matplotlib": "plot", "nncf": "quantize"}


def require(module: str) -> ModuleType:
    """Import ``module``, or raise :class:`RepVGGError` saying which ``repvgg[...]`` extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise RepVGGError(f"{top} is not installed; install it with: pip install 'repvgg[{EXTRAS.get(top, top)}]'"
                          ) from None


def is_installed(module: str) -> bool:
    """True when ``module`` imports."""
    try:
        require(module)
    except RepVGGError:
        return False
    return True
