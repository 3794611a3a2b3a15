import io

import numpy as np
import pytest
from PIL import Image

from nst_core import ImageDecodeError, NSTError, StyleParams
from nst_core.errors import ImageTooSmallError
from nst_core.imageio import check_min_side, decode_image, encode_image, format_for, resize_longest
from nst_core.vgg import min_side

from helpers import pattern, to_bytes


def test_exif_orientation_is_applied():
    img = pattern((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    decoded = decode_image(to_bytes(img, "JPEG", exif=exif), "rotated.jpg")
    assert decoded.rgb.size == (20, 40)


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "RGB", "I;16"])
def test_modes_become_rgb(mode):
    img = pattern((16, 12)).convert(mode) if mode != "I;16" else None
    if mode == "I;16":
        arr = np.full((12, 16), 65535, dtype=np.uint16)
        arr[:, :8] = 257 * 100
        img = Image.frombytes("I;16", (16, 12), arr.tobytes())
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    decoded = decode_image(to_bytes(img, fmt), f"x.{mode}")
    assert decoded.rgb.mode == "RGB" and decoded.rgb.size == (16, 12) and decoded.alpha is None
    if mode == "I;16":  # 16-bit samples are scaled to 8 bits, not clipped
        assert decoded.rgb.getpixel((0, 0)) == (100, 100, 100)
        assert decoded.rgb.getpixel((15, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_alpha_is_kept_aside(mode):
    rgba = pattern((16, 12)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((16, 12)))
    img = rgba.convert(mode) if mode != "P" else pattern((16, 12)).convert("P")
    if mode == "P":
        img.info["transparency"] = img.getpixel((0, 0))
    decoded = decode_image(to_bytes(img), "alpha.png")
    assert decoded.rgb.mode == "RGB" and decoded.alpha is not None and decoded.alpha.size == (16, 12)


def test_pixel_limit_rejects_before_decoding():
    with pytest.raises(ImageDecodeError, match="big.png.*exceeds the limit of 1000"):
        decode_image(to_bytes(pattern((64, 64))), "big.png", max_pixels=1000)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"definitely not an image", "not a recognized image"),
    (to_bytes(pattern((64, 64)))[:200], "corrupt or truncated"),
])
def test_bad_bytes_name_the_input(data, reason):
    with pytest.raises(ImageDecodeError, match=f"bad-input.png: .*{reason}") as err:
        decode_image(data, "bad-input.png")
    assert err.value.name == "bad-input.png"


def test_resize_longest_keeps_aspect():
    assert resize_longest(pattern((64, 32)), 32).size == (32, 16)
    assert resize_longest(pattern((20, 40)), 80).size == (40, 80)


def test_encode_round_trips_and_alpha():
    rgba = pattern((16, 12)).convert("RGBA")
    rgba.putalpha(128)
    for fmt in ("png", "webp"):
        back = Image.open(io.BytesIO(encode_image(rgba, fmt)))
        assert back.mode == "RGBA" and back.getpixel((3, 3))[3] in range(120, 137)
    jpeg = Image.open(io.BytesIO(encode_image(rgba, "jpeg", quality=80)))
    assert jpeg.format == "JPEG" and jpeg.mode == "RGB"


def test_format_for_extension():
    assert [format_for(p) for p in ("a.png", "b.JPG", "c.jpeg", "d.webp")] == ["png", "jpeg", "jpeg", "webp"]
    with pytest.raises(NSTError, match="unsupported output extension .gif"):
        format_for("x.gif")


def test_thin_image_is_refused_with_its_name_size_and_the_minimum():
    layers = [*StyleParams().content_layers, *StyleParams().style_layers]
    thin = pattern((512, 12))
    with pytest.raises(ImageTooSmallError) as err:
        check_min_side(thin, min_side(layers), "thin.png")
    msg = str(err.value)
    assert err.value.name == "thin.png" and isinstance(err.value, ImageDecodeError)
    assert "512x12" in msg and "16 px" in msg
    check_min_side(pattern((16, 16)), min_side(layers), "ok.png")  # the minimum itself is accepted
