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


def test_a_luminance_put_back_outside_the_gamut_keeps_that_luminance():
    """Gatys et al. put the optimized Y back with the content's chroma; where the content is
    saturated, Y + chroma leaves the RGB cube. Clipping each channel moved Y by up to 0.1 (60% of
    a red-to-blue gradient's pixels), throwing away the texture the optimization put in Y. Now the
    chroma is pulled toward grey just enough to fit: Y stays, the hue stays."""
    gen = torch.Generator().manual_seed(0)
    vivid = torch.rand(1, 3, 24, 32, generator=gen).round()  # pure primaries and secondaries
    y = torch.rand(1, 1, 24, 32, generator=gen)
    out = with_chroma_of(y, vivid)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.allclose(luminance(out), y, atol=2e-3), (luminance(out) - y).abs().max()
    cb_cr, kept = rgb_to_ycbcr(vivid)[:, 1:] - 0.5, rgb_to_ycbcr(out)[:, 1:] - 0.5
    # the chroma only shrinks, along its own direction (the hue is kept)
    assert (kept.norm(dim=1) <= cb_cr.norm(dim=1) + 2e-3).all()
    cross = cb_cr[:, 0] * kept[:, 1] - cb_cr[:, 1] * kept[:, 0]
    assert cross.abs().max() < 2e-3


@pytest.mark.parametrize("mode", ["histogram", "luminance"])
def test_a_cut_outs_transparent_background_is_no_colour_of_it(mode):
    """A subject on transparent black (the usual PNG cut-out): its colour statistics were taken over
    every pixel, the hidden black included, so the style was recoloured toward colours no one
    sees. Now they are the visible pixels': the targets of the cut-out are those of the subject."""
    from PIL import Image

    from nst_core import StyleParams, compute_style_targets

    subject = pattern((24, 32), "content")
    cut = Image.new("RGBA", (48, 32), (0, 0, 0, 0))
    cut.paste(subject, (12, 0))
    rgba = torch.from_numpy(__import__("numpy").array(cut)).permute(2, 0, 1)[None].float() / 255
    p = StyleParams(weights="random", image_size=48, preserve_color=mode, scales=1, device="cpu")
    style = pattern((40, 40), "style")
    cut_out = compute_style_targets(style, p, content=rgba[:, :3], content_alpha=rgba[:, 3:])
    alone = compute_style_targets(style, p, content=_to_tensor(subject, torch.device("cpu")))
    opaque = compute_style_targets(style, p, content=rgba[:, :3])  # the black counted, as before
    for layer, gram in alone.by_size[48].items():
        assert torch.allclose(cut_out.by_size[48][layer], gram, rtol=1e-3, atol=1e-4), layer  # float64 vs float32 sums
        assert not torch.allclose(opaque.by_size[48][layer], gram, rtol=1e-2), layer


def test_stylize_hands_the_contents_alpha_to_its_colour_matching(monkeypatch):
    from PIL import Image

    from nst_core import StyleParams, optimize, stylize

    """The targets and, with init "style", the start (the review found it still matched to the
    whole frame): both get the content's alpha."""
    seen = []
    targets, prepared = optimize.compute_style_targets, optimize.style_tensor
    monkeypatch.setattr(optimize, "compute_style_targets",
                        lambda *a, **k: seen.append(("targets", k["content_alpha"])) or targets(*a, **k))
    monkeypatch.setattr(optimize, "style_tensor", lambda *a: seen.append(("start", a[6])) or prepared(*a))
    cut = Image.new("RGBA", (48, 32), (0, 0, 0, 0))
    cut.paste(pattern((24, 32), "content"), (12, 0))
    p = StyleParams(weights="random", image_size=48, iterations=2, preserve_color="histogram", device="cpu", init="style")
    result = stylize(cut, pattern((40, 40), "style"), p)
    assert result.image.mode == "RGBA"
    assert [what for what, _ in seen] == ["targets", "start"]
    for _, alpha in seen:
        assert alpha.shape == (1, 1, 32, 48) and alpha.mean().item() == pytest.approx(0.5, abs=0.02)


def test_a_semi_transparent_pixel_counts_as_much_as_it_shows():
    """Edges a resize made faint (alpha 10 of 255) mostly show what is behind them: weighted by alpha,
    not counted whole as any pixel with alpha > 0 would be."""
    y = torch.tensor([[[[0.2, 0.8, 0.0]]]])
    alpha = torch.tensor([[[[1.0, 1.0, 0.04]]]])
    out = match_luminance(torch.tensor([[[[0.0, 1.0]]]]), y, alpha)  # the style's own mean 0.5, σ 0.707
    weighted_mean = (0.2 + 0.8) / 2.04
    assert out.mean().item() == pytest.approx(weighted_mean, abs=1e-4)
