"""Phase 1, models and conversion: blocks, architectures as data, exact re-parameterization, checkpoints."""

from .architectures import MODEL_CONFIGS, RepVGG, RepVGGConfig, create_model, list_models
from .blocks import RepVGGBlock, SqueezeExcite
from .checkpoints import load_checkpoint, model_from_checkpoint, read_checkpoint, save_checkpoint
from .reparam import reparameterize

__all__ = ["MODEL_CONFIGS", "RepVGG", "RepVGGBlock", "RepVGGConfig", "SqueezeExcite", "create_model", "list_models",
           "load_checkpoint", "model_from_checkpoint", "read_checkpoint", "reparameterize", "save_checkpoint"]
