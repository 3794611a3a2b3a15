"""Average pooling that keeps max pooling's activation scale, calibrated per set of weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ScaledAvgPool2d", "avg_pool_scales"]


class ScaledAvgPool2d(nn.AvgPool2d):
    """2×2 average pooling times a fixed ``scale`` (see ``avg_pool_scales``)."""

    def __init__(self, scale: float):
        super().__init__(kernel_size=2, stride=2)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}"


#: Side of the calibration image for average-pool scales (2x2 after pool5; 128 px gives factors within 4%).
_CALIBRATION_SIDE = 64


def _calibration_image(side: int = _CALIBRATION_SIDE) -> Tensor:
    """(1, 3, side, side) fixed 1/f ("pink") noise in [0, 1]: natural photographs' power spectrum."""
    gen = torch.Generator().manual_seed(0)
    freq = torch.fft.fftfreq(side, dtype=torch.float64)
    radius = torch.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2)
    radius[0, 0] = 1.0
    spectrum = torch.complex(
        torch.randn(3, side, side, generator=gen, dtype=torch.float64),
        torch.randn(3, side, side, generator=gen, dtype=torch.float64),
    )
    img = torch.fft.ifft2(spectrum / radius).real
    img = (img - img.mean()) / img.std() * 0.2 + 0.5
    return img.clamp(0, 1).float().unsqueeze(0)


def avg_pool_scales(layers: nn.Sequential, mean_std: tuple) -> dict[int, float]:
    """Per pool index, the factor that makes average pooling keep max pooling's activation scale.

    Differs from Gatys et al., who swap max for average pooling and leave the scale alone: an
    average of four ReLU outputs is smaller than their max, every pool compounds it, and content
    loss (∝ a²) and deep style layers (∝ a⁴) shrink by different powers, so a β tuned with max
    pooling is wrong with average pooling (measured: 1.1-2.3x on random nets). crowsonkb's
    style-transfer-pytorch multiplies each average pool by a fixed 2 found for trained VGG19;
    that constant does not hold for other weights (random VGG16 needs 1.2-1.5), so here each
    factor is measured once, when the extractor is built, for the weights at hand: run max and
    average pooling in lockstep on a fixed pink-noise image and scale each average pool so the
    mean of the next ReLU's output matches the max-pool path. Rounded to 3 digits so the
    factors (and results) do not vary with thread count or device.
    """
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in mean_std)
    x_max = x_avg = (_calibration_image() - mean) / std
    scales: dict[int, float] = {}
    pending = None

    def match(i: int) -> None:
        nonlocal x_avg
        avg_mean = float(x_avg.mean())
        scale = float(f"{float(x_max.mean()) / avg_mean:.3g}") if avg_mean > 0 else 1.0
        scales[i], x_avg = scale, x_avg * scale

    with torch.no_grad():
        for i, module in enumerate(layers):
            if isinstance(module, nn.MaxPool2d):
                x_max, x_avg, pending = module(x_max), nn.functional.avg_pool2d(x_avg, 2), i
            else:
                x_max, x_avg = module(x_max), module(x_avg)
                if pending is not None and isinstance(module, nn.ReLU):
                    match(pending)
                    pending = None
        if pending is not None:  # truncated right after a pool: match the pool output itself
            match(pending)
    return scales
