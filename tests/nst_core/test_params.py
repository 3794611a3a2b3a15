import re

import pytest
from pydantic import ValidationError

from nst_core import VGG16_LAYERS, StyleParams


def test_defaults_follow_the_design():
    p = StyleParams()
    assert p.content_layers == ["relu4_2"]
    assert p.style_layers == ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
    assert (p.optimizer, p.init, p.preserve_color, p.pooling, p.weights, p.device) == (
        "lbfgs", "content", "none", "max", "imagenet1k_features", "auto")


def test_every_field_has_title_and_description():
    for name, field in StyleParams.model_fields.items():
        assert field.title and field.description, name


def test_unknown_layer_lists_the_valid_names():
    with pytest.raises(ValidationError) as err:
        StyleParams(style_layers=["relu1_1", "relu6_1"])
    msg = str(err.value)
    assert "relu6_1" in msg and all(name in msg for name in VGG16_LAYERS)


def test_layers_given_as_a_tuple_are_checked_and_a_set_is_refused():
    """A tuple skipped the checks (pydantic made it a list after them): a repeated layer merged into
    one weight, the style term silently cut. A set's order changes from process to process, and
    style_layer_weights went to other layers from run to run."""
    with pytest.raises(ValidationError, match="layer names repeat"):
        StyleParams(style_layers=("relu1_1", "relu1_1", "relu2_1"))
    with pytest.raises(ValidationError, match="a list, in order"):
        StyleParams(style_layers={"relu1_1", "relu3_1"})
    assert StyleParams(style_layers=("relu1_1", "relu3_1")).style_layers == ["relu1_1", "relu3_1"]
    with pytest.raises(ValidationError, match="layer names repeat"):
        StyleParams(style_layers=(n for n in ("relu2_1", "relu2_1")))


@pytest.mark.parametrize("bad", [
    {"iterations": 0}, {"image_size": 15}, {"image_size": 4097}, {"style_weight": -1.0},
    {"content_weight": float("nan")}, {"tv_weight": float("inf")}, {"optimizer": "sgd"},
    {"init": "zeros"}, {"preserve_color": "yes"}, {"weights": "  "}, {"pooling": "min"}, {"device": "gpu"},
    {"style_layer_weights": [1.0, 2.0]}, {"style_layer_weights": [1, 1, 1, 1, float("nan")]},
    {"style_blend_weights": [-1.0]}, {"weights_sha256": "abc"}, {"learning_rate": 0}, {"colour": 1},
    {"precision": "fp8"}, {"scales": 0}, {"stop_tolerance": 0}, {"stop_tolerance": 1.5}, {"device": "cuda:x"},
])
def test_invalid_values_are_rejected(bad):
    with pytest.raises(ValidationError):
        StyleParams(**bad)


def test_layer_and_blend_weights_normalize():
    p = StyleParams(style_layers=["relu1_1", "relu2_1"], style_layer_weights=[1, 3], style_blend_weights=[2, 2])
    assert p.layer_weights() == {"relu1_1": 0.25, "relu2_1": 0.75}
    assert p.blend_weights(2) == [0.5, 0.5]
    with pytest.raises(ValueError, match="2 values for 3 style"):
        p.blend_weights(3)


def test_step_size_defaults_per_optimizer():
    assert StyleParams().step_size() == 1.0
    assert StyleParams(optimizer="adam").step_size() == 0.02
    assert StyleParams(optimizer="adam", learning_rate=0.5).step_size() == 0.5


