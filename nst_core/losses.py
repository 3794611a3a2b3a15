"""The loss terms of Gatys style transfer as small tensor functions.

Normalization, and why (it keeps good α/β independent of image size; tests/nst_core/test_losses.py
shows the style/content ratio stays put between 64 px and 128 px):

- content: ``½·‖a_G − a_C‖² / (nH·nW·nC)`` — differs from Gatys et al.'s plain ½·‖·‖² sum
  (divided by the element count) because the unnormalized sum grows with the number of positions, so α would have to shrink with
  image size; the per-element mean does not.
- style, per layer: ``‖G_G − G_S‖² / (2·nH·nW·nC)²`` — the article's coefficient 1/(2·nH·nW·nC)
  applied to the Gram difference (Gatys et al.'s 1/(4·N²·M²)). Gram entries are sums over the
  nH·nW positions, so dividing by nH·nW makes each layer size independent and dividing by nC
  keeps wide layers from swamping narrow ones. We store Grams already divided by nH·nW
  (``gram_matrix(x, normalize=True)``) so a style image of another size gives a comparable
  target; the loss is then ``‖Ĝ_G − Ĝ_S‖² / (2·nC)²``, the same number.
- total variation: mean squared difference of neighbouring pixels, on [0,1] images. Not in
  Gatys et al. (jcjohnson/neural-style adds it against high-frequency noise); off by default.
- total: ``α·content + β·Σ_l w_l·style_l + γ·tv`` with layer weights w_l summing to 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["gram_matrix", "content_loss", "style_loss", "style_loss_through", "tv_loss", "weighted_sum"]


class _Gram(torch.autograd.Function):
    """G = scale·F·Fᵀ for F (B, nC, N); backward dF = scale·(dG + dGᵀ)·F.

    Autograd's own bmm backward does two matmuls plus transposed copies of F; since G is
    symmetric one matmul suffices. On the hot path of every loss evaluation (see benchmarks/engine.py).

    The scale goes in before the sum, not after it: unnormalized Grams reach ~3e8 at 512 px,
    beyond fp16's 65504. In fp16 the features are multiplied by √scale before the product; in
    fp32/bf16 (fp32's exponent range) ``baddbmm``'s alpha applies it to the accumulator with no
    extra pass over F. The backward product sums nC (≤ 512) terms of scale·dG·F and needs no care.
    """

    @staticmethod
    def forward(ctx, flat: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(flat)
        ctx.scale = scale
        if flat.dtype == torch.float16:
            f = flat * math.sqrt(scale)
            return torch.bmm(f, f.transpose(1, 2))
        return _scaled_gram(flat, scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (flat,) = ctx.saved_tensors
        sym = grad + grad.transpose(1, 2)
        if flat.dtype == torch.float16:  # scaled before the cast: an unscaled dG may pass 65504
            return _times(sym.mul_(ctx.scale).half(), flat), None
        return _times(sym.to(flat.dtype), flat, alpha=ctx.scale), None


def _scaled_gram(flat: Tensor, scale: float) -> Tensor:
    """scale·F·Fᵀ, (B, nC, N) fp32/bf16 -> (B, nC, nC); ``baddbmm``'s alpha scales the accumulator."""
    out = flat.new_empty(flat.shape[0], flat.shape[1], flat.shape[1])
    return torch.baddbmm(out, flat, flat.transpose(1, 2), beta=0.0, alpha=scale)


def _times(sym: Tensor, flat: Tensor, plus: Tensor | None = None, alpha: float = 1.0) -> Tensor:
    """[plus +] alpha·sym·F for sym (B, nC, nC), F and plus (B, nC, N) -> (B, nC, N) in F's layout.

    With ``plus`` one GEMM reads it and writes the sum: no separate pass to add two gradients;
    ``alpha`` scales the product in the GEMM (no separate pass, or launch, to scale sym).
    channels_last F is a transposed view of (B, N, nC) memory: Fᵀ·sym = (sym·F)ᵀ comes out
    in that layout, no copy.
    """
    if flat.is_contiguous():
        a, b, out = sym, flat, plus
    else:
        a, b, out = flat.transpose(1, 2), sym, None if plus is None else plus.transpose(1, 2)
    if out is None:
        product = torch.baddbmm(a.new_empty(a.shape[0], a.shape[1], b.shape[2]), a, b, beta=0.0, alpha=alpha)
    else:
        product = torch.baddbmm(out, a, b, alpha=alpha)
    return product if flat.is_contiguous() else product.transpose(1, 2)


class _StyleThrough(torch.autograd.Function):
    """(features, target Ĝ_S) -> (the features, ‖Ĝ − Ĝ_S‖² / (2·nC)² per sample): ``style_loss_through``.

    backward: dF = grad_features + (grad_loss / nC²)·(Ĝ − Ĝ_S)·F / N, one GEMM that also adds
    the gradient the deeper layers sent to these features (∂/∂Ĝ of the loss is
    2·(Ĝ − Ĝ_S)/(4·nC²), symmetric, so dĜ + dĜᵀ is twice it). Autograd would instead write
    the Gram term to its own tensor and add the two in a separate pass over the features
    (benchmarks/engine.py's "formula" layer measures the difference: a few percent of the bare
    VGG pass at 256 px on a 2-core CPU). Grams and the product run in fp32: a bf16/fp16
    pass's features are read as fp32 and the Gram term is added in their dtype, as the
    unfused ``gram_matrix(f.float())`` + ``style_loss`` does.
    """

    @staticmethod
    def forward(ctx, features: Tensor, target: Tensor):
        b, c, h, w = features.shape
        flat = _flat(features)
        flat = flat.float() if flat.element_size() < 4 else flat  # fp32 Grams (float64 stays: gradcheck)
        diff = _scaled_gram(flat, 1.0 / (h * w)).sub_(target)  # Ĝ − Ĝ_S, kept for the backward
        ctx.save_for_backward(flat, diff)
        ctx.dtype, ctx.size = features.dtype, (h, w)
        ctx.set_materialize_grads(False)  # no deeper layer used the features: grad_features is None
        return features.view_as(features), _style_of_difference(diff)

    @staticmethod
    def backward(ctx, grad_features: Tensor | None, grad_loss: Tensor | None):
        flat, diff = ctx.saved_tensors
        if grad_loss is None:
            return grad_features, None
        b, c, _ = diff.shape
        h, w = ctx.size
        sym, alpha = diff * grad_loss.to(diff.dtype).view(b, 1, 1), 1.0 / (c * c * h * w)
        plus = None if grad_features is None else _flat(grad_features)
        if ctx.dtype == flat.dtype:
            out = _times(sym, flat, plus, alpha)
        else:
            term = _times(sym, flat, alpha=alpha).to(ctx.dtype)
            out = term if plus is None else plus + term
        return _unflat(out, h, w), None


def _flat(features: Tensor) -> Tensor:
    """(B, nC, nH, nW) -> (B, nC, nH·nW) as a view, for NCHW and channels_last alike.

    A channels_last tensor is stored (B, nH, nW, nC); reshaping it as NCHW would copy it, so
    take the (B, N, nC) view and transpose it (bmm reads transposed operands without copying).
    """
    b, c, h, w = features.shape
    if features.is_contiguous() or not features.is_contiguous(memory_format=torch.channels_last):
        return features.reshape(b, c, h * w)
    return features.permute(0, 2, 3, 1).reshape(b, h * w, c).transpose(1, 2)


def _unflat(flat: Tensor, h: int, w: int) -> Tensor:
    """(B, nC, nH·nW) -> (B, nC, nH, nW), the inverse of ``_flat``: a view for either layout."""
    b, c, _ = flat.shape
    if flat.is_contiguous():
        return flat.view(b, c, h, w)
    return flat.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)


