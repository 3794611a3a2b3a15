"""Style targets: the style images' Grams at every scale, computed once and reusable.

A batch computes them once per distinct style and device (``tasks.compute``) and passes them
to ``stylize``; their ``key`` says what else they depend on, so mismatched targets are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from .backend import exact_fp32, resolve_precision, run_settings
from .colour import luminance, match_color, match_luminance
from .errors import NSTError
from .imageio import check_min_side, resize_longest, split_alpha, to_tensor
from .losses import gram_matrix
from .params import StyleParams
from .schedule import scale_sizes
from .tiling import tiled_grams, tiling_for
from .vgg import FeatureExtractor, Opener, extractor_for

__all__ = ["StyleTargets", "compute_style_targets", "targets_key", "targets_need_content", "style_tensor"]


@dataclass(frozen=True, eq=False)
class StyleTargets:
    """Blended, position-normalized style Grams per scale, computed once and reusable.

    ``by_size[longest_side][layer]`` is a (1, nC, nC) fp32 Gram of the style resized to that
    scale. ``key`` records what the Grams depend on besides the style images; ``stylize``
    refuses targets whose key does not match its params.
    """

    by_size: dict[int, dict[str, Tensor]]
    key: tuple

    @property
    def grams(self) -> dict[str, Tensor]:
        """The Grams at the output size (the finest scale)."""
        return self.by_size[max(self.by_size)]


def targets_need_content(params: StyleParams) -> bool:
    """Whether style targets depend on the content image (then they cannot be shared by pairs).

    histogram matches the style's colours to the content; luminance matches the style's
    luminance mean and σ to the content's.
    """
    return params.preserve_color in ("histogram", "luminance")


def targets_key(params: StyleParams, extractor: FeatureExtractor, n_styles: int) -> tuple:
    """What style targets depend on besides the style images themselves (hashable)."""
    return (
        extractor.weights_id,
        params.pooling,
        tuple(params.style_layers),
        tuple(scale_sizes(params)),
        params.preserve_color,
        tuple(params.blend_weights(n_styles)),
        # not the tiling: targets are tiled with the exact halo, the untiled Grams
    )


def style_tensor(img: Image.Image, size: int, params: StyleParams, device: torch.device,
                  content: Tensor | None, name: str = "style", content_alpha: Tensor | None = None) -> Tensor:
    """A style image prepared as the optimization sees it (size, luminance, colours matched to the
    content's visible pixels: ``content_alpha``, (1, 1, H, W) in [0, 1] beside ``content``).

    At the output size a style thinner than the deepest style layer needs is refused, naming it.
    At a coarser scale it is enlarged to that minimum instead (differs from Gatys et al., who have
    no coarse scales) (its Grams are means over positions,
    so a slightly larger style image gives comparable targets).
    """
    rgb = resize_longest(split_alpha(img).rgb, size)
    # Only the style layers see the style: a deeper content layer must not refuse a thin style
    # (nor change its Grams, which targets_key does not cover).
    need = params.style_min_side()
    if size >= params.image_size:
        check_min_side(rgb.size, need, name)
    elif min(rgb.size) < need:
        rgb = split_alpha(img).rgb
        factor = need / min(rgb.size)
        rgb = rgb.resize((max(need, round(rgb.width * factor)), max(need, round(rgb.height * factor))),
                         Image.Resampling.LANCZOS)
    s = to_tensor(rgb, device)
    if params.preserve_color == "none":
        return s
    if content is None:
        raise NSTError(f"preserve_color={params.preserve_color!r} matches the style to each content: "
                       "targets are per pair")
    if params.preserve_color == "luminance":
        return match_luminance(luminance(s), luminance(content), content_alpha)
    return match_color(s, content, content_alpha)


def _grams(extractor: FeatureExtractor, style: Tensor, params: StyleParams) -> dict[str, Tensor]:
    """Position-normalized fp32 Grams of one prepared style image (1, C, H, W), tiled as the
    optimization would tile an image of its size (a print-size style fits where its output does)."""
    tiling = tiling_for(params, *style.shape[-2:], extractor.device)
    features = lambda x: extractor(x, params.style_layers)  # noqa: E731
    if tiling is not None:
        return tiled_grams(features, style, tiling.grid(*style.shape[-2:], exact=True))
    return {layer: gram_matrix(f.float(), normalize=True) for layer, f in features(style).items()}


def compute_style_targets(
    style: Image.Image | Sequence[Image.Image],
    params: StyleParams,
    *,
    extractor: FeatureExtractor | None = None,
    opener: Opener | None = None,
    content: Tensor | None = None,
    style_names: Sequence[str] | None = None,
    content_alpha: Tensor | None = None,
) -> StyleTargets:
    """Style Grams at every scale, blended over several style images by ``style_blend_weights``.

    Ĝ = Σ_i w_i·gram(a_l(S_i)) / (nH·nW) per style layer l and scale, in fp32 whatever the run's
    precision (computed once per style; the generated image's Grams are matched to exact
    targets). ``content`` (RGB, (1, 3, H, W)) is only needed, and only allowed to matter, with
    ``preserve_color`` histogram or luminance; ``content_alpha`` ((1, 1, H, W) in [0, 1]) then
    leaves its transparent pixels out of the colours matched. ``style_names`` name the styles in errors.
    """
    styles = [style] if isinstance(style, Image.Image) else list(style)
    if not styles:
        raise NSTError("at least one style image is needed")
    extractor = extractor or extractor_for(params, opener=opener)
    weights = params.blend_weights(len(styles))
    names = list(style_names or [f"style image {i + 1}" if len(styles) > 1 else "style image"
                                 for i in range(len(styles))])
    if len(names) != len(styles):  # zip would drop the styles past the names, and their weights' share
        raise ValueError(f"{len(names)} style_names for {len(styles)} styles")
    by_size: dict[int, dict[str, Tensor]] = {}
    # Under the run's deterministic setting, and in exact fp32 (no TF32) whatever the precision:
    # the batch tasks call this outside stylize(), once per style and device.
    device = extractor.device
    with run_settings(device, resolve_precision(params.precision, device, params.image_size), params.deterministic), \
            exact_fp32(), torch.no_grad():
        for size in scale_sizes(params):
            grams: dict[str, Tensor] = {}
            for img, w, name in zip(styles, weights, names):
                style_in = style_tensor(img, size, params, device, content, name, content_alpha)
                for layer, g in _grams(extractor, style_in, params).items():
                    grams[layer] = grams[layer] + w * g if layer in grams else w * g
            by_size[size] = grams
    return StyleTargets(by_size, targets_key(params, extractor, len(styles)))
