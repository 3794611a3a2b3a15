"""VGG16 feature extractor: named layers, truncation, pooling, weight sources.

Nothing is built or downloaded at import. ``load_extractor`` builds one frozen, eval-mode,
truncated ``vgg16().features`` per (weights, pooling, device, dtype, depth) and caches it, so
a process builds it once.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
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
    "read_weights_bytes",
    "HOW_TO_SUPPLY_WEIGHTS",
]

#: Named torchvision weights: enum and the input normalization those weights were trained with.
_TORCHVISION_WEIGHTS = {
    "imagenet1k_features": VGG16_Weights.IMAGENET1K_FEATURES,  # Caffe port: 0-255 inputs, mean only
    "imagenet1k_v1": VGG16_Weights.IMAGENET1K_V1,
}
_IMAGENET_MEAN_STD = (VGG16_Weights.IMAGENET1K_V1.transforms().mean, VGG16_Weights.IMAGENET1K_V1.transforms().std)
# Random weights see the default weights' input scale (0-255, mean removed), so the default
# α/β strike a comparable balance and the losses are large enough for L-BFGS's curvature test.
_CAFFE_MEAN_STD = (
    VGG16_Weights.IMAGENET1K_FEATURES.transforms().mean,
    VGG16_Weights.IMAGENET1K_FEATURES.transforms().std,
)

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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_weights_bytes(uri: str, opener: Opener | None = None) -> bytes:
    """Bytes of a state_dict at a local path / file:// URI, or any other URI through ``opener``."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        path = Path(parsed.path if parsed.scheme == "file" else uri).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file {uri} does not exist")
        return path.read_bytes()
    if opener is None:
        raise WeightsError(f"weights URI {uri}: no reader for scheme {parsed.scheme!r} here")
    try:
        return opener(uri)
    except Exception as err:  # the opener's own errors (missing key, denied) become one clear message
        raise WeightsError(f"could not read weights {uri}: {err}") from err


def _state_dict_from_bytes(data: bytes, uri: str) -> tuple[dict, tuple | None]:
    """A torch.save'd state_dict (full vgg16 or features only), or {"state_dict", "mean", "std"}."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"weights {uri} are not a loadable state_dict: {err}") from err
    if not isinstance(obj, dict):
        raise WeightsError(f"weights {uri} hold a {type(obj).__name__}, not a state_dict")
    mean_std = None
    if "state_dict" in obj:
        if "mean" in obj and "std" in obj:
            mean_std = (list(map(float, obj["mean"])), list(map(float, obj["std"])))
        obj = obj["state_dict"]
    # Accept both vgg16().state_dict() ("features.0.weight") and vgg16().features.state_dict() ("0.weight").
    features = {k.removeprefix("features."): v for k, v in obj.items() if not k.startswith("classifier.")}
    return features, mean_std


def _load_weights(
    weights: str, sha256: str | None, seed: int, opener: Opener | None
) -> tuple[dict | None, tuple, str]:
    """(features state_dict or None for random, (mean, std), weights id)."""
    if weights == "random":
        return None, _CAFFE_MEAN_STD, f"random(seed={seed})"
    if weights in _TORCHVISION_WEIGHTS:
        enum = _TORCHVISION_WEIGHTS[weights]
        transforms = enum.transforms()
        try:
            # Uses the torch hub cache when the file is there; downloads (hash-checked) otherwise.
            full = enum.get_state_dict(progress=False, check_hash=True)
        except Exception as err:
            hint = HOW_TO_SUPPLY_WEIGHTS.format(file=Path(enum.url).name, hub=torch.hub.get_dir())
            raise WeightsError(f"VGG16 weights {weights!r} are not available ({err}); {hint}") from err
        if sha256 is not None:  # torchvision checks a hash prefix on download; this checks the cached file
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
            digest = _sha256(cached.read_bytes())
            if digest != sha256.lower():
                raise WeightsError(f"weights {cached} have sha256 {digest}, expected {sha256.lower()}")
        features = {k.removeprefix("features."): v for k, v in full.items() if k.startswith("features.")}
        return features, (transforms.mean, transforms.std), f"torchvision:{enum.url.rsplit('/', 1)[-1]}"
    data = read_weights_bytes(weights, opener)
    digest = _sha256(data)
    if sha256 is not None and digest != sha256.lower():
        raise WeightsError(f"weights {weights} have sha256 {digest}, expected {sha256.lower()}")
    features, mean_std = _state_dict_from_bytes(data, weights)
    return features, mean_std or _IMAGENET_MEAN_STD, f"sha256:{digest}"


def _build(state: dict | None, seed: int, pooling: str, depth: int, inplace: bool) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        # Only the features stack ("D" = VGG16): building vgg16() would also initialize its
        # 120M-parameter classifier. The init is torchvision's VGG init for convolutions.
        full = make_layers(cfgs["D"], batch_norm=False)
        for module in full:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
    layers = nn.Sequential(*list(full.children())[: depth + 1])
    if state is not None:
        wanted = {k: v for k, v in state.items() if int(k.split(".")[0]) <= depth}
        try:
            layers.load_state_dict(wanted, strict=True)
        except RuntimeError as err:
            raise WeightsError(f"state_dict does not fit VGG16 features: {err}") from err
    for i, module in enumerate(layers):
        if isinstance(module, nn.MaxPool2d) and pooling == "avg":
            layers[i] = nn.AvgPool2d(kernel_size=2, stride=2)
        elif isinstance(module, nn.ReLU):
            # In-place ReLU would overwrite a requested conv activation.
            layers[i] = nn.ReLU(inplace=inplace)
    layers.eval().requires_grad_(False)
    return layers


_cache: dict[tuple, FeatureExtractor] = {}
_cache_lock = threading.Lock()


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
    key = (weights, sha256, seed if weights == "random" else None, pooling, str(device), dtype, depth, inplace, memory_format)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        state, (mean, std), weights_id = _load_weights(weights, sha256, seed, opener)
        module = _build(state, seed, pooling, depth, inplace).to(device=device, dtype=dtype)
        module = module.to(memory_format=memory_format)
        as_tensor = lambda v: torch.tensor(v, dtype=dtype, device=device).view(1, 3, 1, 1)  # noqa: E731
        extractor = FeatureExtractor(module, as_tensor(mean), as_tensor(std), weights_id, device, memory_format)
        _cache[key] = extractor
        return extractor
