"""VGG16 feature extractor: named layers, truncation, pooling, weight sources.

Differs from Gatys et al., who used VGG19, because the design fixes VGG16 (torchvision's
Caffe-ported features are the default weights); the layer names and defaults are VGG16's.

Nothing is built or downloaded at import. ``load_extractor`` builds one frozen, eval-mode,
truncated ``vgg16().features`` per (weights, pooling, device, dtype, depth, memory format) and
caches it, so a process builds it once; the state dict behind it is read once per source.

Weights files are never trusted: named torchvision weights are found in (or downloaded to) the
torch hub cache and their SHA-256 is checked (pinned, else the prefix in torchvision's file
name) before anything is unpickled; every source is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision.models import VGG16_Weights
from torchvision.models.vgg import cfgs, make_layers

from .errors import WeightsError
from .params import VGG16_LAYERS

__all__ = [
    "FeatureExtractor",
    "load_extractor",
    "resolve_device",
    "layer_index",
    "min_side",
    "read_weights_bytes",
    "HOW_TO_SUPPLY_WEIGHTS",
    "clear_cache",
    "CAFFE_INPUT_SCALE",
    "ScaledAvgPool2d",
]


class _Named(NamedTuple):
    """A named torchvision checkpoint: where it downloads from and the normalization it was trained with."""

    url: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _named(enum: VGG16_Weights) -> _Named:
    transforms = enum.transforms()  # a small transform object; nothing is downloaded
    return _Named(enum.url, tuple(transforms.mean), tuple(transforms.std))


_NAMED_WEIGHTS = {
    "imagenet1k_features": _named(VGG16_Weights.IMAGENET1K_FEATURES),  # Caffe port: 0-255 inputs, mean only
    "imagenet1k_v1": _named(VGG16_Weights.IMAGENET1K_V1),
}
_IMAGENET_MEAN_STD = (_NAMED_WEIGHTS["imagenet1k_v1"].mean, _NAMED_WEIGHTS["imagenet1k_v1"].std)
# Random weights see the default weights' input scale (0-255, mean removed), so the default
# α/β strike a comparable balance and the losses are large enough for L-BFGS's curvature test.
_CAFFE_MEAN_STD = (_NAMED_WEIGHTS["imagenet1k_features"].mean, _NAMED_WEIGHTS["imagenet1k_features"].std)
#: torchvision (and torch.hub) put the first hex digits of a checkpoint's SHA-256 in its file name.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")
#: Bytes read at a time when hashing a weights file (never the whole file in memory).
_CHUNK = 1 << 20
#: What a key of a VGG16 features state_dict looks like once prefixes are stripped.
_FEATURE_KEY = re.compile(r"\d+\.(weight|bias)")
_WRAPPER_PREFIXES = ("module.", "model.")  # DataParallel / Lightning-style wrappers

#: Input scale (see FeatureExtractor.input_scale) of the default weights, that β defaults are tuned for.
CAFFE_INPUT_SCALE = 255.0

HOW_TO_SUPPLY_WEIGHTS = (
    "copy {file} into {hub}/checkpoints/ (TORCH_HOME), or pass weights=PATH|file://...|s3://... "
    "of a VGG16 state_dict, or weights='random' for a smoke run"
)

Opener = Callable[[str], bytes]


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda, then mps, then cpu; other names are checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WeightsError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise WeightsError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise WeightsError("device 'mps' requested but MPS is not available")
    return device


def layer_index(name: str) -> int:
    """Position of a named layer in vgg16().features."""
    return VGG16_LAYERS.index(name)


def min_side(layer_names: Iterable[str]) -> int:
    """Smallest image side (px) the extractor accepts for these layers: 2^(pools up to the deepest).

    Each 2×2 pool halves (floor) the side and refuses an input under 2 px, so a side of
    2^p px leaves 1 px after the p-th pool, and one pixel less fails there.
    """
    depth = max(layer_index(n) for n in layer_names)
    return 2 ** sum(1 for name in VGG16_LAYERS[: depth + 1] if name.startswith("pool"))


@dataclass(frozen=True, eq=False)
class FeatureExtractor:
    """A truncated VGG16 ``features`` stack plus the input normalization its weights need.

    ``extractor(image, names)`` takes a (B, 3, H, W) image in [0, 1] and returns
    ``{name: activation}`` for the requested layers, running only as deep as the deepest one.
    """

    layers: nn.Sequential
    mean: Tensor  # (1, 3, 1, 1)
    std: Tensor  # (1, 3, 1, 1)
    weights_id: str
    device: torch.device
    #: Memory format of the conv weights; convert inputs with ``x.to(memory_format=...)`` to match.
    memory_format: torch.memory_format = torch.contiguous_format

    @property
    def input_scale(self) -> float:
        """Units of the normalized input per unit of a [0, 1] pixel: 1/std, averaged over channels.

        255 for the Caffe-ported default weights (and random weights), about 4.42 for
        ImageNet mean/std (imagenet1k_v1, bare state_dict files).
        """
        return float(1.0 / self.std.double().mean())

    @property
    def style_weight_factor(self) -> float:
        """(255 / input_scale)²: what a β tuned for the default weights must be multiplied by here.

        With ReLU convolutions (and small biases) activations scale with the input scale s, so
        the content loss goes as s² and the style loss as s⁴; their ratio as s². Measured on
        random VGG16 nets (zero biases), Caffe vs ImageNet normalization: style/content ratio
        3297-3359x apart, predicted 3321x. 1.0 for the default weights.
        """
        return (CAFFE_INPUT_SCALE / self.input_scale) ** 2

    def __call__(self, image: Tensor, names: Iterable[str]) -> dict[str, Tensor]:
        wanted = {layer_index(n): n for n in names}
        last = max(wanted)
        if last >= len(self.layers):
            raise ValueError(f"layer {wanted[last]} is deeper than this extractor ({len(self.layers)} layers)")
        x = (image - self.mean) / self.std
        out = {}
        for i, module in enumerate(self.layers):
            x = module(x)
            if i in wanted:
                out[wanted[i]] = x
            if i == last:
                break
        return out


def _sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in ``_CHUNK``-sized pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _one_line(err: BaseException) -> str:
    """The reason inside an exception's message, on one line.

    torch's refusal under ``weights_only=True`` is several lines of advice, including that
    ``weights_only=False`` "will likely succeed" — exactly what must not be done with a file that
    failed this check. Keep only the unpickler's reason ("Unsupported global: GLOBAL …").
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = next((part.strip() for part in text.splitlines() if part.strip()), type(err).__name__)
    return line.split(" Please use ", 1)[0]


