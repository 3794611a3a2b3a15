"""prefect-nst's engine: Gatys neural style transfer on VGG16, in pure PyTorch.

Imports neither prefect nor boto3 and builds or downloads nothing at import. Names that need
torch load on first use, so ``from nst_core import StyleParams`` (flows, forms) stays light.

Where things are: ``optimize`` (stylize: the loop in named steps), ``objective`` (α·content +
β·style + γ·tv), ``losses`` (the terms), ``targets`` (style Grams per scale), ``schedule``
(coarse-to-fine sizes and budgets), ``backend`` (precision, TF32/determinism switches),
``colour``, ``vgg`` (the feature extractor), ``weights`` (sources and verification),
``pooling``, ``imageio`` (bytes <-> images <-> tensors), ``params``, ``errors``, ``cli``.
"""

from importlib import import_module

from .errors import (DeviceMemoryError, ImageDecodeError, ImageTooSmallError, NonFiniteLossError, NSTError, ParamsError,
                     WeightsError)
from .params import VGG16_LAYERS, StyleParams

_LAZY = {
    "StyleProgress": "optimize",
    "StyleResult": "optimize",
    "stylize": "optimize",
    "stylize_many": "optimize",
    "StylePair": "optimize",
    "presized": "optimize",
    "StyleTargets": "targets",
    "compute_style_targets": "targets",
    "targets_need_content": "targets",
    "targets_key": "targets",
    "Objective": "objective",
    "extractor_for": "vgg",
    "gram_matrix": "losses",
    "content_loss": "losses",
    "style_loss": "losses",
    "tv_loss": "losses",
}

__all__ = ["NSTError", "ParamsError", "DeviceMemoryError", "ImageDecodeError", "ImageTooSmallError", "NonFiniteLossError", "WeightsError", "StyleParams", "VGG16_LAYERS", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'nst_core' has no attribute {name!r}")
