"""Colour: luminance matching and affine colour transfer (Gatys et al. 2016, "Preserving color")."""

import pytest
import torch

from helpers import pattern
from nst_core.colour import luminance, match_color, match_luminance, rgb_to_ycbcr, with_chroma_of, ycbcr_to_rgb
from nst_core.imageio import to_tensor as _to_tensor


def test_ycbcr_round_trip_and_chroma_put_back():
    x = _to_tensor(pattern((40, 30), "content"), torch.device("cpu"))
    assert torch.allclose(ycbcr_to_rgb(rgb_to_ycbcr(x)), x, atol=2e-3)
    y = luminance(x)
    assert y.shape == (1, 1, 30, 40)
    assert torch.allclose(with_chroma_of(y, x), x, atol=2e-3)


def test_luminance_style_gets_the_contents_luminance_mean_and_sigma():
    style_y = _to_tensor(pattern((40, 40), "style"), torch.device("cpu"))[:, :1] * 0.3 + 0.6
    content_y = _to_tensor(pattern((40, 30), "content"), torch.device("cpu"))[:, 1:2]
    out = match_luminance(style_y, content_y)
    assert out.mean().item() == pytest.approx(content_y.mean().item(), abs=0.01)
    assert out.std().item() == pytest.approx(content_y.std().item(), rel=0.05)


def test_histogram_matching_gives_the_content_colour_statistics():
    src = _to_tensor(pattern((40, 40), "style"), torch.device("cpu"))
    ref = _to_tensor(pattern((40, 30), "content"), torch.device("cpu")) * 0.5 + 0.2
    out = match_color(src, ref)
    assert torch.allclose(out.reshape(3, -1).mean(1), ref.reshape(3, -1).mean(1), atol=0.02)
    assert torch.allclose(torch.cov(out.reshape(3, -1)), torch.cov(ref.reshape(3, -1)), atol=0.005)
