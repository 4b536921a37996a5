"""Phase 1, models and conversion: blocks, architectures as data, exact re-parameterization, checkpoints."""

from .architectures import MODEL_CONFIGS, RepVGG, RepVGGConfig, build_model
from .blocks import RepVGGBlock, SqueezeExcite, small_batchnorm_init
from .checkpoints import (
    describe_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from .convert import ConvertResult, convert_checkpoint
from .factory import create_model, list_models
from .preprocess import create_transform, resolve_data_config
from .reparam import output_difference, relative_difference, reparameterize

__all__ = ["MODEL_CONFIGS", "ConvertResult", "build_model", "RepVGG", "RepVGGBlock", "RepVGGConfig", "SqueezeExcite",
           "convert_checkpoint", "create_model", "create_transform", "describe_checkpoint", "list_models",
           "load_checkpoint", "model_from_checkpoint", "output_difference", "read_checkpoint", "relative_difference",
           "reparameterize", "resolve_data_config", "save_checkpoint", "small_batchnorm_init"]