def test_params_import_no_torch_and_the_engine_no_prefect_or_boto3():
    import subprocess
    import sys

    code = "import sys, nst_core.params; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    code = ("import sys, nst_core, nst_core.cli, nst_core.optimize, nst_core.vgg, nst_core.imageio, nst_core.losses; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'boto3', 'botocore')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    # torchvision (~2.5 s to import) only for its named checkpoints: not for random or file weights
    code = ("import sys; from PIL import Image; from nst_core import StyleParams, stylize; "
            "stylize(Image.new('RGB', (48, 40)), Image.new('RGB', (40, 48)), "
            "StyleParams(weights='random', image_size=32, iterations=2, device='cpu')); "
            "assert 'torchvision' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_readme_parameter_table_is_generated_from_the_model():
    from pathlib import Path

    from nst_core.params import markdown_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert markdown_table() in readme, "regenerate the README table with: python -m nst_core.params"


def test_schema_offers_layer_and_device_dropdowns_generated_from_the_one_table():
    props = StyleParams.model_json_schema()["properties"]
    for field in ("content_layers", "style_layers"):
        assert props[field]["items"]["enum"] == list(VGG16_LAYERS)  # the UI's dropdown; the server refuses others
    assert props["device"]["enum"][:4] == ["auto", "cpu", "mps", "cuda"] and "cuda:7" in props["device"]["enum"]
    assert props["precision"]["enum"] == ["auto", "fp32", "tf32", "bf16", "fp16"]


def test_bad_device_message_lists_the_choices():
    with pytest.raises(ValidationError, match="device 'gpu' is not one of auto, cpu, mps, cuda, cuda:0"):
        StyleParams(device="gpu")


def test_fields_run_everyday_first_then_advanced():
    names = list(StyleParams.model_fields)
    assert names[:7] == ["image_size", "iterations", "style_weight", "content_weight", "preserve_color", "init",
                         "tv_weight"]
    assert names.index("device") > names.index("seed") > names.index("style_layers") > names.index("tv_weight")
    # the form's labels stay short: order says which come first, not an "(advanced) (Optional)" label
    assert not any("(advanced)" in info.title for info in StyleParams.model_fields.values())
    assert all(len(info.description) <= 100 for info in StyleParams.model_fields.values())  # one line each


def test_descriptions_say_what_the_engine_does():
    fields = StyleParams.model_fields
    assert "same seed, same output only for the same device, thread count and library versions" in fields[
        "seed"].description
    assert "Upper bound" in fields["iterations"].description and "zero gradient" in fields["iterations"].description


def test_a_blend_count_that_does_not_match_the_styles_is_an_engine_error():
    """Old: a bare ValueError, which callers catching NSTError (stylize_many's per-pair errors, the
    CLI) did not expect. Still a ValueError, for code that caught that."""
    from nst_core import NSTError

    with pytest.raises(NSTError, match="2 values for 1 style") as err:
        StyleParams(style_blend_weights=[2, 1]).blend_weights(1)
    assert isinstance(err.value, ValueError)


def test_all_loss_weights_zero_is_refused():
    """Old: accepted, and every pair spent its whole budget on a constant objective (the content back)."""
    with pytest.raises(ValidationError, match="all 0"):
        StyleParams(content_weight=0, style_weight=0, tv_weight=0)
    StyleParams(content_weight=0, style_weight=0, tv_weight=1e-3)  # a term is left: allowed


@pytest.mark.parametrize("spelled, meant", [
    ("IMAGENET1K_FEATURES", "imagenet1k_features"), ("VGG16_Weights.IMAGENET1K_V1", "imagenet1k_v1"),
    ("vgg16_weights.imagenet1k_features", "imagenet1k_features"), (" Random ", "random"),
    ("./IMAGENET1K_V1", "./IMAGENET1K_V1"), ("s3://b/IMAGENET1K_V1", "s3://b/IMAGENET1K_V1"),
])
def test_torchvisions_own_spellings_of_the_named_weights_are_those_weights(spelled, meant):
    """What a torchvision user types: the enum's member or its qualified name. Old: read as a file
    name, "weights file IMAGENET1K_FEATURES does not exist", naming none of the accepted names.
    One spelling is kept, so the pair keys are those of the lower-case name."""
    assert StyleParams(weights=spelled).weights == meant


def test_a_missing_weights_file_lists_the_names_too():
    from nst_core.errors import WeightsError
    from nst_core.weights import check_weights_file

    with pytest.raises(WeightsError, match="vgg16.pth does not exist.*imagenet1k_features, imagenet1k_v1, random"):
        check_weights_file("vgg16.pth")


def test_a_halo_too_small_for_a_close_gradient_is_refused_naming_the_least():
    """tile_halo 0 or 16 was accepted: each tile's pass is zero-padded at its borders, so the
    gradient was far off (relative error 4.5 at halo 0, 1.40 at 16: README's tiling table) and the
    logged losses ~40% off the true ones, with no word. Halos of at least 32 px, or the layers'
    exact halo where that is smaller (12 px up to relu3_1), are accepted."""
    with pytest.raises(ValidationError, match="tile_halo 0 .* at least 17 px, which tiles use as 32"):
        StyleParams(tile_halo=0)
    assert StyleParams(tile_halo=32).tile_halo == 32
    shallow = {"content_layers": ["relu2_2"], "style_layers": ["relu1_1", "relu2_1", "relu3_1"]}
    assert StyleParams(tile_halo=12, **shallow).tile_halo == 12
    with pytest.raises(ValidationError, match="at least 9 px, which tiles use as 12"):
        StyleParams(tile_halo=8, **shallow)


def test_an_image_size_no_image_can_have_for_the_layers_is_refused_up_front():
    """image_size 16 with content layer pool5 (32 px at least): accepted, then every pair of a
    batch downloaded, decoded and failed blaming its image ("too small")."""
    with pytest.raises(ValidationError, match="image_size 16 .* at least 32 px"):
        StyleParams(image_size=16, content_layers=["pool5"])
    assert StyleParams(image_size=32, content_layers=["pool5"]).image_size == 32


def test_a_halo_that_tiles_round_up_to_32_is_accepted_and_one_without_tiles_is_not_judged():
    """The first version judged the number as written: 20 px, which tiles round up to 32 (the
    pools' 16 px), was refused as "far off", and so was any halo with tiling off."""
    from nst_core.tiling import tiling_for

    p = StyleParams(tile_halo=20, tile_size=64, weights="random", device="cpu")
    assert tiling_for(p, 200, 200, "cpu").halo == 32
    with pytest.raises(ValidationError, match="at least 17 px, which tiles use as 32"):
        StyleParams(tile_halo=16)
    assert StyleParams(tile_halo=0, tile_size="off").tile_halo == 0


def test_weights_too_large_to_sum_keep_their_shares():
    """Each weight finite, their sum not: 1e308 twice summed to inf and every share to 0, so the
    style term vanished (the content came back pixel for pixel, reported with a style loss of 0)."""
    p = StyleParams(style_layer_weights=[1e308, 1e308, 1.0, 1.0, 1.0], style_blend_weights=[1e308, 1e308])
    shares = p.layer_weights()
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["relu1_1"] == shares["relu2_1"] == pytest.approx(0.5)
    assert p.blend_weights(2) == [0.5, 0.5]
    usual = StyleParams(style_layer_weights=[0.5, 0.2, 0.1, 0.1, 0.1])
    assert usual.layer_weights()["relu1_1"] == 0.5 / sum([0.5, 0.2, 0.1, 0.1, 0.1])  # unchanged, bit for bit


@pytest.mark.parametrize("weights, message", [
    ("s3:///vgg16.pth", "names its bucket"), ("file://alice:s3cret@host/vgg16.pth", "a file URI with a host ('host')")])
def test_a_weights_uri_no_reader_reads_is_refused_where_the_parameters_are_checked(weights, message):
    """Old: accepted here, refused by the run's preflight after a flow run had started (a file URI's
    user:password@ quoted in the refusal). Other schemes are an opener's (stylize's ``opener``)."""
    with pytest.raises(ValidationError, match=re.escape(message)) as err:
        StyleParams(weights=weights)
    assert "s3cret" not in str(err.value).split("input_value")[0]
    for fine in ("./my:vgg16.pth", "C:/models/vgg16.pth", "s3://b/models/vgg16.pth", "file:///m/vgg16.pth",
                 "https://models.example/vgg16.pth"):
        assert StyleParams(weights=fine).weights == fine
