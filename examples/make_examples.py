"""Draws the bundled demo images (no third-party artwork, so no licence questions).

    python examples/make_examples.py      # rewrites examples/contents/*.png and examples/styles/*.png
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent


def harbour(w: int = 256, h: int = 192) -> Image.Image:
    """A sky gradient, a sun, hills, a sea and a boat."""
    y = np.linspace(0, 1, h)[:, None, None]
    sky = (1 - y) * np.array([90, 150, 230]) + y * np.array([250, 200, 150])
    img = Image.fromarray(np.broadcast_to(sky, (h, w, 3)).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse((170, 30, 215, 75), fill=(255, 230, 120))
    d.polygon([(0, 120), (60, 80), (120, 115), (190, 70), (256, 110), (256, 140), (0, 140)], fill=(60, 110, 60))
    d.rectangle((0, 135, w, h), fill=(30, 80, 140))
    d.polygon([(70, 150), (150, 150), (135, 168), (85, 168)], fill=(120, 60, 30))
    d.polygon([(108, 148), (108, 100), (140, 146)], fill=(240, 240, 230))
    return img.filter(ImageFilter.SMOOTH)


def houses(w: int = 256, h: int = 192) -> Image.Image:
    """A street of coloured houses under a pale sky."""
    img = Image.new("RGB", (w, h), (200, 220, 240))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 160, w, h), fill=(90, 90, 95))
    colours = [(200, 70, 60), (230, 180, 60), (70, 130, 190), (110, 170, 90), (190, 110, 170)]
    for i, x in enumerate(range(0, w, 52)):
        top = 70 + (i * 23) % 40
        d.rectangle((x + 2, top, x + 50, 160), fill=colours[i % len(colours)])
        d.polygon([(x, top), (x + 26, top - 25), (x + 52, top)], fill=(110, 50, 40))
        for wy in range(top + 12, 150, 28):
            d.rectangle((x + 10, wy, x + 22, wy + 14), fill=(250, 245, 200))
            d.rectangle((x + 30, wy, x + 42, wy + 14), fill=(250, 245, 200))
    return img


def waves(size: int = 192) -> Image.Image:
    """Swirling blue/gold bands, a stand-in for a painterly style."""
    y, x = np.mgrid[0:size, 0:size] / size
    field = np.sin(14 * x + 4 * np.sin(6 * y)) + np.cos(11 * y + 3 * np.sin(5 * x))
    t = (field - field.min()) / np.ptp(field)
    a, b, c = np.array([20, 40, 110]), np.array([240, 200, 70]), np.array([250, 250, 240])
    rgb = np.where(t[..., None] < 0.5, a + (b - a) * (2 * t[..., None]), b + (c - b) * (2 * t[..., None] - 1))
    return Image.fromarray(rgb.astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))


def mosaic(size: int = 192) -> Image.Image:
    """Jittered coloured tiles with dark grout."""
    rng = np.random.default_rng(7)
    img = Image.new("RGB", (size, size), (30, 25, 20))
    d = ImageDraw.Draw(img)
    step = 16
    for gy in range(0, size, step):
        for gx in range(0, size, step):
            hue = (gx + 2 * gy) / (3 * size) * 2 * math.pi
            colour = tuple(int(128 + 110 * math.sin(hue + k * 2.1) + rng.integers(-20, 20)) for k in range(3))
            j = rng.integers(-2, 3, 4)
            d.rectangle((gx + 2 + j[0], gy + 2 + j[1], gx + step - 2 + j[2], gy + step - 2 + j[3]), fill=colour)
    return img


def main() -> None:
    for folder, images in {"contents": {"harbour": harbour(), "houses": houses()},
                           "styles": {"waves": waves(), "mosaic": mosaic()}}.items():
        (HERE / folder).mkdir(exist_ok=True)
        for name, img in images.items():
            img.save(HERE / folder / f"{name}.png", optimize=True)


if __name__ == "__main__":
    main()
