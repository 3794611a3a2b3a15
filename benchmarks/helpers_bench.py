"""Shared by the benchmark scripts: the bundled sample images, resized."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def sample_pair(size: int) -> tuple[Image.Image, Image.Image]:
    content = Image.open(EXAMPLES / "contents" / "harbour.png").convert("RGB")
    style = Image.open(EXAMPLES / "styles" / "waves.png").convert("RGB")
    return content.resize((size, size * content.height // content.width)), style
