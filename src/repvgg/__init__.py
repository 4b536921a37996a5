"""RepVGG: multi-branch training, exact structural re-parameterization, fast plain-VGG deployment."""

from ._version import __version__
from .architectures import RepVGG, RepVGGConfig, create_model, list_models
from .blocks import RepVGGBlock, SqueezeExcite
from .checkpoints import load_checkpoint, model_from_checkpoint, read_checkpoint, save_checkpoint
from .errors import RepVGGError
from .reparam import reparameterize

__all__ = [
    "__version__",
    "RepVGG",
    "RepVGGBlock",
    "RepVGGConfig",
    "RepVGGError",
    "SqueezeExcite",
    "create_model",
    "list_models",
    "load_checkpoint",
    "model_from_checkpoint",
    "read_checkpoint",
    "reparameterize",
    "save_checkpoint",
]
