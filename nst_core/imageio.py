"""Bytes <-> images: EXIF orientation, modes, alpha, pixel limits, resizing, encoding.

Every error names the input it is about (``ImageDecodeError(name, reason)``).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageDecodeError, ImageTooSmallError, NSTError

__all__ = [
    "DecodedImage",
    "MAX_PIXELS",
    "FORMATS",
    "decode_image",
    "split_alpha",
    "resize_longest",
    "check_min_side",
    "encode_image",
    "format_for",
]

#: Largest accepted input, width·height. Larger files are rejected before their pixels are decoded.
MAX_PIXELS = 64_000_000
#: Output formats by file extension.
FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
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


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit single-channel modes -> L, scaling instead of clipping."""
    arr = np.asarray(img)
    if img.mode == "F":
        scaled = np.clip(arr, 0, 255)
    else:  # I, I;16, I;16B, ...: 16-bit samples stored in integers
        scaled = np.clip(arr.astype(np.float64) / 257.0, 0, 255)
    return Image.fromarray(scaled.round().astype(np.uint8), mode="L")


def split_alpha(img: Image.Image) -> DecodedImage:
    """Any Pillow mode -> RGB plus alpha (or None). Palette transparency becomes alpha."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = img.getchannel("A")
        return DecodedImage(img.convert("RGB"), alpha)
    return DecodedImage(img.convert("RGB"))


def decode_image(data: bytes, name: str, *, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """Decode image bytes with EXIF orientation applied. Raises ImageDecodeError naming ``name``."""
    if not data:
        raise ImageDecodeError(name, "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            # Checked from the header, before any pixel is decoded.
            if width * height > max_pixels:
                raise ImageDecodeError(
                    name, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
                )
            img.load()
            img = ImageOps.exif_transpose(img)
            return split_alpha(img)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(name, "not a recognized image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError(name, f"rejected as a decompression bomb: {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageDecodeError(name, f"corrupt or truncated image: {err}") from None


def resize_longest(img: Image.Image, size: int) -> Image.Image:
    """Resize so the longest side is ``size`` px, keeping the aspect ratio (Lanczos)."""
    width, height = img.size
    scale = size / max(width, height)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    return img if new == img.size else img.resize(new, Image.Resampling.LANCZOS)


def check_min_side(img: Image.Image, min_px: int, what: str) -> None:
    """Raise ImageTooSmallError naming ``what`` when a side of ``img`` is under ``min_px``.

    Pass the image as the extractor will see it (after ``resize_longest``) and
    ``nst_core.vgg.min_side(layers)``: a thinner image fails inside a VGG pool otherwise.
    """
    if min(img.size) < min_px:
        raise ImageTooSmallError(what, img.size, min_px)


def format_for(path: str) -> str:
    """Output format from a file name's extension: png, jpeg or webp."""
    suffix = PurePath(path).suffix.lower()
    if suffix not in FORMATS:
        raise NSTError(f"{path}: unsupported output extension {suffix or '(none)'}; use one of {', '.join(FORMATS)}")
    return FORMATS[suffix]


def encode_image(img: Image.Image, fmt: str, *, quality: int = 92) -> bytes:
    """Encode to png / jpeg / webp. Alpha (RGBA input) is kept for png and webp, dropped for jpeg."""
    if fmt not in _PIL_FORMAT:
        raise NSTError(f"unsupported output format {fmt!r}; use one of {', '.join(_PIL_FORMAT)}")
    if fmt == "jpeg" and img.mode != "RGB":
        img = img.convert("RGB")
    buf = io.BytesIO()
    options = {"quality": quality} if fmt in ("jpeg", "webp") else {"optimize": False}
    img.save(buf, format=_PIL_FORMAT[fmt], **options)
    return buf.getvalue()
