import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from nst_core import ImageDecodeError, ImageTooSmallError, NSTError, StyleParams  # the public names
from nst_core.imageio import check_min_side, decode_image, encode_image, format_for, resize_longest, split_alpha
from nst_core.params import min_side

from helpers import pattern, to_bytes


def test_exif_orientation_is_applied():
    img = pattern((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    decoded = decode_image(to_bytes(img, "JPEG", exif=exif), "rotated.jpg")
    assert decoded.rgb.size == (20, 40)



XMP_TURNED = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
              b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')


@pytest.mark.parametrize("mutations,warned,xmp", [
    ([(17, 26)], True, False), ([(33, 0), (17, 95), (17, 3)], True, False),
    # a damaged TIFF header (offsets 6-13), which Pillow reads as "no EXIF" on decode
    ([(9, 207)], False, False), ([(6, 0)], False, False), ([(6, 0)], False, True)])
def test_a_damaged_exif_block_still_decodes_as_stored(mutations, warned, xmp, caplog):
    """Bytes of the EXIF block changed (offsets from "Exif"): Pillow's exif_transpose raised
    TypeError or struct.error, which escaped as a traceback naming no input. The pixels are intact:
    the image decodes as stored (its orientation unread), as image viewers show it. A damaged TIFF
    header failed the pair as "corrupt or truncated image": the orientation was read a second
    time, unguarded, after the guarded turn. And stylize(), which calls split_alpha again on what
    it is given, turned it after all when XMP also said how (Lightroom writes both)."""
    img = pattern((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Cam"
    data = bytearray(to_bytes(img, "JPEG", exif=exif, **({"xmp": XMP_TURNED} if xmp else {})))
    at = data.find(b"Exif")
    for offset, value in mutations:
        data[at + offset] = value
    decoded = decode_image(bytes(data), "damaged.jpg")
    assert decoded.rgb.size == (40, 20)
    assert caplog.text.count("damaged.jpg: damaged EXIF block, orientation not applied") == warned
    caplog.clear()
    assert split_alpha(decoded.merged()).rgb.size == (40, 20)  # no second turn, no second warning
    assert "damaged EXIF block" not in caplog.text
    # the same file opened by an API caller and handed to stylize()
    assert split_alpha(Image.open(io.BytesIO(bytes(data)))).rgb.size in ((40, 20), (20, 40) if xmp else (40, 20))


def test_only_the_listed_image_formats_are_decoded_whatever_the_name():
    """An EPS file named .jpg: Pillow opened it with its EPS reader, which runs Ghostscript where it
    is installed (a PostScript interpreter fed untrusted input). Only IMAGE_EXTENSIONS' decoders run."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n"
    with pytest.raises(ImageDecodeError, match="photo.jpg: not a recognized image format"):
        decode_image(eps, "photo.jpg")

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


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_a_high_bit_depth_image_is_scaled_in_a_few_bytes_a_pixel(mode):
    """16-bit, 32-bit and float samples were scaled through five float64 copies of the image
    (about 40 bytes a pixel: 2.5 GB for a 64 MP scan, within the pixel limit). Counted by
    tracemalloc (numpy's arrays, not Pillow's own buffers), bytes, not seconds."""
    import tracemalloc

    from nst_core.imageio import _to_8bit

    arr = (np.arange(1000 * 1000, dtype=np.uint32).reshape(1000, 1000) % 65536)
    img = {"I;16": lambda: Image.frombytes("I;16", (1000, 1000), arr.astype(np.uint16).tobytes()),
           "I": lambda: Image.fromarray(arr.astype(np.int32), mode="I"),
           "F": lambda: Image.fromarray((arr / 65535).astype(np.float32), mode="F")}[mode]()
    tracemalloc.start()
    try:
        out = _to_8bit(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.mode == "L" and out.getpixel((257, 0)) == 1 and out.getpixel((535, 65)) == 255
    assert peak < 10 * 1000 * 1000, f"{peak / 1e6:.1f} bytes a pixel"


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_kept_aside(mode):
    rgba = pattern((16, 12)).convert("RGBA")
    gradient = Image.linear_gradient("L").resize((16, 12))
    rgba.putalpha(gradient)
    decoded = decode_image(to_bytes(rgba.convert(mode)), "alpha.png")
    assert decoded.rgb.mode == "RGB" and decoded.alpha is not None
    assert np.array_equal(np.asarray(decoded.alpha), np.asarray(gradient))


def test_palette_transparency_becomes_alpha():
    img = pattern((16, 12)).convert("P")
    transparent = img.getpixel((0, 0))
    img.info["transparency"] = transparent
    decoded = decode_image(to_bytes(img), "palette.png")
    index = np.asarray(img)
    assert np.array_equal(np.asarray(decoded.alpha) == 0, index == transparent)


def test_pixel_limit_rejects_before_decoding():
    with pytest.raises(ImageDecodeError, match="big.png.*exceeds the limit of 1000"):
        decode_image(to_bytes(pattern((64, 64))), "big.png", max_pixels=1000)
    # Only the header is there: a limit checked after decoding would report a truncated file instead.
    header_only = to_bytes(Image.new("RGB", (4000, 3000)))[:64]
    with pytest.raises(ImageDecodeError, match="4000x3000 = 12000000 pixels exceeds"):
        decode_image(header_only, "huge.png", max_pixels=1_000_000)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width×height RGB pixels and holds almost none (no allocation to make it)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own, past 89.5 MP
@pytest.mark.parametrize("width,height", [(10_000, 10_000), (100_000, 100_000)])
def test_a_huge_header_is_refused_quoting_the_projects_limit_not_pillows(width, height):
    """Past Pillow's own thresholds (89.5 and 179 MP) the refusal quoted them ("limit of
    178956970"): a user could not tell what the limit is (64,000,000, README "Limits")."""
    from nst_core.imageio import MAX_PIXELS

    with pytest.raises(ImageDecodeError, match=f"huge.png: .*{width * height} pixels exceeds the limit of {MAX_PIXELS}"):
        decode_image(_png_header(width, height), "huge.png")


def test_decoding_in_threads_leaves_the_process_warning_filters_as_they_were():
    """Pair tasks decode in threads; warnings.catch_warnings() around each decode saved and
    restored the process-wide filter list across threads, and left Pillow's decompression-bomb
    warning turned into an error for the whole process (a serve worker, the user's code)."""
    import threading
    import warnings

    data = to_bytes(pattern((64, 48)))
    before = list(warnings.filters)
    threads = [threading.Thread(target=lambda: [decode_image(data, "x.png") for _ in range(200)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert warnings.filters == before


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"definitely not an image", "not a recognized image"),
    (to_bytes(pattern((64, 64)))[:200], "corrupt or truncated"),
])
def test_bad_bytes_name_the_input(data, reason):
    with pytest.raises(ImageDecodeError, match=f"bad-input.png: .*{reason}") as err:
        decode_image(data, "bad-input.png")
    assert err.value.name == "bad-input.png"


def _tiff_with_rational_strip_offsets() -> bytes:
    """A TIFF whose StripOffsets tag (273) is retyped RATIONAL: Pillow's decoder raises TypeError."""
    import struct

    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (1, 2, 3)).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, at)[0] == 273:
            data += struct.pack("<II", 8, 1)
            struct.pack_into("<HHII", data, at, 273, 5, 1, len(data) - 8)
    return bytes(data)


def test_a_crafted_file_that_trips_the_decoder_names_the_input():
    """Old: TypeError("'IFDRational' object cannot be interpreted as an integer") escaped: `nst
    stylize` printed a traceback, and in a batch the pair's error named neither input nor reason."""
    with pytest.raises(ImageDecodeError, match="evil.tif: corrupt or truncated image: .*IFDRational"):
        decode_image(_tiff_with_rational_strip_offsets(), "evil.tif")


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
        check_min_side(thin.size, min_side(layers), "thin.png")
    msg = str(err.value)
    assert err.value.name == "thin.png" and isinstance(err.value, ImageDecodeError)
    assert "512x12" in msg and "16 px" in msg
    check_min_side(pattern((16, 16)).size, min_side(layers), "ok.png")  # the minimum itself is accepted


# --- colour profiles and high-bit-depth modes ------------------------------------------------

# sRGB's primaries adapted to the D50 profile connection space (the colorants of sRGB profiles).
_SRGB_COLORANTS = {"r": (0.4361, 0.2225, 0.0139), "g": (0.3851, 0.7169, 0.0971), "b": (0.1431, 0.0606, 0.7141)}


def _icc_rgb_profile(colorants: dict, gamma: float, description: str = "test RGB") -> bytes:
    """A minimal ICC v2 RGB matrix/TRC display profile: one XYZ colorant and one gamma per channel."""
    import struct

    def s15(v):
        return struct.pack(">i", round(v * 65536))

    def xyz(v):
        return b"XYZ " + b"\0" * 4 + b"".join(s15(c) for c in v)

    ascii_desc = description.encode() + b"\0"
    tags = {
        b"desc": b"desc" + b"\0" * 4 + struct.pack(">I", len(ascii_desc)) + ascii_desc + b"\0" * (4 + 4 + 2 + 1 + 67),
        b"wtpt": xyz((0.9642, 1.0, 0.8249)),
        **{f"{c}XYZ".encode(): xyz(colorants[c]) for c in "rgb"},
        **{f"{c}TRC".encode(): b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(gamma * 256)) for c in "rgb"},
    }
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags.items():
        body += b"\0" * (-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (
        struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + b"\0" * 12
        + b"acsp" + b"\0" * 24 + struct.pack(">I", 0) + b"".join(s15(c) for c in (0.9642, 1.0, 0.8249)) + b"\0" * 48
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


def _srgb_encode(linear: float) -> float:
    return 12.92 * linear if linear <= 0.0031308 else 1.055 * linear ** (1 / 2.4) - 0.055


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_embedded_icc_profile_is_converted_to_srgb(fmt):
    linear = _icc_rgb_profile(_SRGB_COLORANTS, gamma=1.0, description="linear sRGB")
    grey = Image.new("RGB", (16, 12), (128, 128, 128))
    decoded = decode_image(to_bytes(grey, fmt, icc_profile=linear), f"linear.{fmt}").rgb
    # Samples are linear light: 128/255 of full intensity is sRGB-encoded as ~188, not 128.
    expected = round(255 * _srgb_encode(128 / 255))
    assert all(abs(v - expected) <= 2 for v in decoded.getpixel((5, 5))), decoded.getpixel((5, 5))


def test_icc_primaries_decide_the_colour():
    swapped = dict(_SRGB_COLORANTS, r=_SRGB_COLORANTS["g"], g=_SRGB_COLORANTS["r"])  # R and G primaries swapped
    red_samples = Image.new("RGBA", (8, 8), (255, 0, 0, 100))
    decoded = decode_image(to_bytes(red_samples, icc_profile=_icc_rgb_profile(swapped, gamma=2.2)), "swapped.png")
    r, g, b = decoded.rgb.getpixel((3, 3))
    assert g >= 250 and r <= 5 and b <= 5  # the first channel is green in this profile
    assert decoded.alpha.getpixel((3, 3)) == 100  # alpha is not colour-managed


def test_outputs_are_tagged_srgb_and_untagged_inputs_unchanged():
    img = pattern((16, 12))
    for fmt in ("png", "jpeg", "webp"):
        out = Image.open(io.BytesIO(encode_image(img, fmt)))
        assert "sRGB" in ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(out.info["icc_profile"])))
    back = decode_image(encode_image(img, "png"), "round-trip.png").rgb  # sRGB -> sRGB: unchanged
    diff = np.abs(np.asarray(back, dtype=int) - np.asarray(img, dtype=int))
    assert diff.max() <= 1


def _tiff(arr: np.ndarray, mode: str) -> bytes:
    img = Image.frombytes(mode, arr.shape[::-1], arr.tobytes()) if mode == "I;16" else Image.fromarray(arr, mode=mode)
    return to_bytes(img, "TIFF")


@pytest.mark.parametrize("name,data,low,high", [
    ("unit-float.tif", lambda a: _tiff((a / 255).astype(np.float32), "F"), 0.0, 1.0),  # [0, 1] floats: black before
    ("byte-float.tif", lambda a: _tiff(a.astype(np.float32), "F"), 0.0, 255.0),
    ("16bit.tif", lambda a: _tiff((a * 257).astype(np.uint16), "I;16"), 0, 65535),
    ("16bit.png", lambda a: to_bytes(Image.frombytes("I;16", (16, 4), (a * 257).astype("<u2").tobytes())), 0, 65535),
    ("32bit-8bit-data.tif", lambda a: _tiff(a.astype(np.int32), "I"), 0, 255),  # was divided by 257: black
    ("32bit-full.tif", lambda a: _tiff((a.astype(np.int64) * 8421504).astype(np.int32), "I"), 0, 2**31 - 1),
])
def test_high_bit_depth_modes_are_scaled_by_their_range(name, data, low, high):
    levels = np.tile(np.array([0, 100, 200, 255] * 4, dtype=np.float64), (4, 1))  # (4, 16): 8-bit levels
    decoded = decode_image(data(levels), name).rgb
    got = np.asarray(decoded)[..., 0]
    assert np.abs(got - levels).max() <= 1, (name, got[0, :4])


def test_a_unit_float_image_with_a_few_highlights_above_1_is_read_as_unit_floats():
    """A linear render's highlights (or rounding: 1.0001) go past 1.0. Old: one such sample made
    the whole [0, 1] image read as 0-255, so it came out black; now the few above 1 are clipped."""
    arr = np.tile(np.linspace(0, 1, 100, dtype=np.float32), (100, 1))
    arr[0, :10] = 1.5  # 0.1% of the samples
    got = np.asarray(decode_image(_tiff(arr, "F"), "render.tif").rgb)[..., 0].astype(int)
    assert abs(got[50, 50] - round(255 * arr[50, 50])) <= 1 and got[0, 0] == 255, got[50, 45:55]
    # a dark 0-255 float image (a night sky: samples under 1, 1% stars at 250) stays 0-255
    sky = np.full((100, 100), 0.5, dtype=np.float32)
    sky[0, :100] = 250.0
    got = np.asarray(decode_image(_tiff(sky, "F"), "sky.tif").rgb)[..., 0].astype(int)
    assert got[50, 50] <= 1 and got[0, 0] == 250, (got[50, 50], got[0, 0])


def test_an_apngs_hidden_default_image_is_not_the_one_read():
    """An APNG may carry a default image outside its animation, for decoders without APNG (a
    poster, "this viewer shows no animation"). Old: that image was stylized; now the first frame
    of the animation, which viewers and browsers show. An APNG whose default image is its first
    frame reads that frame."""
    red, green, blue = (Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255)))
    for default_image, shown in ((True, (0, 255, 0)), (False, (255, 0, 0))):
        buf = io.BytesIO()
        red.save(buf, "PNG", save_all=True, append_images=[green, blue], default_image=default_image)
        assert decode_image(buf.getvalue(), "anim.png").rgb.getpixel((0, 0)) == shown