def gram_matrix(features: Tensor, normalize: bool = False) -> Tensor:
    """Gram ("style") matrix. (B, nC, nH, nW) -> (B, nC, nC), in the features' dtype.

    G[k, k'] = Σ_i Σ_j a[i, j, k]·a[i, j, k']; ``normalize`` divides by nH·nW (a mean over
    positions), applied inside the product so fp16 cannot overflow.
    """
    b, c, h, w = features.shape
    return _Gram.apply(_flat(features), 1.0 / (h * w) if normalize else 1.0)


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    """(B,) -> the batch mean (a scalar), or the (B,) values themselves ("none": independent pairs)."""
    return per_sample if reduction == "none" else per_sample.mean()


def content_loss(generated: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """½·‖a_G − a_C‖² / (nH·nW·nC) per sample. Both (B, nC, nH, nW) -> scalar (batch mean) or (B,)."""
    return _reduce(0.5 * (generated - target).pow(2).flatten(1).mean(1), reduction)


def style_loss(gram_generated: Tensor, gram_target: Tensor, reduction: str = "mean") -> Tensor:
    """‖Ĝ_G − Ĝ_S‖² / (2·nC)² for Grams normalized by nH·nW. (B, nC, nC) -> scalar (batch mean) or (B,).

    Equal to the article's ‖G_G − G_S‖²·(1/(2·nH·nW·nC))² on unnormalized Grams.
    """
    return _reduce(_style_of_difference(gram_generated - gram_target), reduction)


def _style_of_difference(diff: Tensor) -> Tensor:
    """‖D‖² / (2·nC)² per sample, D = Ĝ_G − Ĝ_S (B, nC, nC) -> (B,): the style loss of a Gram difference."""
    c = diff.shape[-1]
    return diff.pow(2).flatten(1).sum(1) / (4 * c * c)


def style_loss_through(features: Tensor, gram_target: Tensor) -> tuple[Tensor, Tensor]:
    """(features, style_loss(gram_matrix(features, normalize=True), gram_target, "none")) in one op.

    features (B, nC, nH, nW) in any float dtype, gram_target (B, nC, nC) fp32 -> the features
    unchanged (hand them to the deeper layers: their gradient and the style term's meet in one
    product, see ``_StyleThrough``) and the fp32 loss (B,).
    """
    return _StyleThrough.apply(features, gram_target)


def tv_loss(image: Tensor, reduction: str = "mean") -> Tensor:
    """Total variation: mean (x[i+1,j]−x[i,j])² + mean (x[i,j+1]−x[i,j])² per sample.
    (B, C, H, W) -> scalar (batch mean) or (B,)."""
    dy = image[..., 1:, :] - image[..., :-1, :]
    dx = image[..., :, 1:] - image[..., :, :-1]
    return _reduce(_mean_square(dy) + _mean_square(dx), reduction)


def _mean_square(d: Tensor) -> Tensor:
    """Per-sample mean of d² (B,); 0 where d is empty (an image 1 px high or wide: the mean of
    nothing was NaN, and the pair failed as if its weights were too high)."""
    return d.pow(2).flatten(1).mean(1) if d[0].numel() else d.new_zeros(d.shape[0])


def weighted_sum(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Σ_name weights[name]·terms[name]: composes one loss over several layers."""
    return sum(weights[name] * term for name, term in terms.items())
