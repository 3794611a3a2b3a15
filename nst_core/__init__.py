"""prefect-nst's engine: Gatys neural style transfer on VGG16, in pure PyTorch.

Imports neither prefect nor boto3 and builds or downloads nothing at import. Names that need
torch load on first use, so ``from nst_core import StyleParams`` (flows, forms) stays light.
"""

from importlib import import_module

from .errors import ImageDecodeError, NonFiniteLossError, NSTError, WeightsError
from .params import VGG16_LAYERS, StyleParams

_LAZY = {
    "StyleProgress": "optimize",
    "StyleResult": "optimize",
    "StyleTargets": "optimize",
    "compute_style_targets": "optimize",
    "targets_need_content": "optimize",
    "stylize": "optimize",
    "gram_matrix": "losses",
    "content_loss": "losses",
    "style_loss": "losses",
    "tv_loss": "losses",
}

__all__ = ["NSTError", "ImageDecodeError", "NonFiniteLossError", "WeightsError", "StyleParams", "VGG16_LAYERS", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'nst_core' has no attribute {name!r}")
