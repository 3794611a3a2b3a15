"""The objective, in one place: α·content + β·Σ_l w_l·style_l + γ·tv of an image, against the
targets it holds (like pystiche's perceptual loss). The terms themselves are ``nst_core.losses``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .backend import exact_fp32
from .losses import content_loss, gram_matrix, style_loss, tv_loss, weighted_sum
from .params import StyleParams
from .vgg import FeatureExtractor

__all__ = ["TERMS", "Objective"]

#: The entries of an objective's value, in order.
TERMS = ("content", "style", "tv", "total")


@dataclass(frozen=True, eq=False)
class Objective:
    """α·content + β·style + γ·tv for B content images of one size, each against its own targets.

    ``content_feats[layer]``: (B, nC, nH, nW) fp32 features of the contents as optimized (RGB, or
    luminance); ``style_grams[layer]``: (B, nC, nC) fp32 Grams normalized by nH·nW. Pair b's terms
    depend on image b alone, so one batched pass is B independent objectives.
    """

    extractor: FeatureExtractor
    params: StyleParams
    content_feats: dict[str, Tensor]
    style_grams: dict[str, Tensor]

    @classmethod
    def build(cls, extractor: FeatureExtractor, params: StyleParams, content: Tensor,
              style_grams: Sequence[dict[str, Tensor]]) -> Objective:
        """Hold the targets: the contents' (B, C, H, W) features, computed in exact fp32 (the reported
        fp32 losses are measured against them), and each pair's style Grams, stacked on the device."""
        with torch.no_grad(), exact_fp32():
            feats = extractor(content, params.content_layers)
        grams = {layer: torch.cat([g[layer].to(extractor.device) for g in style_grams]) for layer in params.style_layers}
        return cls(extractor, params, {k: v.float() for k, v in feats.items()}, grams)

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys([*self.params.content_layers, *self.params.style_layers]))

    def __call__(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """[content, style, tv, total] of each image, (B, 1|3, H, W) in [0, 1] -> (B, 4) fp32.

        The VGG pass runs at ``dtype`` under autocast (None: fp32). Grams and losses in fp32: a
        bf16 Gram carries ~0.4% rounding, as large as the Gram differences the style loss measures
        near convergence.
        """
        p = self.params
        with torch.autocast(self.extractor.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            feats = self.extractor(x, self.layers)
        c = weighted_sum({n: content_loss(feats[n].float(), self.content_feats[n], "none") for n in p.content_layers},
                         {n: 1.0 / len(p.content_layers) for n in p.content_layers})
        s = weighted_sum({n: style_loss(gram_matrix(feats[n].float(), normalize=True), self.style_grams[n], "none")
                          for n in p.style_layers}, p.layer_weights())
        tv = tv_loss(x, "none") if p.tv_weight > 0 else x.new_zeros(x.shape[0])
        total = p.content_weight * c + p.style_weight * s + p.tv_weight * tv
        return torch.stack([c, s, tv, total], 1)

    def measure(self, x: Tensor) -> list[dict[str, float]]:
        """Each image's objective in exact fp32 (no TF32, no autocast, no gradient), as floats."""
        with torch.no_grad(), exact_fp32():
            return [dict(zip(TERMS, row)) for row in self(x).tolist()]
