"""Colour handling: YCbCr, luminance matching and affine colour transfer (Gatys et al. 2016,
"Preserving colour in neural artistic style transfer"). Tensors in [0, 1], (B, C, H, W)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rgb_to_ycbcr", "ycbcr_to_rgb", "luminance", "with_chroma_of", "visibility", "match_luminance", "match_color"]


def rgb_to_ycbcr(x: Tensor) -> Tensor:
    """BT.601 RGB -> YCbCr, all in [0, 1]. (B, 3, H, W) -> (B, 3, H, W)."""
    r, g, b = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return torch.stack([y, 0.564 * (b - y) + 0.5, 0.713 * (r - y) + 0.5], 1)


def ycbcr_to_rgb(x: Tensor) -> Tensor:
    """Inverse of rgb_to_ycbcr. (B, 3, H, W) -> (B, 3, H, W)."""
    y, cb, cr = x.unbind(1)
    cb, cr = cb - 0.5, cr - 0.5
    return torch.stack([y + 1.403 * cr, y - 0.714 * cr - 0.344 * cb, y + 1.773 * cb], 1)


def luminance(x: Tensor) -> Tensor:
    """Y of an RGB image. (B, 3, H, W) -> (B, 1, H, W)."""
    return rgb_to_ycbcr(x)[:, :1]


def with_chroma_of(y: Tensor, rgb: Tensor) -> Tensor:
    """An optimized luminance put back with the chroma (Cb, Cr) of ``rgb``, brought into the gamut
    with Y and hue kept: x = Y + k·d, d = each channel's offset from grey that the chroma gives
    (ycbcr_to_rgb(Y, Cb, Cr) − Y, whose Y-weighted sum is ≈ 0: < 4e-4 of the chroma with these
    rounded BT.601 constants, under an 8-bit level), k = the largest in [0, 1] that keeps
    every channel in [0, 1]. (B, 1, H, W), (B, 3, H, W) -> (B, 3, H, W).

    Departs from Gatys et al. 2016, who leave the gamut unsaid: clipping each channel, as this did
    first, moves Y by up to 0.1 where the content is saturated (60% of a red-to-blue gradient's
    pixels), undoing the stylization the optimization put in Y (30 evaluations reached 2.00 and
    the image written measured 47.9); pulling the chroma toward grey keeps what was optimized."""
    y = y.clamp(0, 1)
    offset = ycbcr_to_rgb(torch.cat([y, rgb_to_ycbcr(rgb)[:, 1:]], 1)) - y
    room = torch.where(offset > 0, (1 - y) / offset.clamp_min(1e-12),
                       torch.where(offset < 0, y / (-offset).clamp_min(1e-12), torch.ones_like(offset)))
    return (y + room.amin(1, keepdim=True).clamp(0, 1) * offset).clamp(0, 1)


def visibility(alpha: Tensor | None) -> Tensor | None:
    """A content's alpha (1, 1, H, W) as weights (H·W,) of its pixels' colour statistics: how much
    of each pixel shows (a semi-transparent edge shows partly). None, as if opaque, where there is
    no alpha or it hides every pixel."""
    if alpha is None or not alpha.sum() > 0:
        return None
    return alpha.reshape(-1).double()


def match_luminance(style_y: Tensor, content_y: Tensor, content_alpha: Tensor | None = None) -> Tensor:
    """Give the style's luminance the content's mean and σ (Gatys et al. 2016, "Preserving color"),
    each pixel of the content weighted by how much of it shows (``content_alpha``, (1, 1, H', W'):
    a cut-out's transparent background is no colour of it).

    Y' = (Y_s − μ_s)·σ_c/σ_s + μ_c, clamped to [0, 1] (the range the optimized image lives in).
    (1, 1, H, W), (1, 1, H', W') -> (1, 1, H, W).
    """
    mu_s, sd_s = style_y.mean(), style_y.std().clamp_min(1e-5)
    if (w := visibility(content_alpha)) is None:
        mu_c, sd_c = content_y.mean(), content_y.std()
    else:  # weighted, and unbiased as std() is: for 0/1 weights, the visible pixels' own std()
        y = content_y.reshape(-1).double()
        mu = (w * y).sum() / w.sum()
        dof = w.sum() - (w * w).sum() / w.sum()
        var = (w * (y - mu) ** 2).sum() / dof if dof > 0 else y.new_zeros(())
        mu_c, sd_c = mu.to(content_y.dtype), var.sqrt().to(content_y.dtype)
    return ((style_y - mu_s) * (sd_c / sd_s) + mu_c).clamp(0, 1)


def _sqrtm(cov: Tensor, power: float) -> Tensor:
    """cov^power for a symmetric PSD 3x3 matrix via eigendecomposition."""
    vals, vecs = torch.linalg.eigh(cov)
    return vecs @ torch.diag(vals.clamp_min(1e-8) ** power) @ vecs.T


def _pixel_stats(pixels: Tensor, weights: Tensor | None = None, ridge: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Mean (C, 1) and covariance (C, C) (+ ridge·I) of (C, N) pixels, in float64; each pixel
    weighted by ``weights`` (N,) where given: μ = Σ w·x / Σ w, Σ = Σ w·(x − μ)(x − μ)ᵀ / Σ w."""
    flat = pixels.double()
    if weights is None:
        mu = flat.mean(1, keepdim=True)
        centered = flat - mu
        cov = centered @ centered.T / flat.shape[1]
    else:
        total = weights.sum()
        mu = (flat * weights).sum(1, keepdim=True) / total
        centered = flat - mu
        cov = (centered * weights) @ centered.T / total
    return mu, cov + ridge * torch.eye(flat.shape[0], dtype=flat.dtype, device=flat.device)


def match_color(source: Tensor, reference: Tensor, reference_alpha: Tensor | None = None) -> Tensor:
    """Affine colour transfer: give ``source`` the mean and covariance of ``reference``'s pixels,
    each weighted by how much of it shows (``reference_alpha`` (1, 1, H', W'), as ``match_luminance``).

    x' = Σ_r^½ Σ_s^-½ (x − μ_s) + μ_r (Gatys et al. 2016, "Preserving color", image analogies
    variant). (1, 3, H, W), (1, 3, H', W') -> (1, 3, H, W), clamped to [0, 1].
    """
    if source.device.type == "mps":  # MPS has no float64 (nor eigh): on the CPU, a 3x3 transform's worth
        return match_color(source.cpu(), reference.cpu(),
                           None if reference_alpha is None else reference_alpha.cpu()).to(source.device)
    mu_s, cov_s = _pixel_stats(source.reshape(3, -1))
    mu_r, cov_r = _pixel_stats(reference.reshape(3, -1), visibility(reference_alpha))
    transform = _sqrtm(cov_r, 0.5) @ _sqrtm(cov_s, -0.5)
    out = transform @ (source.reshape(3, -1).double() - mu_s) + mu_r
    return out.reshape(source.shape).to(source.dtype).clamp(0, 1)
