"""The coarse-to-fine schedule: the sizes of the scales and the loss evaluations each one gets.

Differs from Gatys et al., who optimize at one size: like crowsonkb/style-transfer-pytorch we
may optimize at sizes √2 apart, each scale starting from the previous result upsampled, because
much of the structure settles at low resolution for a fraction of the cost. ``scales=1`` is the
paper's single-scale method.
"""

from __future__ import annotations

from collections.abc import Sequence

from .params import StyleParams

__all__ = ["scale_sizes", "split_budget"]


def scale_sizes(params: StyleParams) -> list[int]:
    """Longest side of each scale, coarse to fine: image_size·2^(−k/2) for k = scales−1 … 0."""
    sizes = [round(params.image_size / 2 ** (k / 2)) for k in reversed(range(params.scales))]
    return sorted(set(sizes))


def split_budget(total: int, pixels: Sequence[int]) -> list[int]:
    """Evaluations per scale: the same share of compute for each, so most evaluations run small.

    An evaluation costs about its pixel count, so scale k gets total·(1/p_k)/Σ(1/p_j)
    evaluations (at √2 steps: 4:2:1 for three scales); a coarse scale gets none rather than a
    useless single one, and the output size at least one; the sum is ``total``.
    """
    inv = [1.0 / p for p in pixels]
    shares = [int(total * w / sum(inv)) for w in inv]  # floors; a coarse scale may get none
    # A coarse scale of one evaluation changes nothing: the step after a scale's last evaluation
    # is never evaluated, and the next scale starts from the best evaluated image (its start).
    shares = [0 if n == 1 else n for n in shares[:-1]] + shares[-1:]
    shares[-1] = total - sum(shares[:-1])  # >= 1: at least the output size is optimized
    return shares
