"""StyleParams: every optimization parameter, defined once.

The CLI options, the Prefect run form, the sidecar metadata and the docs are all derived
from this model. It imports no torch so flows and forms load fast.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["StyleParams", "VGG16_LAYERS", "VGG16Layer", "DEVICES", "STOP_WINDOW", "DEFAULT_STYLE_LAYERS", "DEFAULT_CONTENT_LAYERS", "markdown_table"]

# torchvision's VGG16 "D" config: channels per conv, "M" for a pooling layer.
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _layer_names(cfg: list) -> tuple[str, ...]:
    """Names of vgg16().features children in order: conv{b}_{i}, relu{b}_{i}, pool{b}."""
    names, block, conv = [], 1, 1
    for item in cfg:
        if item == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 1
        else:
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
            conv += 1
    return tuple(names)


#: The one name -> position table: VGG16_LAYERS[i] names vgg16().features[i].
VGG16_LAYERS: tuple[str, ...] = _layer_names(_VGG16_CFG)
DEFAULT_CONTENT_LAYERS = ["relu4_2"]
DEFAULT_STYLE_LAYERS = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
#: Evaluations over which stop_tolerance measures the relative improvement.
STOP_WINDOW = 20

#: One VGG16 layer name, as an enum: the run form shows a dropdown and the API refuses others.
VGG16Layer = Literal[VGG16_LAYERS]  # type: ignore[valid-type]
#: Device names the run form offers (cuda:N up to 7: one machine's GPUs).
DEVICES: tuple[str, ...] = ("auto", "cpu", "mps", "cuda", *(f"cuda:{i}" for i in range(8)))
Device = Literal[DEVICES]  # type: ignore[valid-type]


def _check_layers(names: list[str]) -> list[str]:
    if not isinstance(names, list):
        return names  # pydantic reports the type error
    unknown = [str(n) for n in names if n not in VGG16_LAYERS]
    if unknown:
        raise ValueError(
            f"unknown VGG16 layer(s) {', '.join(unknown)}; valid names are: {', '.join(VGG16_LAYERS)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"layer names repeat: {names}")
    return names


def _check_weights(values: list[float] | None) -> list[float] | None:
    if values is not None and any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError("weights must be finite and >= 0")
    if values is not None and not sum(values) > 0:
        raise ValueError("weights must not all be zero")
    return values


class StyleParams(BaseModel):
    """Parameters of one Gatys style-transfer optimization (VGG16).

    Fields run everyday-first (size, budget, weights of the terms, colour, start), then the
    advanced ones (layers, VGG weights, seed, optimizer, speed and reproducibility settings).
    """

    model_config = ConfigDict(extra="forbid", title="Style parameters")

    # --- everyday ---------------------------------------------------------------------------
    image_size: int = Field(
        default=512, ge=16, le=4096, title="Image size (px)",
        description="Longest side of the output in pixels; content and style are resized to it.",
    )
    iterations: int = Field(
        default=300, ge=1, le=100_000, title="Iterations",
        description=(
            "Upper bound on loss evaluations (forward+backward passes), summed over all scales. "
            "L-BFGS stops sooner at a zero gradient, and so does the optional early stop."
        ),
    )
    style_weight: float = Field(
        default=1e-3, ge=0, allow_inf_nan=False, title="Style weight",
        description=(
            "β: weight of the style loss. Tuned for the default Caffe-ported features; "
            "imagenet1k_v1 (and bare state_dict files, ImageNet mean/std) see inputs 57.6x smaller, "
            "so the style/content balance moves by 57.6² ≈ 3300x (measured 3297-3359x on random "
            "VGG16 nets): raise β about 3300x with them."
        ),
    )
    content_weight: float = Field(
        default=1.0, ge=0, allow_inf_nan=False, title="Content weight",
        description="α: weight of the content loss in α·content + β·style + tv.",
    )
    preserve_color: Literal["none", "luminance", "histogram"] = Field(
        default="none", title="Preserve colour",
        description=(
            "none: take the style's colours; luminance: transfer on luminance only (style luminance "
            "matched to the content's mean and σ) and keep the content's chroma; histogram: match the "
            "style's colours to the content before the transfer."
        ),
    )
    init: Literal["content", "noise", "style"] = Field(
        default="content", title="Start from", description="What the optimization starts from."
    )
    tv_weight: float = Field(
        default=0.0, ge=0, allow_inf_nan=False, title="Smoothness (total variation) weight",
        description="Weight of the total-variation smoothness loss on the result (0 disables it).",
    )
    style_blend_weights: list[float] | None = Field(
        default=None, title="Style blend weights",
        description="With several style images: one weight per style image; empty means equal.",
    )
    # --- advanced ---------------------------------------------------------------------------
    content_layers: list[VGG16Layer] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(DEFAULT_CONTENT_LAYERS),
        min_length=1,
        title="Content layers (advanced)",
        description="VGG16 layers whose activations the result must keep from the content image.",
    )
    style_layers: list[VGG16Layer] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(DEFAULT_STYLE_LAYERS),
        min_length=1,
        title="Style layers (advanced)",
        description="VGG16 layers whose Gram matrices the result must match to the style image.",
    )
    style_layer_weights: list[float] | None = Field(
        default=None,
        title="Style layer weights (advanced)",
        description="One weight per style layer; empty means equal weights. Normalized to sum 1.",
    )
    pooling: Literal["max", "avg"] = Field(
        default="max", title="Pooling (advanced)",
        description="VGG pooling; Gatys et al. report smoother results with avg.",
    )
    weights: str = Field(
        default="imagenet1k_features", min_length=1, title="VGG16 weights (advanced)",
        description=(
            "imagenet1k_features (Caffe-ported, torchvision), imagenet1k_v1, random (smoke runs), "
            "or a path / file:// / s3:// URI of a VGG16 state_dict."
        ),
    )
    weights_sha256: str | None = Field(
        default=None, pattern=r"^[0-9a-fA-F]{64}$", title="Weights SHA-256 (advanced)",
        description="If set, the weights file's SHA-256 (a state_dict, or torchvision's cached file) must match.",
    )
    seed: int = Field(
        default=0, ge=0, le=2**63 - 1, title="Seed (advanced)",
        description=(
            "Seeds noise init and random weights: same seed, same output only for the same device, "
            "thread count and library versions."
        ),
    )
    optimizer: Literal["lbfgs", "adam"] = Field(
        default="lbfgs", title="Optimizer (advanced)",
        description="L-BFGS converges in fewer evaluations; Adam uses less memory.",
    )
    learning_rate: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, title="Learning rate (advanced)",
        description="Step size on [0,1] pixels; empty means the optimizer's default (L-BFGS 1.0, Adam 0.02).",
    )
    scales: int = Field(
        default=3, ge=1, le=6, title="Coarse-to-fine scales (advanced)",
        description=(
            "Optimize at this many sizes, each √2 larger, ending at image_size; each starts from the "
            "previous result upsampled, and each scale gets an equal share of compute, so most "
            "evaluations run small. 1 is the plain single-scale method."
        ),
    )
    precision: Literal["auto", "fp32", "tf32", "bf16", "fp16"] = Field(
        default="auto", title="Precision (advanced)",
        description=(
            "Arithmetic of the VGG pass (autocast); Grams, losses, image and optimizer stay fp32 and "
            "the final loss is always recomputed in fp32. auto: bf16 on CUDA GPUs with bf16 and on "
            "CPUs with AVX512-BF16/AMX, else tf32 on CUDA (TF32 matmuls/convolutions) and fp32 elsewhere."
        ),
    )
    stop_tolerance: float | None = Field(
        default=None, gt=0, lt=1, allow_inf_nan=False, title="Early-stop tolerance (advanced)",
        description=(
            f"Stop a scale when the best loss improved by less than this fraction over its last "
            f"{STOP_WINDOW} evaluations; empty runs the whole budget (real weights keep improving "
            "for hundreds of evaluations)."
        ),
    )
    deterministic: bool = Field(
        default=False, title="Deterministic algorithms (advanced)",
        description=(
            "torch.use_deterministic_algorithms (and the cuBLAS workspace setting on GPUs): "
            "repeatable on one machine, usually slower."
        ),
    )
    device: Device = Field(  # type: ignore[valid-type]
        default="auto", title="Device (advanced)",
        description="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.",
    )

    @field_validator("content_layers", "style_layers", mode="before")
    @classmethod
    def _known_layers(cls, v: list[str]) -> list[str]:
        return _check_layers(v)

    @field_validator("style_layer_weights", "style_blend_weights")
    @classmethod
    def _finite_weights(cls, v: list[float] | None) -> list[float] | None:
        return _check_weights(v or None)

    @field_validator("weights")
    @classmethod
    def _weights_source(cls, v: str) -> str:
        return v.strip()

    @field_validator("device", mode="before")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if v not in DEVICES:
            raise ValueError(f"device {v!r} is not one of {', '.join(DEVICES)}")
        return v

    @model_validator(mode="after")
    def _lengths_match(self) -> StyleParams:
        if self.style_layer_weights is not None and len(self.style_layer_weights) != len(self.style_layers):
            raise ValueError(
                f"style_layer_weights has {len(self.style_layer_weights)} values "
                f"but style_layers has {len(self.style_layers)} layers"
            )
        return self

    def step_size(self) -> float:
        """The learning rate in effect: the explicit one or the optimizer's default."""
        return self.learning_rate or {"lbfgs": 1.0, "adam": 0.02}[self.optimizer]

    def layer_weights(self) -> dict[str, float]:
        """Style layer -> weight, normalized to sum 1 (equal when unset)."""
        raw = self.style_layer_weights or [1.0] * len(self.style_layers)
        total = sum(raw)
        return {name: w / total for name, w in zip(self.style_layers, raw)}

    def blend_weights(self, n_styles: int) -> list[float]:
        """Per-style-image weights, normalized to sum 1; checks the count against n_styles."""
        raw = self.style_blend_weights or [1.0] * n_styles
        if len(raw) != n_styles:
            raise ValueError(f"style_blend_weights has {len(raw)} values for {n_styles} style image(s)")
        total = sum(raw)
        return [w / total for w in raw]


def markdown_table() -> str:
    """The README's parameter table, generated from the model (a test keeps README in sync)."""
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for name, info in StyleParams.model_fields.items():
        default = info.get_default(call_default_factory=True)
        shown = " ".join(default) if isinstance(default, list) else ("unset" if default is None else default)
        rows.append(f"| `{name}` | `{shown}` | {info.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
