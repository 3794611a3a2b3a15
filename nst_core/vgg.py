"""VGG16 feature extractor: named layers, truncation, pooling, and the cache of built extractors.

Differs from Gatys et al., who used VGG19, because the design fixes VGG16 (torchvision's
Caffe-ported features are the default weights); the layer names and defaults are VGG16's.

Nothing is built or downloaded at import. ``load_extractor`` builds one frozen, eval-mode,
truncated ``vgg16().features`` per (weights, pooling, device, dtype, depth, memory format) and
caches it, so a process builds it once; where the weights come from and how they are verified
is ``nst_core.weights``, the average-pool calibration ``nst_core.pooling``.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .backend import memory_format, resolve_precision
from .errors import WeightsError
from .params import VGG16_CFG, StyleParams, layer_index
from .pooling import ScaledAvgPool2d, avg_pool_scales
from .weights import Opener, clear_weights, load_weights, weights_key

__all__ = [
    "FeatureExtractor",
    "load_extractor",
    "extractor_for",
    "resolve_device",
    "clear_cache",
    "CAFFE_INPUT_SCALE",
]

#: Input scale (see FeatureExtractor.input_scale) of the default weights, that β defaults are tuned for.
CAFFE_INPUT_SCALE = 255.0


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda, then mps, then cpu; other names are checked to exist.

    A CUDA device always carries its index ("cuda" is "cuda:N" of the current device), so "cuda"
    and "cuda:0" are one device to every cache and lease.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
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
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


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
    _casts: dict = field(default_factory=dict, repr=False)  # dtype -> this extractor's weights in it

    def cast(self, dtype: torch.dtype) -> FeatureExtractor:
        """This extractor with its weights stored in ``dtype`` (bf16/fp16), made once and kept.

        Autocast would recast every frozen conv weight at each call (its weight cache only holds
        leaves that require grad), so a reduced-precision VGG pass runs on a copy instead; the
        input is normalized in fp32 and then cast, as autocast's first convolution would.
        """
        with _casts_lock:
            if dtype not in self._casts:
                layers = copy.deepcopy(self.layers).to(dtype=dtype)
                self._casts[dtype] = FeatureExtractor(layers, self.mean, self.std, self.weights_id, self.device,
                                                      self.memory_format)
            return self._casts[dtype]

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

    def __call__(self, image: Tensor, names: Iterable[str],
                 through: Mapping[str, Callable[[Tensor], Tensor]] | None = None) -> dict[str, Tensor]:
        """Activations of a (B, 1|3, H, W) image; a grey (1-channel) image is seen as RGB.

        ``through[name]``, where given, takes that layer's activation and returns what the deeper
        layers (and the result) see in its place: a loss that must meet their gradient, e.g.
        ``losses.style_loss_through``.
        """
        if image.shape[1] == 1:
            image = image.expand(-1, 3, -1, -1)
        image = image.contiguous(memory_format=self.memory_format)
        wanted = {layer_index(n): n for n in names}
        last = max(wanted)
        if last >= len(self.layers):
            raise ValueError(f"layer {wanted[last]} is deeper than this extractor ({len(self.layers)} layers)")
        x = ((image - self.mean) / self.std).to(self.layers[0].weight.dtype)
        out = {}
        for i, module in enumerate(self.layers):
            x = module(x)
            if i in wanted:
                if through and wanted[i] in through:
                    x = through[wanted[i]](x)
                out[wanted[i]] = x
            if i == last:
                break
        return out


def _vgg16_features() -> nn.Sequential:
    """torchvision's ``make_layers(cfgs["D"])``, module for module (tests/nst_core/test_vgg.py
    checks), written out: importing torchvision.models costs ~2.5 s a process."""
    layers: list[nn.Module] = []
    channels = 3
    for width in VGG16_CFG:
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = width
    return nn.Sequential(*layers)


def _build(
    state: dict | None, mean_std: tuple, seed: int, pooling: str, depth: int, inplace: bool
) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        # Only the features stack ("D" = VGG16): building vgg16() would also initialize its
        # 120M-parameter classifier. The init is torchvision's VGG init for convolutions.
        full = _vgg16_features()
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
        for i, scale in avg_pool_scales(_through_next_relu(full, layers, state, depth), mean_std).items():
            if i <= depth:
                layers[i] = ScaledAvgPool2d(scale)
    if inplace:
        # In-place ReLU saves memory but would overwrite a requested conv activation.
        for i, module in enumerate(layers):
            if isinstance(module, nn.ReLU):
                layers[i] = nn.ReLU(inplace=True)
    layers.eval().requires_grad_(False)
    return layers


def _through_next_relu(full: nn.Sequential, layers: nn.Sequential, state: dict | None, depth: int) -> nn.Sequential:
    """``layers`` to calibrate average pooling on: where they end on a pool, with the next
    convolution (``state``'s weights, or ``full``'s seeded ones) and ReLU after it, so that pool's
    factor is matched at the next ReLU, as every deeper cut matches it. Cut right after the pool, it
    matched the pool's own output: another factor (pool2 1.56 against 1.36, random VGG16), so the
    objective changed with layers asked for elsewhere. pool5, or a state_dict that ends at the pool,
    still match the pool's output."""
    if not isinstance(layers[-1], nn.MaxPool2d) or depth + 2 >= len(full):
        return layers
    conv = copy.deepcopy(full[depth + 1])
    if state is not None:
        own = {k.split(".", 1)[1]: v for k, v in state.items() if int(k.split(".")[0]) == depth + 1}
        if not own:
            return layers
        conv.load_state_dict(own, strict=True)
    return nn.Sequential(*layers, conv, nn.ReLU())


_cache: dict[tuple, FeatureExtractor] = {}
_cache_lock = threading.Lock()  # held while weights load (a download, an S3 read): never by a pass
_casts_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every built extractor and loaded state dict (tests; freeing memory)."""
    with _cache_lock:
        _cache.clear()
    clear_weights()


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
        weights_key(weights, sha256), seed if weights == "random" else None,
        pooling, str(device), dtype, depth, inplace, memory_format,
    )
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        state, (mean, std), weights_id = load_weights(weights, sha256, seed, opener)
        module = _build(state, (mean, std), seed, pooling, depth, inplace).to(device=device, dtype=dtype)
        module = module.to(memory_format=memory_format)
        as_tensor = lambda v: torch.tensor(v, dtype=dtype, device=device).view(1, 3, 1, 1)  # noqa: E731
        extractor = FeatureExtractor(module, as_tensor(mean), as_tensor(std), weights_id, device, memory_format)
        _cache[key] = extractor
        return extractor


def extractor_for(params: StyleParams, *, opener: Opener | None = None) -> FeatureExtractor:
    """The cached extractor these params need (weights, pooling, device, deepest layer, layout)."""
    device = resolve_device(params.device)
    return load_extractor(
        params.weights,
        layers=[*params.content_layers, *params.style_layers],
        pooling=params.pooling,
        device=device,
        sha256=params.weights_sha256,
        seed=params.seed,
        opener=opener,
        memory_format=memory_format(device, resolve_precision(params.precision, device, params.image_size)),
    )