def _local_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(parsed.path if parsed.scheme == "file" else uri).expanduser()
    return None


def read_weights_bytes(uri: str, opener: Opener | None = None) -> bytes:
    """Bytes of a state_dict at a local path / file:// URI, or any other URI through ``opener``."""
    path = _local_path(uri)
    if path is not None:
        if not path.is_file():
            raise WeightsError(f"weights file {uri} does not exist")
        return path.read_bytes()
    if opener is None:
        raise WeightsError(f"weights URI {uri}: no reader for scheme {urlparse(uri).scheme!r} here")
    try:
        return opener(uri)
    except Exception as err:  # the opener's own errors (missing key, denied) become one clear message
        raise WeightsError(f"could not read weights {uri}: {_one_line(err)}") from err


def _check_digest(label: str, digest: str, sha256: str | None, prefix: str | None = None) -> None:
    """Refuse a file whose SHA-256 is not the pinned one (or, unpinned, lacks its name's prefix)."""
    if sha256 is not None:
        if digest != sha256.lower():
            raise WeightsError(f"weights {label} have sha256 {digest}, expected {sha256.lower()}")
    elif prefix is not None and not digest.startswith(prefix):
        raise WeightsError(
            f"weights {label} have sha256 {digest}, but their file name promises one starting {prefix}; "
            "refusing to load them (delete the file to download it again)"
        )


def _torch_load(source: Path | io.BytesIO, label: str) -> object:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary code."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(
            f"weights {label} are not a plain state_dict (weights_only load refused: {_one_line(err)})"
        ) from None
    except Exception as err:
        raise WeightsError(f"weights {label} are not a loadable state_dict file ({_one_line(err)})") from None