def test_decoded_images_carry_no_profile_so_conversion_happens_once():
    linear = _icc_rgb_profile(_SRGB_COLORANTS, gamma=1.0)
    grey = Image.new("L", (8, 8), 128)  # an RGB profile left on a greyscale image: ignored, not applied later
    for img in (Image.new("RGB", (8, 8), (128, 128, 128)), grey):
        decoded = decode_image(to_bytes(img, icc_profile=linear), "tagged.png")
        assert "icc_profile" not in decoded.rgb.info
        again = split_alpha(decoded.merged())  # what stylize() does with the image it is given
        assert again.rgb.getpixel((3, 3)) == decoded.rgb.getpixel((3, 3))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_transparent_colour_key_becomes_alpha(mode):
    # PNG tRNS on a grey or RGB image (one colour marked transparent) was dropped: alpha None.
    img = pattern((16, 12)).convert(mode)
    key = img.getpixel((0, 0))
    img.info["transparency"] = key
    decoded = decode_image(to_bytes(img), "keyed.png")
    assert decoded.alpha is not None
    pixels = np.asarray(img)
    hidden = pixels == key if mode == "L" else (pixels == np.array(key)).all(-1)
    assert np.array_equal(np.asarray(decoded.alpha) == 0, hidden) and hidden.any() and not hidden.all()
    assert decoded.rgb.mode == "RGB"


