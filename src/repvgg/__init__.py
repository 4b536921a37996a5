"""RepVGG: multi-branch training, exact structural re-parameterization, fast plain-VGG deployment.

Every public name is imported on first use, so that ``import repvgg`` (and ``repvgg --version``) stays instant.
"""

import importlib
from typing import Any

from ._version import __version__
from .errors import RepVGGError

# public name -> the module that defines it
_LAZY = {
    "RepVGG": "models.architectures", "RepVGGConfig": "models.architectures",
    "RepVGGBlock": "models.blocks", "SqueezeExcite": "models.blocks", "small_batchnorm_init": "models.blocks",
    "describe_checkpoint": "models.checkpoints", "load_checkpoint": "models.checkpoints",
    "model_from_checkpoint": "models.checkpoints", "read_checkpoint": "models.checkpoints",
    "save_checkpoint": "models.checkpoints",
    "ConvertResult": "models.convert", "convert_checkpoint": "models.convert",
    "create_model": "models.factory", "list_models": "models.factory",
    "create_transform": "models.preprocess", "resolve_data_config": "models.preprocess",
    "output_difference": "models.reparam", "relative_difference": "models.reparam", "reparameterize": "models.reparam",
    "create_engine": "deploy.engines", "fastest_engine": "deploy.probe", "predict": "deploy.predict",
    "export_model": "deploy.export",
}

__all__ = ["__version__", "RepVGGError", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
