"""prefect-nst's engine: Gatys neural style transfer on VGG16, in pure PyTorch.

Imports neither prefect nor boto3 and builds or downloads nothing at import.
"""

from .errors import ImageDecodeError, NonFiniteLossError, NSTError, WeightsError
from .losses import content_loss, gram_matrix, style_loss, tv_loss
from .optimize import StyleProgress, StyleResult, StyleTargets, compute_style_targets, stylize
from .params import VGG16_LAYERS, StyleParams

__all__ = [
    "NSTError",
    "ImageDecodeError",
    "NonFiniteLossError",
    "WeightsError",
    "StyleParams",
    "VGG16_LAYERS",
    "StyleProgress",
    "StyleResult",
    "StyleTargets",
    "compute_style_targets",
    "stylize",
    "gram_matrix",
    "content_loss",
    "style_loss",
    "tv_loss",
]
