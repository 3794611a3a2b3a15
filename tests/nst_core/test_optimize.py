import dataclasses
import json

import pytest
import torch
from PIL import Image

import nst_core.optimize as optimize
from nst_core import NonFiniteLossError, NSTError, StyleParams, compute_style_targets, stylize
from nst_core.optimize import _to_tensor, match_color, rgb_to_ycbcr

from helpers import pattern


def params(**kw) -> StyleParams:
    return StyleParams(**{"weights": "random", "device": "cpu", "image_size": 64, "iterations": 8, **kw})


def test_lbfgs_halves_the_loss_in_20_evaluations(images):
    result = stylize(*images, params(iterations=20, init="noise"))
    assert result.losses["final"]["total"] <= 0.5 * result.losses["initial"]["total"]
    assert result.image.size == (64, 48) and result.image.mode == "RGB"


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_iterations_count_loss_evaluations_and_progress_sees_each(images, optimizer):
    events = []
    result = stylize(*images, params(iterations=7, optimizer=optimizer), progress=events.append)
    assert len(result.history) == 7 and result.metadata["evaluations"] == 7
    assert [e.iteration for e in events] == list(range(1, 8)) and events[-1].total == 7
    assert result.losses["final"]["total"] < result.losses["initial"]["total"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        events[0].iteration = 99


@pytest.mark.parametrize("init", ["content", "noise", "style"])
def test_same_seed_same_pixels(images, init):
    a = stylize(*images, params(init=init, seed=3))
    b = stylize(*images, params(init=init, seed=3))
    assert a.image.tobytes() == b.image.tobytes()
    if init == "noise":
        assert stylize(*images, params(init=init, seed=4)).image.tobytes() != a.image.tobytes()


def test_non_finite_loss_names_the_evaluation(images):
    with pytest.raises(NonFiniteLossError, match="evaluation 1") as err:
        stylize(*images, params(style_weight=1e300))
    assert err.value.iteration == 1


def test_targets_are_reused_not_recomputed(images, monkeypatch):
    content, style = images
    p = params()
    targets = compute_style_targets(style, p)
    calls = []
    real = optimize.compute_style_targets
    monkeypatch.setattr(optimize, "compute_style_targets", lambda *a, **k: calls.append(1) or real(*a, **k))
    shared = stylize(content, style, p, targets=targets)
    assert calls == []
    assert shared.image.tobytes() == stylize(content, style, p).image.tobytes()
    assert calls == [1]
    with pytest.raises(NSTError, match="other params"):
        stylize(content, style, params(image_size=48), targets=targets)
    with pytest.raises(NSTError, match="histogram"):
        stylize(content, style, params(preserve_color="histogram"), targets=targets)


def test_blend_weights_mix_style_grams(images):
    content, style = images
    other = pattern((64, 64), "rings")
    only_first = compute_style_targets([style, other], params(style_blend_weights=[1.0, 0.0]))
    single = compute_style_targets(style, params())
    half = compute_style_targets([style, other], params())
    second = compute_style_targets(other, params())
    for name, g in single.grams.items():
        assert torch.allclose(only_first.grams[name], g)
        assert torch.allclose(half.grams[name], (g + second.grams[name]) / 2, rtol=1e-4, atol=1e-3)
    result = stylize(content, [style, other], params(iterations=3))
    assert result.metadata["styles"] == 2
    with pytest.raises(ValueError, match="3 values for 2 style"):
        stylize(content, [style, other], params(style_blend_weights=[1, 1, 1]))


def test_luminance_keeps_the_content_chroma(images):
    content, style = images
    result = stylize(content, style, params(preserve_color="luminance", iterations=10))
    out = rgb_to_ycbcr(_to_tensor(result.image, torch.device("cpu")))
    ref = rgb_to_ycbcr(_to_tensor(content, torch.device("cpu")))
    # chroma within 8-bit rounding and gamut clipping of the content's; luminance changed
    assert (out[:, 1:] - ref[:, 1:]).abs().mean() < 0.02
    assert (out[:, :1] - ref[:, :1]).abs().mean() > (out[:, 1:] - ref[:, 1:]).abs().mean()


def test_histogram_matching_gives_the_content_colour_statistics():
    src = _to_tensor(pattern((40, 40), "style"), torch.device("cpu"))
    ref = _to_tensor(pattern((40, 30), "content"), torch.device("cpu")) * 0.5 + 0.2
    out = match_color(src, ref)
    assert torch.allclose(out.reshape(3, -1).mean(1), ref.reshape(3, -1).mean(1), atol=0.02)
    assert torch.allclose(torch.cov(out.reshape(3, -1)), torch.cov(ref.reshape(3, -1)), atol=0.005)


def test_histogram_mode_runs(images):
    result = stylize(*images, params(preserve_color="histogram", iterations=3))
    assert result.metadata["params"]["preserve_color"] == "histogram"


def test_alpha_goes_back_on_the_result(images):
    content, style = images
    rgba = content.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(content.size))
    result = stylize(rgba, style, params(iterations=2))
    assert result.image.mode == "RGBA"
    assert result.image.getchannel("A").getextrema()[0] < 20


def test_metadata_is_json_and_complete(images):
    result = stylize(*images, params(iterations=2))
    meta = json.loads(json.dumps(result.metadata))
    assert meta["weights_id"] == "random(seed=0)" and meta["device"] == "cpu"
    assert meta["params"]["iterations"] == 2 and set(meta["seconds"]) == {"targets", "optimize", "total"}
    assert {"torch", "torchvision", "pillow"} <= set(meta["versions"])
    assert set(result.losses["final"]) == {"content", "style", "tv", "total"}


def test_tv_weight_enters_the_total(images):
    result = stylize(*images, params(iterations=2, tv_weight=10.0, init="noise"))
    first = result.history[0]
    assert first["tv"] > 0
    assert first["total"] == pytest.approx(first["content"] + 1e-3 * first["style"] + 10.0 * first["tv"], rel=1e-4)
