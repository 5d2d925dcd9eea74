"""Model registry and every model family medmix ships.

>>> from medmix.models import create_model, list_models
>>> model = create_model("hybrid_mixer_small", num_classes=2, in_chans=1, img_size=28)
"""
from ._registry import ModelInfo, create_model, list_models, model_info, register_model
from . import hybrid_mixer  # noqa: F401  (registers models)
from . import cnn_transformer  # noqa: F401
from . import resnet  # noqa: F401
from . import medvit  # noqa: F401

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
