"""The objective, in one place: α·content + β·Σ_l w_l·style_l + γ·tv of an image, against the
targets it holds (like pystiche's perceptual loss). The terms themselves are ``nst_core.losses``."""

from __future__ import annotations

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
    """α·content + β·style + γ·tv for one content image at one size, with its targets held.

    ``content_feats[layer]``: (1, nC, nH, nW) fp32 features of the content as optimized (RGB, or
    its luminance); ``style_grams[layer]``: (1, nC, nC) fp32 Grams normalized by nH·nW.
    """

    extractor: FeatureExtractor
    params: StyleParams
    content_feats: dict[str, Tensor]
    style_grams: dict[str, Tensor]

    @classmethod
    def build(cls, extractor: FeatureExtractor, params: StyleParams, content: Tensor,
              style_grams: dict[str, Tensor]) -> Objective:
        """Hold the targets: ``content``'s features, computed in exact fp32 (the reported fp32
        losses are measured against them), and the style Grams, moved to the extractor's device."""
        with torch.no_grad(), exact_fp32():
            feats = extractor(content, params.content_layers)
        return cls(extractor, params, {k: v.float() for k, v in feats.items()},
                   {k: g.to(extractor.device) for k, g in style_grams.items()})

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys([*self.params.content_layers, *self.params.style_layers]))

    def __call__(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """[content, style, tv, total] of image x, (1, 1|3, H, W) in [0, 1] -> (4,) fp32.

        The VGG pass runs at ``dtype`` under autocast (None: fp32). Grams and losses in fp32: a
        bf16 Gram carries ~0.4% rounding, as large as the Gram differences the style loss measures
        near convergence.
        """
        p = self.params
        with torch.autocast(self.extractor.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            feats = self.extractor(x, self.layers)
        c = weighted_sum({n: content_loss(feats[n].float(), self.content_feats[n]) for n in p.content_layers},
                         {n: 1.0 / len(p.content_layers) for n in p.content_layers})
        s = weighted_sum({n: style_loss(gram_matrix(feats[n].float(), normalize=True), self.style_grams[n])
                          for n in p.style_layers}, p.layer_weights())
        tv = tv_loss(x) if p.tv_weight > 0 else torch.zeros((), device=x.device)
        total = p.content_weight * c + p.style_weight * s + p.tv_weight * tv
        return torch.stack([c, s, tv, total])

    def measure(self, x: Tensor) -> dict[str, float]:
        """The objective of x in exact fp32 (no TF32, no autocast, no gradient), as floats."""
        with torch.no_grad(), exact_fp32():
            return dict(zip(TERMS, self(x).tolist()))
