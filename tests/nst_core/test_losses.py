import pytest
import torch

from nst_core import StyleParams
from nst_core.losses import content_loss, gram_matrix, style_loss, style_loss_through, tv_loss, weighted_sum
from nst_core.imageio import to_tensor as _to_tensor
from nst_core.imageio import resize_longest
from nst_core.vgg import load_extractor

from helpers import pattern


def test_gram_of_ones_counts_positions():
    g = gram_matrix(torch.ones(1, 2, 3, 4))
    assert torch.equal(g, torch.full((1, 2, 2), 12.0))
    assert torch.equal(gram_matrix(torch.ones(1, 2, 3, 4), normalize=True), torch.ones(1, 2, 2))


def test_gram_of_known_tensor():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)  # channel 0 = [1, 2], channel 1 = [3, 4]
    assert torch.equal(gram_matrix(f), torch.tensor([[[5.0, 11.0], [11.0, 25.0]]]))


def test_content_loss_hand_computed():
    gen, target = torch.ones(1, 1, 2, 2) * 3, torch.ones(1, 1, 2, 2)
    # ½·Σ(3−1)² / 4 = ½·16/4 = 2
    assert content_loss(gen, target).item() == pytest.approx(2.0)


def test_style_loss_hand_computed():
    g1, g2 = torch.ones(1, 2, 2), torch.zeros(1, 2, 2)
    # Σ 1² / (2·nC)² = 4 / 16
    assert style_loss(g1, g2).item() == pytest.approx(0.25)


def test_style_loss_equals_article_formula():
    torch.manual_seed(0)
    a, b = torch.rand(1, 3, 5, 7), torch.rand(1, 3, 5, 7)
    n_h, n_w, n_c = 5, 7, 3
    article = (gram_matrix(a) - gram_matrix(b)).pow(2).sum() / (2 * n_h * n_w * n_c) ** 2
    ours = style_loss(gram_matrix(a, normalize=True), gram_matrix(b, normalize=True))
    assert ours.item() == pytest.approx(article.item(), rel=1e-5)


def test_tv_loss_hand_computed():
    img = torch.zeros(1, 1, 2, 2)
    img[..., 1] = 1.0  # a vertical edge: every horizontal neighbour pair differs by 1, vertical ones by 0
    assert tv_loss(img).item() == pytest.approx(1.0)
    assert tv_loss(torch.ones(1, 3, 4, 4)).item() == 0.0


def test_weighted_sum():
    terms = {"a": torch.tensor(2.0), "b": torch.tensor(4.0)}
    assert weighted_sum(terms, {"a": 0.5, "b": 0.25}).item() == 2.0


def _terms(size: int, extractor, params: StyleParams) -> tuple[float, float]:
    """(content term, style term) of a fixed third image against content/style, all at `size` px."""
    load = lambda img: _to_tensor(resize_longest(img, size), extractor.device)  # noqa: E731
    c, s, g = load(pattern((256, 192), "content")), load(pattern((256, 192), "style")), load(pattern((256, 192), "rings"))
    with torch.no_grad():
        fc, fs, fg = (extractor(t, params.content_layers + params.style_layers) for t in (c, s, g))
        content = sum(content_loss(fg[n], fc[n]) for n in params.content_layers)
        layer_w = params.layer_weights()
        style = sum(layer_w[n] * style_loss(gram_matrix(fg[n], True), gram_matrix(fs[n], True))
                    for n in params.style_layers)
    return content.item(), style.item()


def test_style_content_balance_is_size_independent():
    params = StyleParams(weights="random", device="cpu")
    extractor = load_extractor("random", layers=params.content_layers + params.style_layers)
    c64, s64 = _terms(64, extractor, params)
    c128, s128 = _terms(128, extractor, params)
    ratio64, ratio128 = s64 / c64, s128 / c128
    assert 0.5 <= ratio64 / ratio128 <= 2.0, (ratio64, ratio128)
    # Each term is itself size independent, so α and β need no rescaling with image size.
    assert 0.5 <= c64 / c128 <= 2.0 and 0.5 <= s64 / s128 <= 2.0