def test_to_tensor_and_to_image_round_trip_rgb_and_refuse_other_modes():
    # numpy in place of torchvision's pil_to_tensor/to_pil_image (not imported for random or
    # file weights): the same pixels both ways; a non-RGB image is an error, not a silent convert
    # (convert("RGB") clips a 16-bit image to white and drops alpha)
    import torch

    from nst_core.imageio import to_image, to_tensor

    img = pattern((40, 30), "content")
    x = to_tensor(img, "cpu")
    assert x.shape == (1, 3, 30, 40) and x.dtype == torch.float32 and x.is_contiguous()
    assert np.array_equal(np.asarray(to_image((x * 255).round().to(torch.uint8))), np.asarray(img))
    channels_last = (x * 255).round().to(torch.uint8).contiguous(memory_format=torch.channels_last)
    assert np.array_equal(np.asarray(to_image(channels_last)), np.asarray(img))
    for mode in ("I;16", "RGBA", "L"):
        with pytest.raises(ValueError, match=f"not mode {mode}"):
            to_tensor(Image.new(mode, (8, 8)), "cpu")


def test_an_image_given_to_the_api_is_turned_as_its_exif_says():
    """The Python API takes PIL images (Image.open of a phone's JPEG): decode_image turned them by
    their EXIF orientation, split_alpha (stylize's way in) did not: the result came out sideways."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    opened = Image.open(io.BytesIO(to_bytes(pattern((40, 20)), "JPEG", exif=exif)))
    assert split_alpha(opened).rgb.size == (20, 40)
    once = decode_image(to_bytes(pattern((40, 20)), "JPEG", exif=exif), "rotated.jpg")
    assert split_alpha(once.rgb).rgb.size == (20, 40)  # already upright: not turned twice


@pytest.mark.parametrize("mode", ["RGBa", "La"])
def test_premultiplied_alpha_is_alpha(mode):
    """Old: ValueError 'The image has no channel "A"' (these modes name it "a")."""
    rgba = pattern((20, 10)).convert("RGBA")
    rgba.putalpha(Image.new("L", (20, 10), 128))
    img = rgba.convert(mode) if mode == "RGBa" else rgba.convert("LA").convert("La")
    decoded = split_alpha(img)
    assert decoded.rgb.mode == "RGB" and decoded.alpha is not None
    assert set(np.asarray(decoded.alpha).ravel().tolist()) == {128}


def test_a_16_bit_grey_png_keeps_its_transparent_colour_key():
    """PNG tRNS on a 16-bit grey image: the key is a 16-bit sample (old: dropped with the bit depth)."""
    a = np.full((20, 30), 40000, np.uint16)
    a[:, :10] = 1000
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", transparency=1000)
    alpha = decode_image(buf.getvalue(), "grey16.png").alpha
    assert alpha is not None
    assert (np.asarray(alpha)[:, :10] == 0).all() and (np.asarray(alpha)[:, 10:] == 255).all()


def _png16_rgb(pixels: np.ndarray, key: tuple[int, int, int]) -> bytes:
    """A 16-bit RGB PNG with a tRNS colour key (Pillow writes neither)."""
    import struct
    import zlib

    h, w, _ = pixels.shape
    chunk = lambda k, d: struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d))  # noqa: E731
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"tRNS", struct.pack(">HHH", *key)) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("key", [(0, 0, 0), (200, 200, 200)])
def test_a_16_bit_rgb_pngs_colour_key_makes_no_pixel_transparent(key):
    """The README says this key is not kept; Pillow kept it and compared it with the pixels cut to
    8 bits: a dark photo (every sample 200 of 65535) against the key black came out wholly
    transparent, and with the key (200, 200, 200) a bright grey (51400) became holes."""
    pixels = np.full((16, 24, 3), 200, np.uint16)
    pixels[:, 12:] = 51400
    decoded = decode_image(_png16_rgb(pixels, key), "photo16.png")
    assert decoded.alpha is None and decoded.rgb.mode == "RGB"


def _progressive_with_repeated_scan(times: int, fmt: str = "JPEG") -> bytes:
    """A progressive JPEG (or a camera's MPO: JPEGs with an index) whose first image's last scan is
    repeated ``times`` times before its end (libjpeg only warns): each is another pass over the image."""
    buf = io.BytesIO()
    image = Image.new("RGB", (64, 64), (120, 130, 140))
    image.save(buf, fmt, progressive=True, quality=90, **({"save_all": True, "append_images": [image]} if fmt == "MPO" else {}))
    data = buf.getvalue()
    eoi = data.index(b"\xff\xd9")
    last = data.rindex(b"\xff\xda", 0, eoi)
    return data[:eoi] + data[last:eoi] * times + data[eoi:]


@pytest.mark.parametrize("fmt", ["JPEG", "MPO"])
def test_a_jpeg_of_thousands_of_scans_is_refused_before_it_is_decoded(fmt):
    """Decoding time grows with the scans: a 4096 px progressive JPEG with 30,000 repeated 33-byte
    scans (1.2 MB) took 36 s, and within the input size limit hours, in C, where neither Ctrl-C nor
    pair_timeout_s reaches, holding one of the two decode slots."""
    assert Image.open(io.BytesIO(_progressive_with_repeated_scan(50, fmt))).format == fmt
    assert decode_image(_progressive_with_repeated_scan(50, fmt), "fine.jpg").rgb.size == (64, 64)
    with pytest.raises(ImageDecodeError, match=r"bomb.jpg.*scans"):
        decode_image(_progressive_with_repeated_scan(5000, fmt), "bomb.jpg")
