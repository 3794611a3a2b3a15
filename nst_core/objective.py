"""The objective, in one place: α·content + β·Σ_l w_l·style_l + γ·tv of an image, against the
targets it holds (like pystiche's perceptual loss). The terms themselves are ``nst_core.losses``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .backend import exact_fp32
from .losses import content_loss, gram_matrix, style_loss, style_loss_through, tv_loss, weighted_sum
from .params import StyleParams, layer_factor
from .tiling import Tile, Tiling, positions, tiled_features, tiled_maps
from .vgg import FeatureExtractor

__all__ = ["TERMS", "Objective", "LossScale"]

#: The entries of an objective's value, in order.
TERMS = ("content", "style", "tv", "total")


@dataclass
class LossScale:
    """fp16's dynamic loss scale (as torch.amp.GradScaler's), one per pair of a step: start at
    ``start`` (2^16), halve a pair's on its overflowing gradient, double it after GROW_EVERY
    evaluations without one, at most 2^24. Per pair, as separate stylize calls have it: one
    shared scale let a step-mate's overflowing gradient (a noisy style) halve a pair's scale down
    to where its own small gradients round to zero."""

    start: float = 2.0**16
    values: Tensor | None = None  # (B,) float32, on the pairs' device
    good: Tensor | None = None  # (B,) evaluations since the last halving or doubling
    GROW_EVERY = 100

    def reset(self, value: float) -> None:
        """Every pair's scale ``value`` from the next evaluation on."""
        self.start, self.values, self.good = value, None, None

    def of(self, x: Tensor) -> Tensor:
        """The (B,) scales of the B images ``x``."""
        if self.values is None or self.values.shape[0] != x.shape[0]:
            self.values = torch.full((x.shape[0],), self.start, dtype=torch.float32, device=x.device)
            self.good = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        return self.values

    def overflowed(self, which: Tensor) -> None:
        """Halve the scales of the pairs ``which`` (B,) bool marks."""
        self.values = torch.where(which, self.values / 2, self.values)
        self.good = torch.where(which, 0, self.good)

    def passed(self) -> None:
        self.good = self.good + 1
        grow = self.good >= self.GROW_EVERY
        self.values = torch.where(grow, (self.values * 2).clamp(max=2.0**24), self.values)
        self.good = torch.where(grow, 0, self.good)