def test_gram_gradient_matches_autograd_of_the_formula():
    torch.manual_seed(1)
    f = torch.rand(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: gram_matrix(x, normalize=True), (f,))
    weights = torch.rand(2, 4, 4, dtype=torch.float64)
    (gram_matrix(f) * weights).sum().backward()
    flat = f.detach().reshape(2, 4, 15).requires_grad_(True)
    (torch.bmm(flat, flat.transpose(1, 2)) * weights).sum().backward()
    assert torch.allclose(f.grad.reshape(2, 4, 15), flat.grad)


def test_normalized_gram_does_not_overflow_in_fp16():
    # Σ over 64·64 positions of 100² is 4e7, beyond fp16's 65504; the mean (1e4) is not.
    f = torch.full((1, 2, 64, 64), 100.0, dtype=torch.float16)
    g = gram_matrix(f, normalize=True)
    assert torch.isfinite(g).all() and torch.allclose(g.float(), torch.full((1, 2, 2), 1e4), rtol=1e-2)


def test_gram_of_channels_last_features_matches_and_backpropagates():
    torch.manual_seed(2)
    f = torch.rand(2, 5, 6, 7, dtype=torch.float64)
    fc = f.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    assert torch.allclose(gram_matrix(fc, normalize=True), gram_matrix(f, normalize=True))
    assert torch.autograd.gradcheck(lambda x: gram_matrix(x, normalize=True), (fc,))


def _unfused(features, target):
    """The style loss as the formula reads: style_loss(gram_matrix(F, normalize=True), target)."""
    return style_loss(gram_matrix(features.float(), normalize=True), target, "none")


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_style_loss_through_is_the_formula_and_its_gradient(layout):
    torch.manual_seed(3)
    f = torch.rand(2, 4, 3, 5, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_(True)
    target = torch.rand(2, 4, 4, dtype=torch.float64)
    target = target + target.transpose(1, 2)  # Grams are symmetric
    out, loss = style_loss_through(f, target)
    assert torch.equal(out, f) and torch.allclose(loss, _unfused(f, target))
    deeper = torch.rand(2, 4, 3, 5, dtype=torch.float64)
    # both outputs used (a deeper layer and the loss), each alone (the last style layer, a pass
    # that only carries the features on)
    def both(x):
        out, loss = style_loss_through(x, target)
        return (out * deeper).sum() + (loss * torch.tensor([1.0, 3.0], dtype=x.dtype)).sum()

    assert torch.autograd.gradcheck(both, (f,))
    assert torch.autograd.gradcheck(lambda x: style_loss_through(x, target)[1], (f,))
    assert torch.autograd.gradcheck(lambda x: style_loss_through(x, target)[0] * deeper, (f,))


def test_style_loss_through_a_bf16_pass_adds_an_fp32_gram_term_as_the_unfused_path_does():
    torch.manual_seed(4)
    f = torch.rand(1, 8, 6, 6).to(torch.bfloat16)
    target = gram_matrix(torch.rand(1, 8, 6, 6), normalize=True)
    deeper = torch.rand(1, 8, 6, 6).to(torch.bfloat16)
    grads = []
    for fused in (True, False):
        x = f.clone().requires_grad_(True)
        out, loss = style_loss_through(x, target) if fused else (x, _unfused(x, target))
        assert loss.dtype == torch.float32
        ((out * deeper).float().sum() + 1e3 * loss.sum()).backward()
        grads.append(x.grad)
    assert grads[0].dtype == torch.bfloat16
    assert torch.allclose(grads[0].float(), grads[1].float(), rtol=1e-2, atol=1e-3)


def test_total_variation_of_an_image_one_pixel_high_or_wide_is_finite():
    """With block-1 layers alone an image may be 1 px on a side; the mean of its empty vertical (or
    horizontal) differences was NaN, and the pair failed "lower the weights or the learning rate"."""
    row, column = torch.rand(2, 3, 1, 8), torch.rand(2, 3, 8, 1)
    assert torch.equal(tv_loss(row, "none"), (row[..., 1:] - row[..., :-1]).pow(2).flatten(1).mean(1))
    assert torch.isfinite(tv_loss(column)) and tv_loss(torch.rand(1, 3, 1, 1)) == 0
