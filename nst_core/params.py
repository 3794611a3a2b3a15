"""StyleParams: every optimization parameter, defined once.

The CLI options, the Prefect run form, the sidecar metadata and the docs are all derived
from this model. It imports no torch so flows and forms load fast. VGG16's layer table and its
geometry (names, widths, how many pixels a layer's position steps) live here too, for the same
reason: the CLI checks an image's size before torch loads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import ParamsError
from .uris import host_problem, parse_uri

__all__ = ["StyleParams", "VGG16_CFG", "VGG16_LAYERS", "VGG16_CHANNELS", "VGG16Layer", "DEVICES", "device_name",
           "STOP_WINDOW", "DEFAULT_STYLE_LAYERS", "DEFAULT_CONTENT_LAYERS", "markdown_table", "layer_index", "layer_factor",
           "min_side", "OPTIMIZER_STEPS", "equal_shares"]

#: torchvision's VGG16 "D" config: channels per conv, "M" for a pooling layer (nst_core.vgg builds
#: the stack from it; the layer names and widths below come from it too).
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _layer_names(cfg: tuple) -> tuple[str, ...]:
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


def _layer_channels(cfg: tuple) -> tuple[int, ...]:
    """Output channels of vgg16().features children in order (a pool keeps its input's)."""
    out, channels = [], 3
    for item in cfg:
        if item == "M":
            out.append(channels)
        else:
            channels = item
            out += [item, item]
    return tuple(out)


#: The one name -> position table: VGG16_LAYERS[i] names vgg16().features[i].
VGG16_LAYERS: tuple[str, ...] = _layer_names(VGG16_CFG)
#: Output channels of vgg16().features[i], in the same order.
VGG16_CHANNELS: tuple[int, ...] = _layer_channels(VGG16_CFG)
DEFAULT_CONTENT_LAYERS = ["relu4_2"]
DEFAULT_STYLE_LAYERS = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
#: Evaluations over which stop_tolerance measures the relative improvement.
STOP_WINDOW = 20


def layer_index(name: str) -> int:
    """Position of a named layer in vgg16().features."""
    return VGG16_LAYERS.index(name)


def layer_factor(name: str) -> int:
    """How many pixels one feature position of this layer steps: 2^(pools up to it, itself included)."""
    return 2 ** sum(1 for n in VGG16_LAYERS[: layer_index(name) + 1] if n.startswith("pool"))


def min_side(layer_names: Iterable[str]) -> int:
    """Smallest image side (px) the extractor accepts for these layers: 2^(pools up to the deepest).

    Each 2×2 pool halves (floor) the side and refuses an input under 2 px, so a side of
    2^p px leaves 1 px after the p-th pool, and one pixel less fails there.
    """
    return max(layer_factor(n) for n in layer_names)


def _reach(name: str) -> int:
    """How far (px) beyond its own f×f block of pixels one position of this layer sees, on either
    side: the span of input pixels a position depends on, walked back from the layer (a 3×3 conv
    widens it by one position each side, a 2×2 pool doubles it), less the block.
    relu5_1: pixels 16i − 58 … 16i + 73 for position i, so 58 px each side of 16i … 16i + 15."""
    lo, hi = 0, 0  # in the coordinates of the current layer's input, for output position 0
    for n in reversed(VGG16_LAYERS[:VGG16_LAYERS.index(name) + 1]):
        if n.startswith("conv"):
            lo, hi = lo - 1, hi + 1
        elif n.startswith("pool"):
            lo, hi = 2 * lo, 2 * hi + 1
    return max(-lo, hi - (layer_factor(name) - 1))


def exact_halo(layers: Iterable[str]) -> int:
    """The halo (px) at which tiled features equal untiled ones: the deepest reach of the layers,
    rounded up to the alignment (relu5_1: 58 px, 64 px with tiles on multiples of 16)."""
    layers = list(layers)
    return round_up(max(_reach(n) for n in layers), max(layer_factor(n) for n in layers))


def round_up(value: int, align: int) -> int:
    """``value`` up to a multiple of ``align``."""
    return -(-value // align) * align


def used_halo(halo: int, layers: Iterable[str]) -> int:
    """The halo (px) tiles get for a ``tile_halo`` of ``halo``: up to the pools' alignment, and never
    beyond the exact halo (a wider one costs more and changes nothing; up to relu3_1 the exact halo
    is 12 px, under the default 32)."""
    layers = list(layers)
    return min(round_up(halo, max(layer_factor(n) for n in layers)), exact_halo(layers))


#: The least tile_halo (px) accepted, or the layers' exact halo where that is smaller: below it each
#: tile's zero-padded border leaves the gradient far off (relative error 1.40 at 16 px, 4.5 at 0;
#: 0.065 at 32: README, "Tiling").
MIN_HALO = 32


#: One VGG16 layer name, as an enum: the run form shows a dropdown and the API refuses others.
VGG16Layer = Literal[VGG16_LAYERS]  # type: ignore[valid-type]
#: Device names the run form offers (cuda:N up to 7: one machine's GPUs).
DEVICES: tuple[str, ...] = ("auto", "cpu", "mps", "cuda", *(f"cuda:{i}" for i in range(8)))
Device = Literal[DEVICES]  # type: ignore[valid-type]


def device_name(v: str) -> str:
    """``v`` if it is one of DEVICES, else ValueError listing them (shorter than pydantic's)."""
    if v not in DEVICES:
        raise ValueError(f"device {v!r} is not one of {', '.join(DEVICES)}")
    return v


def _check_layers(names: list[str]) -> list[str]:
    unknown = [str(n) for n in names if n not in VGG16_LAYERS]
    if unknown:
        raise ValueError(
            f"unknown VGG16 layer(s) {', '.join(unknown)}; valid names are: {', '.join(VGG16_LAYERS)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"layer names repeat: {names}")
    return names


#: The pretrained checkpoints ``weights`` names (torchvision's VGG16_Weights members, in lower case).
NAMED_WEIGHTS = ("imagenet1k_features", "imagenet1k_v1")


def _check_weights(values: list[float] | None) -> list[float] | None:
    if values is not None and any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError("weights must be finite and >= 0")
    if values is not None and not sum(values) > 0:
        raise ValueError("weights must not all be zero")
    return values


#: The step each optimizer takes when learning_rate is empty.
OPTIMIZER_STEPS = {"lbfgs": 1.0, "adam": 0.02}


def shares(raw: list[float]) -> list[float]:
    """``raw`` (finite, >= 0, not all 0) normalized to sum 1. Values whose sum overflows (1e308
    twice) are divided by the largest first: their sum was inf, every share 0, and the style term
    vanished without a word."""
    total = sum(raw)
    if not math.isfinite(total):
        top = max(raw)
        raw = [w / top for w in raw]
        total = sum(raw)
    return [w / total for w in raw]


def equal_shares(values: list[float] | None) -> bool:
    """Whether ``values``, normalized to sum 1, are equal shares, as no values are: none, or all equal."""
    return not values or len(set(values)) == 1


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
        description="Upper bound on loss evaluations, summed over all scales; L-BFGS stops sooner at a zero gradient.",
    )
    style_weight: float = Field(
        default=1e-3, ge=0, allow_inf_nan=False, title="Style weight",
        description="β: weight of the style loss; raise it about 3300x with imagenet1k_v1 weights (see README).",
    )
    content_weight: float = Field(
        default=1.0, ge=0, allow_inf_nan=False, title="Content weight",
        description="α: weight of the content loss in α·content + β·style + tv.",
    )
    preserve_color: Literal["none", "luminance", "histogram"] = Field(
        default="none", title="Preserve colour",
        description="none: the style's colours; luminance: keep the content's chroma; histogram: match colours first.",
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
        description="With several style images (nst stylize; a batch pair has one): one weight each; empty: equal.",
    )
    # --- advanced ---------------------------------------------------------------------------
    content_layers: list[VGG16Layer] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(DEFAULT_CONTENT_LAYERS),
        min_length=1,
        title="Content layers",
        description="VGG16 layers whose activations the result must keep from the content image.",
    )
    style_layers: list[VGG16Layer] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(DEFAULT_STYLE_LAYERS),
        min_length=1,
        title="Style layers",
        description="VGG16 layers whose Gram matrices the result must match to the style image.",
    )
    style_layer_weights: list[float] | None = Field(
        default=None,
        title="Style layer weights",
        description="One weight per style layer; empty means equal weights. Normalized to sum 1.",
    )
    pooling: Literal["max", "avg"] = Field(
        default="max", title="Pooling",
        description="VGG pooling; Gatys et al. report smoother results with avg.",
    )
    weights: str = Field(
        default="imagenet1k_features", min_length=1, title="VGG16 weights",
        description="imagenet1k_features, imagenet1k_v1, random (smoke runs), or a path, file:// or s3:// state_dict.",
    )
    weights_sha256: str | None = Field(
        default=None, pattern=r"^[0-9a-fA-F]{64}$", title="Weights SHA-256",
        description="If set, the weights file's SHA-256 (a state_dict, or torchvision's cached file) must match.",
    )
    seed: int = Field(
        default=0, ge=0, le=2**63 - 1, title="Seed",
        description="Reproducible: same seed, same output only for the same device, thread count and library versions.",
    )
    optimizer: Literal["lbfgs", "adam"] = Field(
        default="lbfgs", title="Optimizer",
        description="L-BFGS converges in fewer evaluations; Adam uses less memory.",
    )
    learning_rate: float | None = Field(
        # le: a step of 1e4 on [0, 1] pixels already means nothing; 1e39 overflowed fp32 in Adam's first step
        default=None, gt=0, le=1e4, allow_inf_nan=False, title="Learning rate",
        description="Step size on [0,1] pixels; empty means the optimizer's default (L-BFGS 1.0, Adam 0.02).",
    )
    scales: int = Field(
        # 1: coarse to fine lost to the single-scale method on real photographs (benchmarks/quality.py,
        # README "Quality"), so it is an option, not the default.
        default=1, ge=1, le=6, title="Coarse-to-fine scales",
        description="Optimize at this many sizes √2 apart, ending at image_size; 1 is the paper's single-scale method.",
    )
    precision: Literal["auto", "fp32", "tf32", "bf16", "fp16"] = Field(
        default="auto", title="Precision",
        description="VGG pass arithmetic, losses fp32; auto: bf16 from 256 px where native (sm_80+ GPUs, AMX), else fp32.",
    )
    stop_tolerance: float | None = Field(
        default=None, gt=0, lt=1, allow_inf_nan=False, title="Early-stop tolerance",
        description=f"Stop a scale when the best loss improved less than this fraction in {STOP_WINDOW} evaluations; empty: never.",
    )
    deterministic: bool = Field(
        default=False, title="Deterministic algorithms",
        description="torch.use_deterministic_algorithms (and cuBLAS settings): repeatable on one machine, usually slower.",
    )
    device: Device = Field(  # type: ignore[valid-type]
        default="auto", title="Device",
        description=f"auto (CUDA, then MPS, then CPU), cpu, cuda, {DEVICES[4]} to {DEVICES[-1]} or mps.",
    )
    tile_size: Literal["auto", "off"] | int = Field(
        default="auto", title="Tile size (px)",
        description="VGG pass in tiles of N px: less memory, exact at tile_halo 64, else close; auto: over max_memory_gb.",
    )
    tile_halo: int | None = Field(
        default=None, ge=0, le=512, title="Tile halo (px)",
        description="Margin each tile sees around its core; 64 is exact at relu5_1; empty: the measured default.",
    )
    max_memory_gb: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, title="Memory budget (GB)",
        description="Memory an evaluation may use before auto tiles; empty: 80% of a GPU, half RAM or pod limit on CPU.",
    )

    @field_validator("tile_size")
    @classmethod
    def _tile_size(cls, v):
        if isinstance(v, int) and v < 64:
            raise ValueError("tile_size must be at least 64 px (or auto, or off)")
        return v

    @field_validator("content_layers", "style_layers", mode="before")
    @classmethod
    def _known_layers(cls, v):
        # before pydantic's own check, whose message would list the names without the one at fault
        if isinstance(v, (set, frozenset)):  # pydantic would make a list of it, in an order of the process's
            raise ValueError("layers must be a list, in order (a set's order changes from run to run)")
        if isinstance(v, Iterable) and not isinstance(v, (str, bytes, dict, list)):
            v = list(v)  # a tuple, a generator, a deque: checked as the list pydantic makes of them
        return _check_layers(v) if isinstance(v, list) else v  # anything else: pydantic reports the type

    @field_validator("style_layer_weights", "style_blend_weights")
    @classmethod
    def _finite_weights(cls, v: list[float] | None) -> list[float] | None:
        return _check_weights(v or None)

    @field_validator("weights")
    @classmethod
    def _weights_source(cls, v: str) -> str:
        # torchvision's spellings (IMAGENET1K_V1, VGG16_Weights.IMAGENET1K_V1) are those weights, under
        # one spelling: the pair key hashes the name as written
        v = v.strip()
        if not v:  # blank: read as the working folder, "weights file  is a folder"
            raise ValueError("weights must not be blank (a name, a path, a file:// or s3:// URI, or random)")
        name = v.lower().removeprefix("vgg16_weights.")
        if name in (*NAMED_WEIGHTS, "random"):
            return name
        # a URI no reader can read, refused here, where the form and `nst` refuse it, not once a run
        # has started; other schemes are an opener's (stylize's ``opener``), refused by the batch (flows.cli)
        scheme, bucket, _ = parse_uri(v)
        if why := host_problem(v):
            raise ValueError(why)
        if scheme == "s3" and not bucket:
            raise ValueError(f"weights {v}: an s3:// URI names its bucket (s3://bucket/key)")
        return v

    @field_validator("device", mode="before")
    @classmethod
    def _device_name(cls, v: str) -> str:
        return device_name(v)

    @model_validator(mode="after")
    def _lengths_match(self) -> StyleParams:
        if self.style_layer_weights is not None and len(self.style_layer_weights) != len(self.style_layers):
            raise ValueError(
                f"style_layer_weights has {len(self.style_layer_weights)} values "
                f"but style_layers has {len(self.style_layers)} layers"
            )
        layers = [*self.content_layers, *self.style_layers]
        if (self.tile_halo is not None and self.tile_size != "off"
                and used_halo(self.tile_halo, layers) < (least := used_halo(MIN_HALO, layers))):
            raise ValueError(f"tile_halo {self.tile_halo} leaves each tile's gradient far off; at least "
                             f"{least - max(layer_factor(n) for n in layers) + 1} px, which tiles use as {least} "
                             f"(exact: {exact_halo(layers)} px for these layers)")
        if self.image_size < self.content_min_side():
            raise ValueError(f"image_size {self.image_size} is below what the layers need: at least "
                             f"{self.content_min_side()} px (for {max(layers, key=layer_factor)})")
        if self.content_weight == self.style_weight == self.tv_weight == 0:
            raise ValueError("content_weight, style_weight and tv_weight are all 0: the objective is constant, "
                             "and each pair would spend its whole budget returning its start image")
        return self

    def step_size(self) -> float:
        """The learning rate in effect: the explicit one or the optimizer's default."""
        return self.learning_rate or OPTIMIZER_STEPS[self.optimizer]

    def layer_weights(self) -> dict[str, float]:
        """Style layer -> weight, normalized to sum 1 (equal when unset)."""
        # equal values as exactly 1/n, as unset (tasks.contract keys the two as one): 0.3 / sum([0.3] * 5) is not 0.2
        raw = [1.0] * len(self.style_layers) if equal_shares(self.style_layer_weights) else self.style_layer_weights
        return dict(zip(self.style_layers, shares(raw)))

    def content_min_side(self) -> int:
        """Smallest side (px) the content may have at image_size: every layer sees it."""
        return min_side([*self.content_layers, *self.style_layers])

    def style_min_side(self) -> int:
        """Smallest side (px) a style image may have at image_size: only the style layers see it
        (a deeper content layer must not refuse a thin style)."""
        return min_side(self.style_layers)

    def blend_weights(self, n_styles: int) -> list[float]:
        """Per-style-image weights, normalized to sum 1; checks the count against n_styles."""
        raw = self.style_blend_weights or [1.0] * n_styles
        if len(raw) != n_styles:
            raise ParamsError(f"style_blend_weights has {len(raw)} values for {n_styles} style image(s)")
        return shares(raw)


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
