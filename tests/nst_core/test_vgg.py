import hashlib
import math

import pytest
import torch
from torch import nn
from torchvision.models import vgg16
from torchvision.transforms.functional import pil_to_tensor

from helpers import pattern
from nst_core import VGG16_LAYERS, StyleParams, WeightsError
from nst_core.losses import content_loss, gram_matrix, style_loss, weighted_sum
from nst_core import vgg as vgg_mod
from nst_core.params import layer_index, min_side
from nst_core.vgg import load_extractor
from nst_core.weights import read_weights_bytes


@pytest.fixture(autouse=True)
def fresh_cache():
    vgg_mod.clear_cache()
    yield
    vgg_mod.clear_cache()


def _names_from_torchvision() -> list[str]:
    """conv{block}_{n} / relu{block}_{n} / pool{block}, counted off torchvision's own vgg16 layout."""
    names, block, conv = [], 1, 0
    for module in vgg16(weights=None).features:
        if isinstance(module, nn.Conv2d):
            conv += 1
            names.append(f"conv{block}_{conv}")
        elif isinstance(module, nn.ReLU):
            names.append(f"relu{block}_{conv}")
        else:
            assert isinstance(module, nn.MaxPool2d)
            names.append(f"pool{block}")
            block, conv = block + 1, 0
    return names


def test_layer_table_matches_torchvision():
    assert list(VGG16_LAYERS) == _names_from_torchvision()
    # Each conv name points at a conv with the channel count of its block.
    features = vgg16(weights=None).features
    widths = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}
    for name in ("conv1_1", "conv2_2", "conv3_3", "conv4_1", "conv5_3"):
        assert features[layer_index(name)].out_channels == widths[int(name[4])]


def test_the_stack_is_torchvisions_module_for_module_and_draw_for_draw():
    # nst_core writes VGG16's features out (importing torchvision costs ~2.5 s a process): the
    # same modules in the same order, so a seed draws the same random weights as make_layers did.
    from torchvision.models.vgg import cfgs, make_layers

    def seeded(build):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            return build()

    ours, theirs = seeded(vgg_mod._vgg16_features), seeded(lambda: make_layers(cfgs["D"], batch_norm=False))
    assert [repr(m) for m in ours] == [repr(m) for m in theirs]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))


def test_truncates_after_deepest_layer_and_freezes():
    ex = load_extractor("random", layers=["relu1_1", "relu2_1"])
    assert len(ex.layers) == layer_index("relu2_1") + 1
    assert not ex.layers.training and not any(p.requires_grad for p in ex.layers.parameters())
    out = ex(torch.rand(1, 3, 32, 32), ["relu2_1", "relu1_1"])
    assert out["relu1_1"].shape == (1, 64, 32, 32) and out["relu2_1"].shape == (1, 128, 16, 16)


def test_avg_pooling_and_conv_layers_keep_their_values():
    ex = load_extractor("random", layers=["conv2_1"], pooling="avg")
    assert any(isinstance(m, nn.AvgPool2d) for m in ex.layers)
    assert not any(isinstance(m, nn.MaxPool2d) for m in ex.layers)
    out = ex(torch.rand(1, 3, 32, 32), ["conv1_1"])
    assert (out["conv1_1"] < 0).any(), "a conv activation must not be overwritten by an in-place ReLU"


def test_an_avg_pools_factor_is_the_same_whichever_layers_are_asked_for(tmp_path):
    """A network cut right after a pool matched that pool's own output, where a deeper one matched
    the next ReLU's: style layers relu1_1 + pool2 got a pool2 factor of 1.56 with content relu2_1
    and 1.36 with relu3_1, so the style objective changed with an unrelated parameter (and reused
    targets, keyed without it, were silently wrong). A file's weights are calibrated alike."""
    from nst_core.pooling import ScaledAvgPool2d

    def pool2(layers: list[str], weights: str = "random") -> float:
        ex = load_extractor(weights, layers=layers, pooling="avg")
        return ex.layers[9].scale if isinstance(ex.layers[9], ScaledAvgPool2d) else float("nan")

    assert pool2(["relu1_1", "pool2"]) == pool2(["relu1_1", "relu2_1", "pool2", "relu3_1"])
    path = tmp_path / "vgg.pth"
    torch.save(load_extractor("random", layers=["relu5_3"], seed=4).layers.state_dict(), path)
    assert pool2(["pool2"], str(path)) == pool2(["pool2", "relu4_1"], str(path))


def test_random_weights_are_seeded_and_cached():
    a = load_extractor("random", layers=["relu1_1"], seed=1)
    assert load_extractor("random", layers=["relu1_1"], seed=1) is a
    b = load_extractor("random", layers=["relu1_1"], seed=2)
    assert not torch.equal(a.layers[0].weight, b.layers[0].weight)
    vgg_mod.clear_cache()
    assert torch.equal(load_extractor("random", layers=["relu1_1"], seed=1).layers[0].weight, a.layers[0].weight)
    assert a.weights_id == "random(seed=1)"