def _three(value: object, what: str, label: str) -> tuple[float, float, float]:
    """A checkpoint's per-channel ``mean`` / ``std``: three finite numbers (std > 0), else WeightsError."""
    try:
        items = value.tolist() if isinstance(value, Tensor) else list(value)  # type: ignore[arg-type]
        numbers = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != 3 or not all(map(math.isfinite, numbers)) or (what == "std" and min(numbers) <= 0):
        raise WeightsError(f"weights {label}: {what!r} must be 3 finite numbers (one per RGB channel"
                           f"{', > 0' if what == 'std' else ''}), got {value!r:.80}")
    return numbers  # type: ignore[return-value]


def _features_state(obj: object, label: str) -> tuple[dict, tuple | None]:
    """A loaded checkpoint -> ({"N.weight"|"N.bias": tensor}, (mean, std) or None).

    Takes vgg16().state_dict() ("features.N.*", "classifier.*" dropped), vgg16().features'
    ("N.*"), either under "module." / "model." wrappers, or {"state_dict", "mean", "std"}.
    """
    if not isinstance(obj, dict):
        raise WeightsError(f"weights {label} hold a {type(obj).__name__}, not a state_dict")
    mean_std = None
    if "state_dict" in obj:
        if "mean" in obj and "std" in obj:
            mean_std = (_three(obj["mean"], "mean", label), _three(obj["std"], "std", label))
        obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise WeightsError(f"weights {label}: 'state_dict' holds a {type(obj).__name__}, not a dict")
    features = {}
    for key in obj:
        name = str(key)
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name.startswith("classifier."):
            continue
        name = name.removeprefix("features.")
        if not _FEATURE_KEY.fullmatch(name):
            raise WeightsError(
                f"weights {label}: key {key!r} is not a VGG16 features key; expected 'features.N.weight' "
                "or 'N.weight' (and .bias; 'module.' / 'model.' prefixes are stripped)"
            )
        value = obj[key]
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise WeightsError(f"weights {label}: {key!r} holds NaN or infinite values")
        features[name] = value
    if not features:
        raise WeightsError(f"weights {label} hold no VGG16 features keys (expected 'features.N.weight' or 'N.weight')")
    return features, mean_std


class _Loaded(NamedTuple):
    features: dict | None  # None: random weights
    mean_std: tuple
    weights_id: str


# Loaded state dicts per (source identity, pinned sha256), so one weights file is read (an s3://
# one downloaded) once per process, however many (device, dtype, depth, pooling) extractors use it.
_states: dict[tuple, _Loaded] = {}


def _hub_checkpoint(name: str, spec: _Named) -> Path:
    """``$TORCH_HOME/hub/checkpoints/<file>`` of named weights, downloaded first if missing."""
    file_name = Path(urlparse(spec.url).path).name
    path = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if not path.is_file():
        # The engine's only network access: named weights asked for and not in the cache.
        match = _HASH_IN_NAME.search(file_name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(
                spec.url, str(path), hash_prefix=match.group(1) if match else None, progress=False
            )
        except Exception as err:
            hint = HOW_TO_SUPPLY_WEIGHTS.format(file=file_name, hub=torch.hub.get_dir())
            raise WeightsError(f"VGG16 weights {name!r} are not available ({_one_line(err)}); {hint}") from err
    return path


def _load_weights(weights: str, sha256: str | None, seed: int, opener: Opener | None) -> _Loaded:
    """The features state_dict (None for random), its (mean, std) and the weights id.

    Every file is hashed before it is unpickled, and unpickled with ``weights_only=True``.
    """
    if weights == "random":
        return _Loaded(None, _CAFFE_MEAN_STD, f"random(seed={seed})")
    spec = _NAMED_WEIGHTS.get(weights)
    path = _hub_checkpoint(weights, spec) if spec else _local_path(weights)
    if path is not None:
        if not path.is_file():
            raise WeightsError(f"weights file {weights} does not exist")
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, sha256)
    else:
        key = (weights, sha256)
    if key in _states:
        return _states[key]
    if spec is not None:
        digest = _sha256_file(path)
        match = _HASH_IN_NAME.search(path.name)
        _check_digest(str(path), digest, sha256, match.group(1) if match else None)
        features, _ = _features_state(_torch_load(path, str(path)), str(path))
        loaded = _Loaded(features, (spec.mean, spec.std), f"torchvision:{path.name}")
    elif path is not None:
        digest = _sha256_file(path)
        _check_digest(weights, digest, sha256)
        features, mean_std = _features_state(_torch_load(path, weights), weights)
        loaded = _Loaded(features, mean_std or _IMAGENET_MEAN_STD, f"sha256:{digest}")
    else:
        data = read_weights_bytes(weights, opener)
        digest = hashlib.sha256(data).hexdigest()
        _check_digest(weights, digest, sha256)
        features, mean_std = _features_state(_torch_load(io.BytesIO(data), weights), weights)
        loaded = _Loaded(features, mean_std or _IMAGENET_MEAN_STD, f"sha256:{digest}")
    _states[key] = loaded
    return loaded


