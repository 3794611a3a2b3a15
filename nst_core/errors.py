"""Errors the engine raises; all derive from NSTError so callers can catch one type."""

from __future__ import annotations

__all__ = ["NSTError", "ImageDecodeError", "NonFiniteLossError", "WeightsError"]


class NSTError(Exception):
    """Base class of every error prefect-nst raises on purpose."""


class ImageDecodeError(NSTError):
    """An input could not be turned into an image. Names the input and the reason."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"{name}: {reason}")


class NonFiniteLossError(NSTError):
    """The loss became NaN or infinite; names the loss evaluation where it happened."""

    def __init__(self, iteration: int, terms: dict[str, float]):
        self.iteration, self.terms = iteration, terms
        shown = ", ".join(f"{k}={v:g}" for k, v in terms.items())
        super().__init__(
            f"loss is not finite at evaluation {iteration} ({shown}); "
            "lower the style/content weights or the learning rate"
        )


class WeightsError(NSTError):
    """VGG16 weights could not be loaded or failed their hash check."""