@pytest.mark.parametrize("form", ["full", "features", "wrapped"])
def test_state_dict_file_round_trip(tmp_path, form):
    ref = load_extractor("random", layers=["relu5_1"], seed=7)
    features = ref.layers.state_dict()
    mean, std = ref.mean.flatten().tolist(), ref.std.flatten().tolist()
    state = {
        "full": {**{f"features.{k}": v for k, v in features.items()}, "classifier.0.weight": torch.zeros(2, 2)},
        "features": features,
        "wrapped": {"state_dict": features, "mean": mean, "std": std},
    }[form]
    path = tmp_path / "vgg.pth"
    torch.save(state, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    for uri in (str(path), path.as_uri()):
        ex = load_extractor(uri, layers=["relu5_1"], sha256=digest)
        assert all(torch.equal(a, b) for a, b in zip(ex.layers.state_dict().values(), features.values()))
        assert ex.weights_id == f"sha256:{digest}"
        if form == "wrapped":  # weights and normalization travel together: same features
            x = torch.rand(1, 3, 32, 32)
            assert torch.allclose(ex(x, ["relu5_1"])["relu5_1"], ref(x, ["relu5_1"])["relu5_1"])
        else:  # a bare state_dict gets the ImageNet statistics
            assert ex.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_hash_mismatch_missing_file_and_non_state_dict(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save(load_extractor("random", layers=["relu1_1"]).layers.state_dict(), path)
    with pytest.raises(WeightsError, match="expected 0000"):
        load_extractor(str(path), layers=["relu1_1"], sha256="0" * 64)
    with pytest.raises(WeightsError, match="does not exist"):
        load_extractor(str(tmp_path / "nope.pth"), layers=["relu1_1"])
    bad = tmp_path / "bad.pth"
    torch.save(nn.Linear(2, 2), bad)  # a pickled module: weights_only=True refuses it
    with pytest.raises(WeightsError, match="refused: the file holds pickled Python objects"):
        load_extractor(str(bad), layers=["relu1_1"])
    wrong = tmp_path / "wrong.pth"
    torch.save({"0.weight": torch.zeros(1)}, wrong)
    with pytest.raises(WeightsError, match="does not fit"):
        load_extractor(str(wrong), layers=["relu1_1"])


def test_other_schemes_go_through_the_opener(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save(load_extractor("random", layers=["relu1_1"]).layers.state_dict(), path)
    seen = []

    def opener(uri):
        seen.append(uri)
        return path.read_bytes()

    load_extractor("s3://bucket/vgg.pth", layers=["relu1_1"], opener=opener)
    assert seen == ["s3://bucket/vgg.pth"]
    with pytest.raises(WeightsError, match="no reader"):
        read_weights_bytes("s3://bucket/other.pth")


def test_pinned_sha256_replaces_the_file_name_prefix_check(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    features = load_extractor("random", layers=["relu5_3"], seed=3).layers.state_dict()
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    path = checkpoints / "vgg16-397923af.pth"  # torchvision's name, other content
    torch.save({f"features.{k}": v for k, v in features.items()}, path)
    with pytest.raises(WeightsError, match="promises one starting 397923af"):
        load_extractor("imagenet1k_v1", layers=["relu1_1"])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    ex = load_extractor("imagenet1k_v1", layers=["relu1_1"], sha256=digest)
    assert torch.equal(ex.layers[0].weight, features["0.weight"])
    # its own id: the pin is not in the pair key, so torchvision's id would have keyed its results
    # as those of the real weights (old: "torchvision:vgg16-397923af.pth")
    assert ex.weights_id == f"imagenet1k_v1:sha256:{digest}"
    # not the id of the same file as a bare state_dict, whose normalization differs (style targets
    # are cached by id in a process)
    for pin in (None, digest):
        assert load_extractor(str(path), layers=["relu1_1"], sha256=pin).weights_id == f"sha256:{digest}"
    assert ex.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_channels_last_extractor_has_channels_last_weights_and_is_cached_apart():
    ex = load_extractor("random", layers=["relu2_1"], memory_format=torch.channels_last)
    convs = [m for m in ex.layers if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert not convs[1].weight.is_contiguous()  # really converted, not a 1x1 degenerate case
    assert ex.memory_format == torch.channels_last
    plain = load_extractor("random", layers=["relu2_1"])
    assert plain is not ex and plain.memory_format == torch.contiguous_format
    assert plain.layers[2].weight.is_contiguous()
    x = torch.rand(1, 3, 32, 32)
    got = ex(x.to(memory_format=ex.memory_format), ["relu2_1"])["relu2_1"]
    want = plain(x, ["relu2_1"])["relu2_1"]
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def _tensor(img):
    return pil_to_tensor(img).float().div(255)[None]


def _balance(ex, content, style, image, params):
    """β-free style/content ratio: Σ_l w_l·style_l / content, on images (1, 3, H, W) in [0, 1]."""
    fx = ex(image, [*params.content_layers, *params.style_layers])
    fc, fs = ex(content, params.content_layers), ex(style, params.style_layers)
    content_term = sum(content_loss(fx[n], fc[n]) for n in params.content_layers)
    style_terms = {n: style_loss(gram_matrix(fx[n], True), gram_matrix(fs[n], True)) for n in params.style_layers}
    weights = dict(zip(params.style_layers, [1 / len(params.style_layers)] * len(params.style_layers)))
    return (weighted_sum(style_terms, weights) / content_term).item()


def test_avg_pooling_keeps_the_style_content_balance_of_max_pooling():
    params = StyleParams()  # the default layers
    ratios = []
    for seed in range(6):
        content, style = (_tensor(pattern((64, 64), kind, seed)) for kind in ("content", "style"))
        image = 0.5 * content + 0.5 * style  # an image part-way between the two: both terms nonzero
        balance = {}
        for pooling in ("max", "avg"):
            layers = [*params.content_layers, *params.style_layers]
            ex = load_extractor("random", layers=layers, pooling=pooling, seed=seed)
            balance[pooling] = _balance(ex, content, style, image, params)
        ratios.append(balance["avg"] / balance["max"])
    # Unscaled average pooling shifts the balance 1.1-2.3x towards style on these nets (geometric mean 1.6).
    geometric_mean = math.exp(sum(map(math.log, ratios)) / len(ratios))
    assert 0.8 <= geometric_mean <= 1.2, ratios
    assert all(2 / 3 <= r <= 1.5 for r in ratios), ratios


def test_style_weight_factor_predicts_the_balance_shift_of_imagenet_normalization(tmp_path):
    params = StyleParams()
    layers = [*params.content_layers, *params.style_layers]
    caffe = load_extractor("random", layers=layers, seed=1)
    path = tmp_path / "vgg.pth"
    torch.save(caffe.layers.state_dict(), path)  # same weights; a bare state_dict gets ImageNet mean/std
    imagenet = load_extractor(str(path), layers=layers)
    assert caffe.input_scale == pytest.approx(255) and caffe.style_weight_factor == pytest.approx(1)
    assert imagenet.input_scale == pytest.approx(4.42, rel=0.01)
    content, style = (_tensor(pattern((48, 48), kind, 1)) for kind in ("content", "style"))
    image = 0.5 * content + 0.5 * style
    shift = _balance(caffe, content, style, image, params) / _balance(imagenet, content, style, image, params)
    assert shift == pytest.approx(imagenet.style_weight_factor, rel=0.05)  # ~3300, not "about 1000"


def test_min_side_follows_the_pools_before_the_deepest_layer():
    params = StyleParams()
    assert min_side([*params.content_layers, *params.style_layers]) == 16  # relu5_1: after 4 pools
    assert min_side(["relu1_1", "conv1_2"]) == 1
    assert min_side(["relu2_1"]) == 2 and min_side(["pool2"]) == 4 and min_side(["pool5"]) == 32
    # The bound is tight: one pixel less breaks the extractor, the minimum runs.
    ex = load_extractor("random", layers=["relu3_1"])
    side = min_side(["relu3_1"])
    assert ex(torch.rand(1, 3, side, 64), ["relu3_1"])["relu3_1"].shape[-2] == 1
    with pytest.raises(RuntimeError, match="too small"):
        ex(torch.rand(1, 3, side - 1, 64), ["relu3_1"])


def test_the_channels_table_is_torchvisions_vgg16():
    """nst_core.tiling estimates memory from VGG16_CHANNELS: it must be what each module outputs."""
    from torchvision.models.vgg import cfgs, make_layers

    from nst_core.params import VGG16_CHANNELS

    x, channels = torch.zeros(1, 3, 32, 32), []
    with torch.no_grad():
        for module in make_layers(cfgs["D"]):
            x = module(x)
            channels.append(x.shape[1])
    assert tuple(channels) == VGG16_CHANNELS and len(VGG16_CHANNELS) == len(VGG16_LAYERS)


def test_a_reduced_precision_pass_never_waits_for_weights_being_loaded():
    """cast() (every bf16/fp16 pass) took the lock load_extractor holds while it reads weights (a
    download, an S3 read): one device's first load stalled the pairs running on the others."""
    import threading

    from nst_core import vgg as vgg_mod

    ex = load_extractor("random", layers=["relu1_1"])
    done = threading.Event()
    with vgg_mod._cache_lock:  # another device's load, in flight
        threading.Thread(target=lambda: (ex.cast(torch.bfloat16), done.set()), daemon=True).start()
        assert done.wait(10)