class ScaledAvgPool2d(nn.AvgPool2d):
    """2×2 average pooling times a fixed ``scale`` (see ``_avg_pool_scales``)."""

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


def _avg_pool_scales(layers: nn.Sequential, mean_std: tuple) -> dict[int, float]:
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


def _build(
    state: dict | None, mean_std: tuple, seed: int, pooling: str, depth: int, inplace: bool
) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        # Only the features stack ("D" = VGG16): building vgg16() would also initialize its
        # 120M-parameter classifier. The init is torchvision's VGG init for convolutions.
        full = make_layers(cfgs["D"], batch_norm=False)
        for module in full:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
    layers = nn.Sequential(*[nn.ReLU() if isinstance(m, nn.ReLU) else m for m in list(full.children())[: depth + 1]])
    if state is not None:
        wanted = {k: v for k, v in state.items() if int(k.split(".")[0]) <= depth}
        try:
            layers.load_state_dict(wanted, strict=True)
        except RuntimeError as err:
            detail = " ".join(str(err).split())  # torch lists missing / unexpected keys over several lines
            raise WeightsError(f"state_dict does not fit VGG16 features: {detail}") from None
    if pooling == "avg":
        for i, scale in _avg_pool_scales(layers, mean_std).items():
            layers[i] = ScaledAvgPool2d(scale)
    if inplace:
        # In-place ReLU saves memory but would overwrite a requested conv activation.
        for i, module in enumerate(layers):
            if isinstance(module, nn.ReLU):
                layers[i] = nn.ReLU(inplace=True)
    layers.eval().requires_grad_(False)
    return layers


_cache: dict[tuple, FeatureExtractor] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every built extractor and loaded state dict (tests; freeing memory)."""
    with _cache_lock:
        _cache.clear()
        _states.clear()


def load_extractor(
    weights: str,
    *,
    layers: Iterable[str],
    pooling: str = "max",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    sha256: str | None = None,
    seed: int = 0,
    opener: Opener | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> FeatureExtractor:
    """A cached, frozen extractor truncated after the deepest of ``layers``.

    ``weights``: imagenet1k_features | imagenet1k_v1 | random | path | file:// | other URI read by
    ``opener`` (the batch tasks pass their S3 reader). ``seed`` only matters for random weights.
    ``memory_format``: ``torch.channels_last`` converts the module (faster convolutions with
    tensor cores); the extractor records it so the caller converts its input the same way.
    """
    names = list(layers)
    depth = max(layer_index(n) for n in names)
    inplace = not any(n.startswith("conv") for n in names)
    device = resolve_device(device) if isinstance(device, str) else device
    key = (
        weights, sha256, seed if weights == "random" else None,
        pooling, str(device), dtype, depth, inplace, memory_format,
    )
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        state, (mean, std), weights_id = _load_weights(weights, sha256, seed, opener)
        module = _build(state, (mean, std), seed, pooling, depth, inplace).to(device=device, dtype=dtype)
        module = module.to(memory_format=memory_format)
        as_tensor = lambda v: torch.tensor(v, dtype=dtype, device=device).view(1, 3, 1, 1)  # noqa: E731
        extractor = FeatureExtractor(module, as_tensor(mean), as_tensor(std), weights_id, device, memory_format)
        _cache[key] = extractor
        return extractor