@dataclass(frozen=True, eq=False)
class Objective:
    """α·content + β·style + γ·tv for B content images of one size, each against its own targets.

    ``content_feats[layer]``: (B, nC, nH, nW) fp32 features of the contents as optimized (RGB, or
    luminance); ``style_grams[layer]``: (B, nC, nC) fp32 Grams normalized by nH·nW. Pair b's terms
    depend on image b alone, so one batched pass is B independent objectives. With a ``tiling``
    the VGG pass runs tile by tile (``nst_core.tiling``): less memory, the same objective with the
    exact halo, a close approximation of its gradient with a smaller one (the default).
    """

    extractor: FeatureExtractor
    params: StyleParams
    content_feats: dict[str, Tensor]
    style_grams: dict[str, Tensor]
    tiling: Tiling | None = None
    loss_scale: LossScale = field(default_factory=lambda: LossScale())

    @classmethod
    def build(cls, extractor: FeatureExtractor, params: StyleParams, content: Tensor,
              style_grams: Sequence[dict[str, Tensor]], tiling: Tiling | None = None) -> Objective:
        """Hold the targets: the contents' (B, C, H, W) features, computed in exact fp32 (the reported
        fp32 losses are measured against them), and each pair's style Grams, stacked on the device."""
        features = lambda x: extractor(x, params.content_layers)  # noqa: E731
        with torch.no_grad(), exact_fp32():
            feats = (features(content) if tiling is None
                     else tiled_maps(features, content, tiling.grid(*content.shape[-2:], exact=True)))
        grams = {layer: torch.cat([g[layer].to(extractor.device) for g in style_grams]) for layer in params.style_layers}
        return cls(extractor, params, {k: v.float() for k, v in feats.items()}, grams, tiling)

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys([*self.params.content_layers, *self.params.style_layers]))

    def _vgg(self, x: Tensor, dtype: torch.dtype | None,
             through: Mapping[str, Callable[[Tensor], Tensor]] | None = None) -> dict[str, Tensor]:
        """The layers' activations, the VGG pass at ``dtype`` (None: fp32) on weights stored in it
        (``FeatureExtractor.cast``: what autocast computes, without recasting the weights each call)."""
        return (self.extractor if dtype is None else self.extractor.cast(dtype))(x, self.layers, through)

    def __call__(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """[content, style, tv, total] of each image, (B, 1|3, H, W) in [0, 1] -> (B, 4) fp32.

        The VGG pass runs at ``dtype`` (None: fp32); each style layer's loss is taken as the pass
        goes (``losses.style_loss_through``). Grams and losses in fp32: a
        bf16 Gram carries ~0.4% rounding, as large as the Gram differences the style loss measures
        near convergence. Tiled, the value carries no gradient (``value_and_grad`` computes it)
        and is the untiled value (tiles with the exact halo).
        """
        if self.tiling is not None:
            with torch.no_grad():
                return self._tiled_terms(x, dtype, self.tiling.grid(*x.shape[-2:], exact=True))[0]
        p = self.params
        style: dict[str, Tensor] = {}

        def through(layer: str):
            def tap(features: Tensor) -> Tensor:
                features, style[layer] = style_loss_through(features, self.style_grams[layer])
                return features
            return tap

        feats = self._vgg(x, dtype, {n: through(n) for n in p.style_layers})
        c = weighted_sum({n: content_loss(feats[n].float(), self.content_feats[n], "none") for n in p.content_layers},
                         {n: 1.0 / len(p.content_layers) for n in p.content_layers})
        return self._total(x, c, weighted_sum(style, p.layer_weights()))

    def _total(self, x: Tensor, c: Tensor, s: Tensor) -> Tensor:
        p = self.params
        tv = tv_loss(x, "none") if p.tv_weight > 0 else x.new_zeros(x.shape[0])
        return torch.stack([c, s, tv, p.content_weight * c + p.style_weight * s + p.tv_weight * tv], 1)

    def value_and_grad(self, x: Tensor, dtype: torch.dtype | None = None, evaluation: int = 0) -> Tensor:
        """Each image's terms (B, 4), detached, with ∂total_b/∂x_b accumulated into ``x.grad``.

        Tiled, in two passes over tiles whose grid shifts with ``evaluation`` (``Tiling.offset``):
        the first, without gradient, sums the whole image's Grams G_l and the content error; the
        second backpropagates each tile alone through its share of the objective's linearization
        at G: ⟨∂L/∂G_l, G_l,tile⟩ + its content error. Since G_l = Σ_t G_l,t, the tiles' gradients
        sum to the untiled gradient (exactly, with a halo of ``tiling.exact_halo``).

        fp16: the backward runs on each pair's total times its ``loss_scale`` (a per-activation
        gradient is ~1/(nH·nW·nC), under fp16's smallest normal at 512 px, and would round to zero
        unnoticed); an overflowing pair's scale is halved and the evaluation redone. This reads
        the device each evaluation.
        """
        if dtype != torch.float16:
            return self._value_and_grad(x, dtype, evaluation, 1.0)
        while True:
            scale = self.loss_scale.of(x)
            terms = self._value_and_grad(x, dtype, evaluation, scale)
            # per pair: a pair whose loss is not finite fails alone, and must not keep the others'
            # overflowing gradients from a smaller scale
            finite = torch.isfinite(terms).all(1)
            overflowed = finite & ~torch.isfinite(x.grad).flatten(1).all(1) & (scale > 1)
            if bool(overflowed.any()):
                self.loss_scale.overflowed(overflowed)
                x.grad = None
                continue
            self.loss_scale.passed()
            x.grad.div_(scale.view(-1, *[1] * (x.dim() - 1)))
            return terms

    def _value_and_grad(self, x: Tensor, dtype: torch.dtype | None, evaluation: int, scale: float | Tensor) -> Tensor:
        """``scale``: 1.0, or each pair's (B,) loss scale (fp16)."""
        if self.tiling is None:
            terms = self(x, dtype)
            (terms[:, 3] * scale).sum().backward()  # pair b's gradient is that of its own total
            return terms.detach()
        p = self.params
        height, width = x.shape[-2:]
        tiles = self.tiling.grid(height, width, self.tiling.offset(p.seed, evaluation))
        with torch.no_grad():
            terms, grams = self._tiled_terms(x, dtype, tiles)
        # ∂(β·w_l·style_l)/∂Ĝ_l, style_l = ‖Ĝ_l − S_l‖²/(4·nC²) (losses.style_loss)
        slopes = {n: p.style_weight * w * (grams[n] - self.style_grams[n]) / (2 * grams[n].shape[-1] ** 2)
                  for n, w in p.layer_weights().items()}
        height, width = x.shape[-2:]
        for tile, feats in tiled_features(lambda crop: self._vgg(crop, dtype), x, tiles):
            # (B,): each pair's share, times its own scale
            share = sum((slopes[n] * gram_matrix(feats[n].float())).flatten(1).sum(1) / positions(n, height, width)
                        for n in p.style_layers)
            for n in p.content_layers:
                share = share + p.content_weight / len(p.content_layers) * self._content_error(tile, n, feats[n], x)
            (share * scale).sum().backward()
            del feats, share
        if p.tv_weight > 0:
            (p.tv_weight * scale * tv_loss(x, "none")).sum().backward()
        return terms

    def _content_error(self, tile: Tile, layer: str, core: Tensor, x: Tensor) -> Tensor:
        """This tile's share of each pair's content_loss, (B,): ½·Σ_core (a_G − a_C)² / (nH·nW·nC)."""
        error = (core.float() - self._target(tile, layer, core)).pow(2).flatten(1).sum(1)
        return 0.5 * error / (positions(layer, *x.shape[-2:]) * core.shape[1])

    def _target(self, tile: Tile, layer: str, core: Tensor) -> Tensor:
        """The content features under a tile's core (B, nC, h, w)."""
        r, c = tile.origin(layer_factor(layer))
        return self.content_feats[layer][..., r:r + core.shape[-2], c:c + core.shape[-1]]

    def _tiled_terms(self, x: Tensor, dtype: torch.dtype | None, tiles: list[Tile]) -> tuple[Tensor, dict[str, Tensor]]:
        """(B, 4) terms and the position-normalized Grams of the whole image, from one pass over tiles."""
        p = self.params
        grams: dict[str, Tensor] = {}
        errors = {n: x.new_zeros(x.shape[0]) for n in p.content_layers}
        for tile, feats in tiled_features(lambda crop: self._vgg(crop, dtype), x, tiles):
            for n in p.style_layers:
                g = gram_matrix(feats[n].float())
                grams[n] = grams[n] + g if n in grams else g
            for n in p.content_layers:
                errors[n] += self._content_error(tile, n, feats[n], x)
            del feats
        grams = {n: g / positions(n, *x.shape[-2:]) for n, g in grams.items()}
        c = weighted_sum(errors, {n: 1.0 / len(p.content_layers) for n in p.content_layers})
        s = weighted_sum({n: style_loss(grams[n], self.style_grams[n], "none") for n in p.style_layers}, p.layer_weights())
        return self._total(x, c, s), grams

    def measure(self, x: Tensor) -> list[dict[str, float]]:
        """Each image's objective in exact fp32 (no TF32, no autocast, no gradient), as floats."""
        with torch.no_grad(), exact_fp32():
            return [dict(zip(TERMS, row)) for row in self(x).tolist()]
