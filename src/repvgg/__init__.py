"""RepVGG: multi-branch training, exact structural re-parameterization, fast plain-VGG deployment."""

import importlib
from typing import Any

from ._version import __version__
from .errors import RepVGGError
from .models.architectures import RepVGG, RepVGGConfig, list_models
from .models.blocks import RepVGGBlock, SqueezeExcite
from .models.checkpoints import (
    describe_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from .models.convert import ConvertResult, convert_checkpoint
from .models.factory import create_model
from .models.reparam import relative_difference, reparameterize

__all__ = [
    "__version__",
    "ConvertResult",
    "RepVGG",
    "RepVGGBlock",
    "RepVGGConfig",
    "RepVGGError",
    "SqueezeExcite",
    "convert_checkpoint",
    "create_engine",
    "create_model",
    "describe_checkpoint",
    "export_model",
    "fastest_engine",
    "list_models",
    "load_checkpoint",
    "model_from_checkpoint",
    "predict",
    "read_checkpoint",
    "relative_difference",
    "reparameterize",
    "save_checkpoint",
]

# Deployment API, imported on first use: it pulls in torchvision transforms and the optional runtimes.
_LAZY = {"create_engine": "deploy.engines", "fastest_engine": "deploy.probe", "predict": "deploy.predict",
         "export_model": "deploy.export"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
