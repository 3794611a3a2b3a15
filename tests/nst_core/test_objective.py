"""The objective's reduced-precision paths: weights kept in the pass's dtype, fp16 loss scaling."""

import torch

from nst_core import StyleParams
from nst_core.losses import gram_matrix
from nst_core.objective import Objective
from nst_core.vgg import extractor_for


def _setup():
    p = StyleParams(weights="random", device="cpu")
    extractor = extractor_for(p)
    gen = torch.Generator().manual_seed(0)
    content, style = torch.rand(1, 3, 48, 64, generator=gen), torch.rand(1, 3, 32, 32, generator=gen)
    with torch.no_grad():
        grams = [{n: gram_matrix(f, normalize=True) for n, f in extractor(style, p.style_layers).items()}]
    start = (content + 0.05 * torch.randn(content.shape, generator=gen)).clamp(0, 1)
    return Objective.build(extractor, p, content, grams), start


def _two_contents():
    """(params, extractor, two contents, one style's Grams) on random weights."""
    p = StyleParams(weights="random", device="cpu")
    extractor = extractor_for(p)
    gen = torch.Generator().manual_seed(0)
    content, style = torch.rand(2, 3, 48, 64, generator=gen), torch.rand(1, 3, 32, 32, generator=gen)
    with torch.no_grad():
        grams = {n: gram_matrix(f, normalize=True) for n, f in extractor(style, p.style_layers).items()}
    return p, extractor, content, grams


def _grad(objective, start, dtype):
    x = start.clone().requires_grad_(True)
    objective.value_and_grad(x, dtype)
    return x.grad


def test_fp16_gradients_are_loss_scaled_so_small_ones_do_not_round_to_zero():
    objective, start = _setup()
    exact = _grad(objective, start, None)
    assert float((exact == 0).float().mean()) == 0.0
    scaled = _grad(objective, start, torch.float16)
    objective.loss_scale.reset(1.0)  # no scaling
    unscaled = _grad(objective, start, torch.float16)
    # unscaled, fp16 flushes pixels' gradients to exactly zero (0.07% of them here)
    assert float((unscaled == 0).float().mean()) > 10 * float((scaled == 0).float().mean())
    assert float((scaled - exact).norm() / exact.norm()) < 0.1


def test_an_overflowing_fp16_scale_is_halved_and_the_evaluation_redone():
    objective, start = _setup()
    exact = _grad(objective, start, None)
    objective.loss_scale.reset(2.0**30)  # overflows here: halved down to 2^26
    grad = _grad(objective, start, torch.float16)
    assert objective.loss_scale.values.max() < 2.0**30
    assert bool(torch.isfinite(grad).all()) and float((grad - exact).norm() / exact.norm()) < 0.1


def test_one_pairs_non_finite_loss_does_not_stop_the_others_loss_scale_from_halving():
    """fp16, several pairs in one step. Old: the overflow test asked whether every pair's terms were
    finite, so one pair's NaN loss (it fails alone) turned halving off for all, and another pair's
    overflowing gradient failed it as "gradient is not finite; use precision=fp32"."""
    p, extractor, content, grams = _two_contents()
    objective = Objective.build(extractor, p, content, [grams, grams])
    start = content.clone()
    start[1] = float("nan")  # pair 1 has gone non-finite
    objective.loss_scale.reset(2.0**30)  # pair 0 overflows at this scale
    x = start.clone().requires_grad_(True)
    terms = objective.value_and_grad(x, torch.float16)
    assert not bool(torch.isfinite(terms[1]).all()) and bool(torch.isfinite(terms[0]).all())
    assert objective.loss_scale.values[0] < 2.0**30 and bool(torch.isfinite(x.grad[0]).all())


def test_each_pair_of_a_step_keeps_the_fp16_loss_scale_it_would_have_alone():
    """A pair near its content (small gradients) and one far from it (large ones), from a scale
    at which both overflow. Old: one scale for the step, halved for the far pair's overflow, took
    the near pair down with it (2^23 where alone it keeps 2^29), towards where its small gradients
    round to zero at 512 px. Now each pair's scale is its own, as in a separate stylize call."""
    p, extractor, content, grams = _two_contents()
    start = content.clone()
    start[1] = 0.5  # flat grey: far from its content and its style

    def scales(objective, x):
        objective.loss_scale.reset(2.0**40)
        objective.value_and_grad(x.clone().requires_grad_(True), torch.float16)
        return objective.loss_scale.values.tolist()

    together = scales(Objective.build(extractor, p, content, [grams, grams]), start)
    alone = [scales(Objective.build(extractor, p, content[b:b + 1], [grams]), start[b:b + 1])[0] for b in (0, 1)]
    assert together == alone and alone[0] > alone[1], (together, alone)


def test_a_reduced_precision_pass_runs_on_a_kept_copy_of_the_weights_with_autocasts_numbers():
    p = StyleParams(weights="random", device="cpu")
    extractor = extractor_for(p)
    x = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = extractor(x, p.style_layers)
    cast = extractor.cast(torch.bfloat16)
    assert cast is extractor.cast(torch.bfloat16)  # made once
    assert cast.layers[0].weight.dtype == torch.bfloat16 and extractor.layers[0].weight.dtype == torch.float32
    ours = cast(x, p.style_layers)
    assert all(torch.equal(ours[n], autocast[n]) for n in p.style_layers)


def test_the_objectives_gradient_is_that_of_the_formula_written_out():
    # style_loss_through meets the deeper layers' gradient in one product; the result must be
    # autograd's gradient of α·content + β·Σ w_l·style_l written with the plain loss functions.
    from nst_core.losses import content_loss, style_loss, weighted_sum
    objective, start = _setup()
    p, extractor = objective.params, objective.extractor
    x = start.clone().requires_grad_(True)
    feats = extractor(x, objective.layers)
    c = content_loss(feats["relu4_2"], objective.content_feats["relu4_2"], "none")
    s = weighted_sum({n: style_loss(gram_matrix(feats[n], normalize=True), objective.style_grams[n], "none")
                      for n in p.style_layers}, p.layer_weights())
    (p.content_weight * c + p.style_weight * s).sum().backward()
    assert torch.allclose(objective(start)[0, :2], torch.stack([c, s], 1)[0], rtol=1e-5)
    assert torch.allclose(_grad(objective, start, None), x.grad, rtol=1e-4, atol=1e-6 * float(x.grad.abs().max()))
