"""Errors the engine raises; all derive from NSTError so callers can catch one type."""

from __future__ import annotations

import re

__all__ = ["NSTError", "ParamsError", "ImageDecodeError", "ImageTooSmallError", "NonFiniteLossError", "WeightsError", "DeviceMemoryError"]


#: The ``user:password@`` of a URL of any scheme but s3:// and file:// (which carry none, and whose
#: keys may hold '@': IMG@2x.png), up to the last '@' before a space: a password may hold '/' or '@'.
_USERINFO = re.compile(r"\b((?!(?:s3|file):)[A-Za-z][A-Za-z0-9+.-]*://)\S*@", re.IGNORECASE)
#: botocore's error for an endpoint it cannot parse quotes it whole, scheme or not (``minio:pw@host``).
_BAD_ENDPOINT = re.compile(r"(Invalid endpoint: )\S*@")


def hide_userinfo(text: str) -> str:
    """``text`` with the credentials of every URL in it removed."""
    return _BAD_ENDPOINT.sub(r"\1", _USERINFO.sub(r"\1", text))


class NSTError(Exception):
    """Base class of every error prefect-nst raises on purpose. Its message never carries a URL's
    credentials: a library's error (botocore's "Could not connect to the endpoint URL") may quote an
    endpoint set with ``user:password@``, and the message reaches logs, reports and the UI."""

    def __init__(self, *args):
        super().__init__(*(hide_userinfo(a) if isinstance(a, str) else a for a in args))


class ParamsError(NSTError, ValueError):
    """Parameters that validate alone but do not fit the call (a blend weight per style image).
    A ValueError too, as pydantic's checks of the same parameters are."""


class ImageDecodeError(NSTError):
    """An input could not be turned into an image. Names the input and the reason."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"{name}: {reason}")


class ImageTooSmallError(ImageDecodeError):
    """An image's shorter side is below what the requested VGG layers need. Names the input."""

    def __init__(self, name: str, size: tuple[int, int], min_px: int):
        self.size, self.min_px = size, min_px
        width, height = size
        super().__init__(
            name,
            f"{width}x{height} px is too small: the requested layers need each side to be at least "
            f"{min_px} px (each VGG16 pool halves it); use a larger image_size, a less elongated "
            "image, or shallower layers",
        )


class NonFiniteLossError(NSTError):
    """The loss became NaN or infinite; names the loss evaluation where it happened."""

    def __init__(self, iteration: int, terms: dict[str, float], *, what: str = "loss",
                 advice: str = "lower the style/content weights or the learning rate"):
        self.iteration, self.terms = iteration, terms
        shown = ", ".join(f"{k}={v:g}" for k, v in terms.items())
        super().__init__(f"{what} is not finite at evaluation {iteration} ({shown}); {advice}")


class WeightsError(NSTError):
    """VGG16 weights could not be loaded or failed their hash check."""


class DeviceMemoryError(NSTError):
    """The device ran out of memory for one pair; what it held is freed and the next pair can run."""

    def __init__(self, name: str, size: int, device: str, tile_size: str | int = "off"):
        self.name, self.size, self.device, self.tile_size = name, size, device, tile_size
        if tile_size == "auto":  # it may have tiled already, sized from the device's total memory
            advice = ("set max_memory_gb to what the device has free (auto sizes tiles from its total memory, "
                      "which other processes may hold part of), a tile_size in px, or a smaller image_size")
        elif tile_size == "off":
            advice = "reduce image_size or use tile_size"
        else:
            advice = f"use a smaller tile_size (now {tile_size}) or image_size"
        super().__init__(f"{name}: out of memory on {device} at image_size={size}; {advice}")

    def __reduce__(self):  # picklable, as a state's exception must be
        return type(self), (self.name, self.size, self.device, self.tile_size)
