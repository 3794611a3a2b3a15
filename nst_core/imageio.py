"""Bytes <-> images: EXIF orientation, colour profiles, modes, alpha, pixel limits, resizing, encoding.

Every error names the input it is about (``ImageDecodeError(name, reason)``). Decoded images
are sRGB: an embedded ICC profile is converted on decode, and outputs carry an sRGB profile.
"""

from __future__ import annotations

import io
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import PurePath
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from .errors import ImageDecodeError, ImageTooSmallError, NSTError

if TYPE_CHECKING:  # torch is imported where used: decoding alone does not load it
    import torch

__all__ = [
    "DecodedImage",
    "MAX_PIXELS",
    "MAX_INPUT_BYTES",
    "FORMATS",
    "QUALITY_FORMATS",
    "FORMAT_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "decode_image",
    "split_alpha",
    "fit_longest",
    "resize_longest",
    "check_min_side",
    "encode_image",
    "format_for",
    "to_tensor",
    "quantize",
    "to_image",
]

#: Largest accepted input, width·height. Larger files are rejected before their pixels are decoded.
MAX_PIXELS = 64_000_000
#: Largest accepted input file: an uncompressed 16-bit RGBA image of MAX_PIXELS (8 bytes a pixel)
#: and 1 MiB of headers. No image decode_image accepts is larger, so a larger object is refused
#: before it is read (a 50 GB object in an input prefix must not fill a worker's memory).
MAX_INPUT_BYTES = 8 * MAX_PIXELS + 2**20
#: Output formats and their file extensions (the first is the one written): the one list of them.
FORMAT_EXTENSIONS = {"jpeg": (".jpg", ".jpeg"), "png": (".png",), "webp": (".webp",)}
#: Output formats by file extension.
FORMATS = {ext: fmt for fmt, exts in FORMAT_EXTENSIONS.items() for ext in exts}
#: Image files by extension (lowercase): the output formats and the ones decode_image reads besides.
IMAGE_EXTENSIONS = (*FORMATS, ".bmp", ".tif", ".tiff", ".gif")
#: Pillow decoders tried on input bytes, whatever the file's name: those of IMAGE_EXTENSIONS (JPEG's
#: also opens cameras' multi-picture files). Never the rest: a ".jpg" holding EPS would run Ghostscript.
DECODERS = ("PNG", "JPEG", "WEBP", "BMP", "DIB", "TIFF", "GIF")
#: Most scans a JPEG may hold (counted as SOS markers, an embedded thumbnail's too). Encoders write
#: 1 (baseline) to ~20 (progressive); each scan is a pass over the image in libjpeg, where neither
#: Ctrl-C nor pair_timeout_s reaches, so a crafted file of thousands decoded for hours (4096 px,
#: 30,000 repeated 33-byte scans: 36 s for 1.2 MB).
MAX_JPEG_SCANS = 1000
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image and, when the input had one, its alpha channel (mode L, same size)."""

    rgb: Image.Image
    alpha: Image.Image | None = None

    def merged(self) -> Image.Image:
        """RGBA when there is alpha, else the RGB image (what stylize() takes)."""
        if self.alpha is None:
            return self.rgb
        rgba = self.rgb.copy()
        rgba.putalpha(self.alpha)
        return rgba


_ORIENTATION = 0x0112  # the EXIF tag
#: Where Pillow's getexif() reads an orientation from: the EXIF block, XMP (tiff:Orientation), a PNG's
#: EXIF text chunk.
_ORIENTATION_SOURCES = ("exif", "xmp", "XML:com.adobe.xmp", "Raw profile type exif")
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_SRGB_ICC = _SRGB.tobytes()
#: Which Pillow mode an ICC profile's colour space describes.
_MODE_OF_SPACE = {"RGB": "RGB", "GRAY": "L", "CMYK": "CMYK"}


def _to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth single-channel modes -> L, scaled by the range their samples use.

    I;16*: 16-bit samples, /257. F: floats in [0, 1] (the usual convention) ×255, the few above 1
    (at most 1 in 50, none above 16: highlights of a linear render, rounding) clipped; else taken
    as 0-255 (a dark 0-255 image's stars at 250 are no highlights), then 0-65535. I (32-bit, e.g. TIFF): 0-255, 0-65535 or the full 32-bit
    range, whichever the largest sample fits; the mode alone does not say which was meant.
    Negative samples and NaN become 0. One float32 copy, scaled in place (5 bytes a pixel with
    the result: a 64 MP scan must not take GBs); float32 rounds no 16-bit sample to another level.
    """
    arr = np.array(img, dtype=np.float32)
    np.nan_to_num(arr, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(arr.max()) if arr.size else 0.0
    if img.mode.startswith("I;16"):
        full = 65535.0
    elif img.mode == "F" and (peak <= 1.0 or (peak <= 16.0 and np.count_nonzero(arr > 1.0) * 50 <= arr.size)):
        full = 1.0  # one sample at 1.0001 read the whole image as 0-255: black
    else:
        full = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else 2.0**31 - 1
    arr *= np.float32(255.0 / full)
    np.clip(arr, 0, 255, out=arr)
    np.rint(arr, out=arr)
    return Image.fromarray(arr.astype(np.uint8), mode="L")


def _to_srgb(img: Image.Image, icc: bytes) -> Image.Image:
    """Samples described by ``icc`` -> sRGB (RGB). Mode L, RGB or CMYK in.

    A profile that cannot be read, or that describes another colour space than the samples
    (a stale profile left by an editor), is ignored and the samples are taken as sRGB, as web
    browsers do: refusing the image would be worse than a small colour shift.
    """
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if _MODE_OF_SPACE.get(profile.profile.xcolor_space.strip()) != img.mode:
            return img
        return ImageCms.profileToProfile(
            img, profile, _SRGB, renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC, outputMode="RGB"
        )
    except (OSError, ValueError, ImageCms.PyCMSError):
        return img


def split_alpha(img: Image.Image, name: str = "image") -> DecodedImage:
    """Any Pillow mode -> sRGB RGB plus alpha (or None), turned as its EXIF orientation says
    (as stored, with a warning naming ``name``, when its EXIF block is damaged).

    Palette transparency and a grey or RGB transparent colour key become alpha; an embedded ICC profile (``img.info["icc_profile"]``)
    is converted to sRGB; alpha is kept as it is (it is not colour). A 16-bit RGB PNG's colour key
    is not kept: Pillow gives its pixels in 8 bits, and the 16-bit key matches none of them exactly.
    """
    img = _upright(img, name)
    icc = img.info.get("icc_profile")
    key = img.info.get("transparency")
    alpha = None
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("1", "L", "RGB") and key is not None:
        # A transparent colour key (PNG tRNS on a grey or RGB image) is alpha too.
        img = img.convert("LA" if img.mode in ("1", "L") else "RGBA")
    elif img.mode in ("RGBa", "La"):  # premultiplied: un-premultiply; the channel is named "a" there
        img = img.convert("RGBA" if img.mode == "RGBa" else "LA")
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        if isinstance(key, int) and img.mode != "F":  # a 16-bit grey key, compared before the samples lose bits
            alpha = Image.fromarray(np.where(np.asarray(img) == key, 0, 255).astype(np.uint8), mode="L")
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA"):
        alpha = img.getchannel("A")
        img = img.convert("L" if img.mode == "LA" else "RGB")
    if icc:
        img = _to_srgb(img, icc)
    rgb = img.convert("RGB")
    # The pixels are sRGB and upright now; a profile or orientation left in info (the source's, or
    # lcms's sRGB) would invite a second conversion or turn, or a second warning about a damaged
    # block, by the next split_alpha (stylize() calls it on the images it is given).
    for key in ("icc_profile", *_ORIENTATION_SOURCES):
        rgb.info.pop(key, None)
    return DecodedImage(rgb, alpha)


#: What else Pillow's decoders raise on crafted files, caught around opening and loading only (in
#: our own conversions after them it would be a bug, and keeps its traceback).
_CRAFTED = (TypeError, IndexError, KeyError, ZeroDivisionError, struct.error)


def decode_image(data: bytes, name: str, *, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """Decode image bytes with EXIF orientation applied. Raises ImageDecodeError naming ``name``."""
    if not data:
        raise ImageDecodeError(name, "file is empty (0 bytes)")
    try:
        # No warnings.catch_warnings() here: pairs decode in threads, and its save/restore of the
        # process-wide filter list across them left its filter behind for the whole process. So a
        # header past Pillow's own threshold (89.5 MP) gets Pillow's warning before this refusal;
        # past twice that Pillow raises instead (below).
        try:
            img = Image.open(io.BytesIO(data), formats=DECODERS)
            width, height = img.size
            # Checked from the header, before any pixel is decoded.
            if width * height > max_pixels:
                raise ImageDecodeError(name, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
            # 0xFF 0xDA cannot occur inside entropy-coded data (0xFF is stuffed there): these are scans
            if img.format in ("JPEG", "MPO") and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
                raise ImageDecodeError(name, f"a JPEG of {scans} scans (at most {MAX_JPEG_SCANS} are decoded: "
                                             "each is a pass over the whole image)")
            if img.mode == "RGB" and img.tile and str(img.tile[0][3]).startswith("RGB;16"):
                # a 16-bit RGB PNG's colour key is not kept: Pillow would compare it with the pixels
                # cut to 8 bits, and holes (or the whole image) went transparent
                img.info.pop("transparency", None)
            if img.format == "PNG" and img.info.get("default_image") and getattr(img, "n_frames", 1) > 1:
                # an APNG whose default image is outside its animation (a fallback for decoders
                # without APNG): its first frame is what viewers and browsers show
                img.seek(1)
            img.load()
        except _CRAFTED as err:  # Pillow's decoders on a crafted header (a TIFF tag of the wrong type)
            raise ImageDecodeError(name, f"corrupt or truncated image: {type(err).__name__}: {err}") from None
        return split_alpha(img, name)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(name, "not a recognized image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # refused by Pillow from the header: say our limit, not Pillow's threshold that its message quotes
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{pixels.group(1)} pixels" if pixels else "its size"
        limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))  # a max_pixels past Pillow's: Pillow's
        raise ImageDecodeError(name, f"{size} exceeds the limit of {limit} (a decompression bomb?)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageDecodeError(name, f"corrupt or truncated image: {err}") from None


def _upright(img: Image.Image, name: str) -> Image.Image:
    """``img`` turned as its EXIF orientation says (``img`` itself when it needs no turn); as stored
    when its EXIF block is damaged (Pillow then raises SyntaxError reading it, or TypeError or
    struct.error rewriting it): the pixels are intact, and viewers show it so."""
    try:
        if img.getexif().get(_ORIENTATION, 1) == 1:
            return img
        return ImageOps.exif_transpose(img)
    except Exception as err:  # noqa: BLE001 (any failure of the EXIF rewrite, not of the pixels)
        logging.getLogger(__name__).warning("%s: damaged EXIF block, orientation not applied (%s: %s)",
                                            name, type(err).__name__, err)
        return img


def fit_longest(size: tuple[int, int], longest: int) -> tuple[int, int]:
    """(width, height) of an image of ``size`` resized so that its longest side is ``longest`` px;
    an image with no pixels (a side of 0) as it is, for check_min_side to refuse by name."""
    width, height = size
    if min(width, height) <= 0:  # a ZeroDivisionError here ended a stylize_many call, its good pairs too
        return width, height
    scale = longest / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_longest(img: Image.Image, size: int) -> Image.Image:
    """Resize so the longest side is ``size`` px, keeping the aspect ratio (Lanczos)."""
    new = fit_longest(img.size, size)
    return img if new == img.size else img.resize(new, Image.Resampling.LANCZOS)


def check_min_side(size: tuple[int, int], min_px: int, what: str) -> None:
    """Raise ImageTooSmallError naming ``what`` when a side of a (width, height) ``size`` is under ``min_px``.

    Pass the size the extractor will see (after ``resize_longest``, or ``fit_longest`` before
    any resize) and ``StyleParams.content_min_side()`` / ``style_min_side()``: a thinner image
    fails inside a VGG pool otherwise.
    """
    if min(size) < min_px:
        raise ImageTooSmallError(what, size, min_px)


def format_for(path: str) -> str:
    """Output format from a file name's extension: png, jpeg or webp."""
    suffix = PurePath(path).suffix.lower()
    if suffix not in FORMATS:
        raise NSTError(f"{path}: unsupported output extension {suffix or '(none)'}; use one of {', '.join(FORMATS)}")
    return FORMATS[suffix]


#: The output formats whose encoder takes a quality (png is lossless: it has none).
QUALITY_FORMATS = ("jpeg", "webp")


def encode_image(img: Image.Image, fmt: str, *, quality: int = 92) -> bytes:
    """Encode to png / jpeg / webp, tagged with an sRGB ICC profile (the engine works in sRGB).

    Alpha (RGBA input) is kept for png and webp, dropped for jpeg.
    """
    if fmt not in _PIL_FORMAT:
        raise NSTError(f"unsupported output format {fmt!r}; use one of {', '.join(_PIL_FORMAT)}")
    if fmt == "jpeg" and img.mode != "RGB":
        img = img.convert("RGB")
    buf = io.BytesIO()
    options = {"quality": quality} if fmt in QUALITY_FORMATS else {"optimize": False}
    options["icc_profile"] = _SRGB_ICC
    img.save(buf, format=_PIL_FORMAT[fmt], **options)
    return buf.getvalue()


def read_back(fmt: str, quality: int = 92) -> Callable[[Image.Image], Image.Image] | None:
    """How an image ``encode_image`` writes as ``fmt`` reads back, RGB (stylize's ``written``); None
    for png, which keeps the pixels. Pillow's plain decode, as a viewer reads the file (the file is
    tagged sRGB, the engine's own space)."""
    if fmt not in QUALITY_FORMATS:
        return None
    return lambda image: Image.open(io.BytesIO(encode_image(image, fmt, quality=quality))).convert("RGB")


def to_tensor(img: Image.Image, device) -> "torch.Tensor":
    """PIL RGB -> (1, 3, H, W) float32 in [0, 1] on ``device``."""
    import torch

    if img.mode != "RGB":  # decode_image/split_alpha give RGB; a plain convert would clip 16-bit, drop alpha
        raise ValueError(f"to_tensor takes an RGB image, not mode {img.mode}")
    pixels = torch.from_numpy(np.array(img))  # (H, W, 3) uint8, a copy we own
    return pixels.permute(2, 0, 1).to(device=device, dtype=torch.float32).div_(255).unsqueeze(0).contiguous()


def quantize(x: "torch.Tensor") -> "torch.Tensor":
    """[0, 1] floats -> uint8, rounded (a plain cast truncates: half a level darker on average).
    (B, C, H, W) -> (B, C, H, W)."""
    import torch

    return x.clamp(0, 1).mul(255).round_().to(torch.uint8)


def to_image(x8: "torch.Tensor", alpha: Image.Image | None = None) -> Image.Image:
    """(1, 3, H, W) uint8 -> PIL RGB, or RGBA with ``alpha`` resized onto it."""
    image = Image.fromarray(x8[0].permute(1, 2, 0).cpu().numpy(), "RGB")
    if alpha is not None:
        image.putalpha(alpha.resize(image.size, Image.Resampling.LANCZOS))
    return image
