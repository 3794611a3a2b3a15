"""stylize(): targets, init, the coarse-to-fine L-BFGS / Adam loop, progress callback, guards.

The optimizer sees tensors and a device only; decoding and encoding live in imageio.

Departures from Gatys et al. (2016), each marked where it happens:

- coarse to fine (``params.scales``): the paper optimizes at one size; like
  crowsonkb/style-transfer-pytorch we optimize at sizes √2 apart, each scale starting from the
  previous result upsampled, because most of the structure settles at low resolution for a
  fraction of the cost. ``scales=1`` is the paper's single-scale method.
- clamping to [0, 1] before each evaluation and returning the best evaluated image, not the
  last (in the closure);
- reduced precision (``params.precision``): the VGG pass may run in bf16/fp16 under autocast;
  Grams, losses, the image and the optimizer state stay fp32, and the final loss is always
  recomputed in fp32 at the output size so runs at different settings compare.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from .errors import NonFiniteLossError, NSTError
from .imageio import check_min_side, resize_longest, split_alpha
from .losses import content_loss, gram_matrix, style_loss, tv_loss, weighted_sum
from .params import STOP_WINDOW, StyleParams
from .vgg import FeatureExtractor, Opener, load_extractor, min_side, resolve_device

__all__ = [
    "StyleProgress",
    "StyleResult",
    "StyleTargets",
    "compute_style_targets",
    "targets_key",
    "targets_need_content",
    "extractor_for",
    "scale_sizes",
    "split_budget",
    "resolve_precision",
    "stylize",
    "rgb_to_ycbcr",
    "ycbcr_to_rgb",
    "match_color",
    "match_luminance",
]

TERMS = ("content", "style", "tv", "total")


@dataclass(frozen=True)
class StyleProgress:
    """One loss evaluation, as seen by a progress callback.

    Losses are at the working precision and at the current scale's size (the final fp32 loss at
    the output size is in ``StyleResult.losses``).
    """

    iteration: int  # 1-based loss evaluation count, over all scales
    # evaluations planned over all scales; an early stop (stop_tolerance) lowers it at the event
    # that stops, so the last event has iteration == total
    total: int
    content: float
    style: float
    tv: float
    loss: float
    elapsed: float  # seconds since the optimization started
    scale: int = 1  # 1-based index of the current scale
    scales: int = 1  # number of scales
    size: int = 0  # longest side of the current scale, px


@dataclass(frozen=True, eq=False)
class StyleTargets:
    """Blended, position-normalized style Grams per scale, computed once and reusable.

    ``by_size[longest_side][layer]`` is a (1, nC, nC) fp32 Gram of the style resized to that
    scale. ``key`` records what the Grams depend on besides the style images; ``stylize``
    refuses targets whose key does not match its params.
    """

    by_size: dict[int, dict[str, Tensor]]
    key: tuple

    @property
    def grams(self) -> dict[str, Tensor]:
        """The Grams at the output size (the finest scale)."""
        return self.by_size[max(self.by_size)]


@dataclass
class StyleResult:
    """The stylized image (RGB, or RGBA when the content had alpha) and what produced it."""

    image: Image.Image
    # {"initial": {content, style, tv, total}, "final": {...}}: both fp32 at the output size,
    # "initial" on the starting image, "final" on the returned image.
    losses: dict[str, dict[str, float]]
    history: list[dict[str, float]] = field(repr=False)  # per evaluation, working precision
    metadata: dict


# --- colour ----------------------------------------------------------------------------------

def rgb_to_ycbcr(x: Tensor) -> Tensor:
    """BT.601 RGB -> YCbCr, all in [0, 1]. (B, 3, H, W) -> (B, 3, H, W)."""
    r, g, b = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return torch.stack([y, 0.564 * (b - y) + 0.5, 0.713 * (r - y) + 0.5], 1)


def ycbcr_to_rgb(x: Tensor) -> Tensor:
    """Inverse of rgb_to_ycbcr. (B, 3, H, W) -> (B, 3, H, W)."""
    y, cb, cr = x.unbind(1)
    cb, cr = cb - 0.5, cr - 0.5
    return torch.stack([y + 1.403 * cr, y - 0.714 * cr - 0.344 * cb, y + 1.773 * cb], 1)


def _y(x: Tensor) -> Tensor:
    """Luminance of an RGB image. (B, 3, H, W) -> (B, 1, H, W)."""
    return rgb_to_ycbcr(x)[:, :1]


def match_luminance(style_y: Tensor, content_y: Tensor) -> Tensor:
    """Give the style's luminance the content's mean and σ (Gatys et al. 2016, "Preserving color").

    Y' = (Y_s − μ_s)·σ_c/σ_s + μ_c, clamped to [0, 1] (the range the optimized image lives in).
    (1, 1, H, W), (1, 1, H', W') -> (1, 1, H, W).
    """
    mu_s, sd_s = style_y.mean(), style_y.std().clamp_min(1e-5)
    return ((style_y - mu_s) * (content_y.std() / sd_s) + content_y.mean()).clamp(0, 1)


def _sqrtm(cov: Tensor, power: float) -> Tensor:
    """cov^power for a symmetric PSD 3x3 matrix via eigendecomposition."""
    vals, vecs = torch.linalg.eigh(cov)
    return vecs @ torch.diag(vals.clamp_min(1e-8) ** power) @ vecs.T


def match_color(source: Tensor, reference: Tensor) -> Tensor:
    """Affine colour transfer: give ``source`` the mean and covariance of ``reference``'s pixels.

    x' = Σ_r^½ Σ_s^-½ (x − μ_s) + μ_r (Gatys et al. 2016, "Preserving color", image analogies
    variant). (1, 3, H, W), (1, 3, H', W') -> (1, 3, H, W), clamped to [0, 1].
    """
    def stats(t: Tensor) -> tuple[Tensor, Tensor]:
        flat = t.reshape(3, -1).double()
        mu = flat.mean(1, keepdim=True)
        centered = flat - mu
        return mu, centered @ centered.T / flat.shape[1] + 1e-5 * torch.eye(3, dtype=flat.dtype, device=flat.device)

    mu_s, cov_s = stats(source)
    mu_r, cov_r = stats(reference)
    transform = _sqrtm(cov_r, 0.5) @ _sqrtm(cov_s, -0.5)
    out = transform @ (source.reshape(3, -1).double() - mu_s) + mu_r
    return out.reshape(source.shape).to(source.dtype).clamp(0, 1)


# --- precision, memory format, scales ---------------------------------------------------------

_DTYPES = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16: bf16 convolutions run natively (oneDNN), not emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision a run uses: fp32 | tf32 | bf16 | fp16.

    ``auto``: bf16 on CUDA GPUs that have it and on CPUs with AVX512-BF16/AMX; else tf32 on
    CUDA (fp32 storage, TF32 matmuls and convolutions) and fp32 elsewhere (MPS included).
    ``tf32`` off CUDA is fp32 (what actually runs, and what the sidecar records).
    """
    if requested == "tf32" and device.type != "cuda":
        return "fp32"  # TF32 is a CUDA tensor-core mode; elsewhere the run is plain fp32, recorded so
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise NSTError(f"precision='bf16' requested but {device} has no bf16 support; use auto, tf32 or fp16")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "tf32"
    if device.type == "cpu" and _cpu_has_bf16():
        return "bf16"
    return "fp32"


def _memory_format(device: torch.device, precision: str) -> torch.memory_format:
    """channels_last where it measured faster for the VGG pass (benchmarks/speed.py --formats).

    CUDA: tensor-core convolutions want NHWC. CPU (oneDNN, 2 cores, AVX-512+AMX): bf16 forward+
    backward at 384 px was faster in channels_last; fp32 was not (see README "Performance").
    """
    if device.type == "cuda" or (device.type == "cpu" and precision == "bf16"):
        return torch.channels_last
    return torch.contiguous_format


_settings_lock = threading.Lock()
_settings_users = 0  # runs inside _backend_settings now, over all threads
_settings_saved: tuple = ()  # the process's settings before the first of them entered


@contextlib.contextmanager
def _backend_settings(device: torch.device, precision: str, deterministic: bool) -> Iterator[dict]:
    """TF32 and determinism switches for one run, restored afterwards; yields what was in effect.

    These are process-wide torch settings. Runs on several devices of one process (the batch
    tasks run one pair per leased device, in a thread per device) overlap: the settings in force
    are what the overlapping runs set (each sidecar records those in force when its run started;
    a batch shares one params), and the process's own come back when the last run exits (a
    per-run restore would leave the first run's settings behind when runs exit out of order).
    """
    global _settings_users, _settings_saved
    cuda = torch.backends.cuda.matmul
    cudnn = torch.backends.cudnn
    with _settings_lock:
        if _settings_users == 0:
            _settings_saved = (cuda.allow_tf32, cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic,
                               torch.are_deterministic_algorithms_enabled(),
                               torch.is_deterministic_algorithms_warn_only_enabled())
        _settings_users += 1
    try:
        if device.type == "cuda":
            # TF32 only where the run asked for fp32-with-TF32 or reduced precision (the fp32
            # Grams then use it too); precision="fp32" stays exact IEEE fp32.
            tf32 = precision != "fp32"
            cuda.allow_tf32 = cudnn.allow_tf32 = tf32
            cudnn.benchmark = not deterministic
        if deterministic:
            # cuBLAS reads this when its handle is made; setdefault keeps a user's own choice.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            cudnn.deterministic = True
            # warn_only: an op without a deterministic kernel warns instead of failing the pair.
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield {
            "threads": torch.get_num_threads(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": cudnn.deterministic,
            "cudnn_benchmark": cudnn.benchmark,
            "tf32_matmul": cuda.allow_tf32,
            "tf32_cudnn": cudnn.allow_tf32,
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        }
    finally:
        with _settings_lock:
            _settings_users -= 1
            if _settings_users == 0:
                saved = _settings_saved
                cuda.allow_tf32, cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic = saved[:4]
                torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


@contextlib.contextmanager
def _exact_fp32() -> Iterator[None]:
    """TF32 off for CUDA matmuls and convolutions (cuDNN allows TF32 by default), restored after.

    The reported losses are "fp32 at the output size" whatever the run's precision; with cuDNN's
    default they would be TF32 convolutions on a GPU. The flags are inert on CPU.
    """
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (cuda.allow_tf32, cudnn.allow_tf32)
    try:
        cuda.allow_tf32 = cudnn.allow_tf32 = False
        yield
    finally:
        cuda.allow_tf32, cudnn.allow_tf32 = saved


def scale_sizes(params: StyleParams) -> list[int]:
    """Longest side of each scale, coarse to fine: image_size·2^(−k/2) for k = scales−1 … 0."""
    sizes = [round(params.image_size / 2 ** (k / 2)) for k in reversed(range(params.scales))]
    return sorted(set(sizes))


def split_budget(total: int, pixels: Sequence[int]) -> list[int]:
    """Evaluations per scale: the same share of compute for each, so most evaluations run small.

    An evaluation costs about its pixel count, so scale k gets total·(1/p_k)/Σ(1/p_j)
    evaluations (at √2 steps: 4:2:1 for three scales); a coarse scale gets none rather than a
    useless single one, and the output size at least one; the sum is ``total``.
    """
    inv = [1.0 / p for p in pixels]
    shares = [int(total * w / sum(inv)) for w in inv]  # floors; a coarse scale may get none
    # A coarse scale of one evaluation changes nothing: the step after a scale's last evaluation
    # is never evaluated, and the next scale starts from the best evaluated image (its start).
    shares = [0 if n == 1 else n for n in shares[:-1]] + shares[-1:]
    shares[-1] = total - sum(shares[:-1])  # >= 1: at least the output size is optimized
    return shares


# --- targets ---------------------------------------------------------------------------------

def _to_tensor(img: Image.Image, device: torch.device) -> Tensor:
    """PIL RGB -> (1, 3, H, W) float32 in [0, 1]."""
    return pil_to_tensor(img).to(device=device, dtype=torch.float32).div_(255).unsqueeze(0).contiguous()


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
        memory_format=_memory_format(device, resolve_precision(params.precision, device)),
    )


def _features(extractor: FeatureExtractor, x: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """VGG activations of a (1, 1|3, H, W) image; grey (1-channel) images are seen as RGB."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return extractor(x.contiguous(memory_format=extractor.memory_format), names)


def targets_need_content(params: StyleParams) -> bool:
    """Whether style targets depend on the content image (then they cannot be shared by pairs).

    histogram matches the style's colours to the content; luminance matches the style's
    luminance mean and σ to the content's.
    """
    return params.preserve_color in ("histogram", "luminance")


def targets_key(params: StyleParams, extractor: FeatureExtractor, n_styles: int) -> tuple:
    """What style targets depend on besides the style images themselves (hashable)."""
    return (
        extractor.weights_id,
        params.pooling,
        tuple(params.style_layers),
        tuple(scale_sizes(params)),
        params.preserve_color,
        tuple(params.blend_weights(n_styles)),
    )


def _style_tensor(img: Image.Image, size: int, params: StyleParams, device: torch.device,
                  content: Tensor | None, name: str = "style") -> Tensor:
    """A style image prepared as the optimization sees it (size, luminance, matched colours).

    At the output size a style thinner than the deepest style layer needs is refused, naming it.
    At a coarser scale it is enlarged to that minimum instead (differs from Gatys et al., who have
    no coarse scales) (its Grams are means over positions,
    so a slightly larger style image gives comparable targets).
    """
    rgb = resize_longest(split_alpha(img).rgb, size)
    # Only the style layers see the style: a deeper content layer must not refuse a thin style
    # (nor change its Grams, which targets_key does not cover).
    need = min_side(params.style_layers)
    if size >= params.image_size:
        check_min_side(rgb, need, name)
    elif min(rgb.size) < need:
        rgb = split_alpha(img).rgb
        factor = need / min(rgb.size)
        rgb = rgb.resize((max(need, round(rgb.width * factor)), max(need, round(rgb.height * factor))),
                         Image.Resampling.LANCZOS)
    s = _to_tensor(rgb, device)
    if params.preserve_color == "none":
        return s
    if content is None:
        raise NSTError(f"preserve_color={params.preserve_color!r} matches the style to each content: "
                       "targets are per pair")
    if params.preserve_color == "luminance":
        return match_luminance(_y(s), _y(content))
    return match_color(s, content)


def compute_style_targets(
    style: Image.Image | Sequence[Image.Image],
    params: StyleParams,
    *,
    extractor: FeatureExtractor | None = None,
    opener: Opener | None = None,
    content: Tensor | None = None,
    style_names: Sequence[str] | None = None,
) -> StyleTargets:
    """Style Grams at every scale, blended over several style images by ``style_blend_weights``.

    Ĝ = Σ_i w_i·gram(a_l(S_i)) / (nH·nW) per style layer l and scale, in fp32 whatever the run's
    precision (computed once per style; the generated image's Grams are matched to exact
    targets). ``content`` (RGB, (1, 3, H, W)) is only needed, and only allowed to matter, with
    ``preserve_color`` histogram or luminance. ``style_names`` name the styles in errors.
    """
    styles = [style] if isinstance(style, Image.Image) else list(style)
    if not styles:
        raise NSTError("at least one style image is needed")
    extractor = extractor or extractor_for(params, opener=opener)
    weights = params.blend_weights(len(styles))
    names = list(style_names or [f"style image {i + 1}" if len(styles) > 1 else "style image"
                                 for i in range(len(styles))])
    by_size: dict[int, dict[str, Tensor]] = {}
    # Under the run's deterministic setting, and in exact fp32 (no TF32) whatever the precision:
    # the batch tasks call this outside stylize(), once per style and device.
    device = extractor.device
    with _backend_settings(device, resolve_precision(params.precision, device), params.deterministic), \
            _exact_fp32(), torch.no_grad():
        for size in scale_sizes(params):
            grams: dict[str, Tensor] = {}
            for img, w, name in zip(styles, weights, names):
                feats = _features(extractor, _style_tensor(img, size, params, extractor.device, content, name),
                                  params.style_layers)
                for layer, f in feats.items():
                    g = w * gram_matrix(f.float(), normalize=True)
                    grams[layer] = grams[layer] + g if layer in grams else g
            by_size[size] = grams
    return StyleTargets(by_size, targets_key(params, extractor, len(styles)))


# --- the optimization ------------------------------------------------------------------------

def _init_image(kind: str, content: Tensor, style: Tensor | None, seed: int) -> Tensor:
    if kind == "content":
        return content.clone()
    if kind == "noise":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return torch.rand(content.shape, generator=gen).to(content.device)
    return torch.nn.functional.interpolate(style, size=content.shape[-2:], mode="bilinear", align_corners=False)


def _upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    return torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def _make_optimizer(params: StyleParams, x: Tensor, evaluations: int) -> torch.optim.Optimizer:
    if params.optimizer == "adam":
        return torch.optim.Adam([x], lr=params.step_size())
    # max_iter = max_eval = evaluations: one step() runs the scale's whole budget, and tolerances
    # of 0 keep it from stopping early except at an exactly zero gradient, so `iterations` counts
    # loss evaluations. History 20: at 256 px and 150 evaluations it reached the same loss as 50
    # (1.7858 vs 1.7861 from noise), and its two-loop step costs 16 ms per evaluation at 512x384
    # on 2 CPU cores against 35 ms (50) and 48 ms (torch's default 100); on a GPU those are
    # hundreds of small kernel launches.
    return torch.optim.LBFGS(
        [x], lr=params.step_size(), max_iter=evaluations, max_eval=evaluations,
        tolerance_grad=0.0, tolerance_change=0.0, history_size=20,
    )


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("prefect-nst", "torch", "torchvision", "pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


@dataclass
class _Scale:
    """What one scale optimizes against."""

    size: int
    work: Tensor  # content as optimized: (1, 3, H, W) RGB or (1, 1, H, W) luminance
    content_feats: dict[str, Tensor]  # fp32
    style_grams: dict[str, Tensor]  # fp32
    evaluations: int


class _Stop(Exception):
    """Raised inside the closure to end a scale early (stop_tolerance)."""


def _terms(extractor: FeatureExtractor, x: Tensor, scale: _Scale, params: StyleParams, layers: list[str],
           dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor]:
    """(content, style, tv) of image x: the VGG pass at ``dtype`` (None: fp32), the rest fp32."""
    with torch.autocast(extractor.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        feats = _features(extractor, x, layers)
    # Grams and losses in fp32: a bf16 Gram carries ~0.4% rounding, as large as the Gram
    # differences the style loss measures near convergence.
    c = weighted_sum({n: content_loss(feats[n].float(), scale.content_feats[n]) for n in params.content_layers},
                     {n: 1.0 / len(params.content_layers) for n in params.content_layers})
    s = weighted_sum({n: style_loss(gram_matrix(feats[n].float(), normalize=True), scale.style_grams[n])
                      for n in params.style_layers}, params.layer_weights())
    tv = tv_loss(x) if params.tv_weight > 0 else torch.zeros((), device=x.device)
    return c, s, tv


def _total(params: StyleParams, c: Tensor, s: Tensor, tv: Tensor) -> Tensor:
    return params.content_weight * c + params.style_weight * s + params.tv_weight * tv


def stylize(
    content: Image.Image,
    style: Image.Image | Sequence[Image.Image],
    params: StyleParams | None = None,
    *,
    progress: Callable[[StyleProgress], None] | None = None,
    targets: StyleTargets | None = None,
    opener: Opener | None = None,
    content_name: str = "content image",
    style_names: Sequence[str] | None = None,
) -> StyleResult:
    """Gatys style transfer of one content image to one style (or a blend of several).

    Minimizes α·content + β·Σ_l w_l·style_l + γ·tv over the pixels (clamped to [0, 1]), coarse
    to fine over ``scale_sizes(params)`` with ``params.iterations`` loss evaluations in all
    (split by ``split_budget``), and returns the lowest-loss image evaluated at the last scale.
    ``targets`` (from ``compute_style_targets``) skips recomputing the style Grams.
    ``content_name`` / ``style_names`` name the inputs in errors (an image too small for the layers).
    """
    params = params or StyleParams()
    device = resolve_device(params.device)
    precision = resolve_precision(params.precision, device)
    # Everything below runs under the run's backend settings, the style targets and content
    # features included: in deterministic mode cuBLAS must see its workspace setting before its
    # first product (the Grams), and precision="fp32" must not compute targets with TF32.
    with _backend_settings(device, precision, params.deterministic) as backend:
        return _stylize(content, style, params, precision, backend, progress=progress, targets=targets,
                        opener=opener, content_name=content_name, style_names=style_names)


def _stylize(
    content: Image.Image,
    style: Image.Image | Sequence[Image.Image],
    params: StyleParams,
    precision: str,
    backend: dict,
    *,
    progress: Callable[[StyleProgress], None] | None,
    targets: StyleTargets | None,
    opener: Opener | None,
    content_name: str,
    style_names: Sequence[str] | None,
) -> StyleResult:
    """stylize()'s body, inside the run's backend settings (``backend``: what they are)."""
    t_start = time.perf_counter()
    extractor = extractor_for(params, opener=opener)
    device = extractor.device
    dtype = _DTYPES[precision]
    n_styles = 1 if isinstance(style, Image.Image) else len(style)
    luminance = params.preserve_color == "luminance"

    decoded = split_alpha(content)
    need = min_side([*params.content_layers, *params.style_layers])
    content_full = resize_longest(decoded.rgb, params.image_size)
    check_min_side(content_full, need, content_name)
    c_rgb = _to_tensor(content_full, device)
    if targets is None:
        targets = compute_style_targets(style, params, extractor=extractor, content=c_rgb, style_names=style_names)
    elif targets_need_content(params):
        raise NSTError(f"targets cannot be reused with preserve_color={params.preserve_color!r} "
                       "(they depend on the content)")
    elif targets.key != targets_key(params, extractor, n_styles):
        raise NSTError("style targets were computed with other params (weights, layers, size, scales, colour or blend)")

    sizes = scale_sizes(params)
    works = {size: (c_rgb if size == params.image_size
                    else _to_tensor(resize_longest(decoded.rgb, size), device)) for size in sizes}
    if luminance:
        # Differs from optimizing RGB: one luminance channel is optimized (VGG sees it as grey)
        # and the content's chroma is put back at the end (Gatys et al. 2016, "Preserving color").
        works = {size: _y(w) for size, w in works.items()}
    # A coarse scale at which the content would be thinner than the layers need is left out.
    sizes = [size for size in sizes if size == sizes[-1] or min(works[size].shape[-2:]) >= need]
    budget = split_budget(params.iterations, [works[size].shape[-1] * works[size].shape[-2] for size in sizes])
    all_layers = list(dict.fromkeys([*params.content_layers, *params.style_layers]))
    scales = []
    # Content targets in exact fp32 too: the reported fp32 losses are measured against them.
    with torch.no_grad(), _exact_fp32():
        for size, n in zip(sizes, budget):
            if n == 0:  # a budget too small to reach this coarse scale
                continue
            cf = {k: v.float() for k, v in _features(extractor, works[size], params.content_layers).items()}
            scales.append(_Scale(size, works[size], cf, {k: g.to(device) for k, g in targets.by_size[size].items()}, n))
    t_targets = time.perf_counter() - t_start

    first_style = style if isinstance(style, Image.Image) else style[0]
    # init="style" with a blend starts from the first style image (a pixel blend would be a mix
    # no style looks like).
    init_style = (_style_tensor(first_style, scales[0].size, params, device, c_rgb,
                                (style_names or ["style image"])[0]) if params.init == "style" else None)
    start = _init_image(params.init, scales[0].work, init_style, params.seed)
    history: list[dict[str, float]] = []
    ran: list[dict] = []
    # Evaluations planned over all scales, as the progress events report it: an early stop at a
    # scale drops that scale's unused budget, so the last event always has iteration == total.
    planned = [sum(budget)]
    t_opt = time.perf_counter()

    x0 = start
    for index, scale in enumerate(scales):
        if index:
            x0 = _upsample(best["image"], scale.work.shape[-2:])
        x = x0.detach().clone().contiguous().requires_grad_(True)
        optimizer = _make_optimizer(params, x, scale.evaluations)
        best = {"total": math.inf, "image": x.detach().clone()}
        seen: list[float] = []  # best total after each evaluation at this scale

        def closure(x=x, optimizer=optimizer, scale=scale, best=best, seen=seen, index=index) -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            # Differs from Gatys et al. (unconstrained pixels) because an image outside [0, 1]
            # is not one we can return, and VGG was trained on in-range inputs; the clamp is a
            # projection before each evaluation, so the loss reported is that of a valid image.
            with torch.no_grad():
                x.clamp_(0, 1)
            c, s, tv = _terms(extractor, x, scale, params, all_layers, dtype)
            total = _total(params, c, s, tv)
            total.backward()
            values = dict(zip(TERMS, torch.stack([c.detach(), s.detach(), tv.detach(), total.detach()]).tolist()))
            history.append(values)
            if not all(map(math.isfinite, values.values())):
                raise NonFiniteLossError(len(history), values)
            # A finite loss with a non-finite gradient (a reduced-precision backward overflowing)
            # would send the optimizer to NaN pixels and be reported one evaluation late, as a loss
            # problem; name it here.
            if not bool(torch.isfinite(x.grad).all()):
                raise NonFiniteLossError(len(history), values, what="gradient", advice=(
                    "use precision=fp32" if dtype is not None else
                    "lower the style/content weights or the learning rate"))
            # Differs from Gatys et al. (the last iterate) because Adam and L-BFGS without a line
            # search can end on a worse step: each scale keeps its lowest-loss evaluated image.
            if values["total"] < best["total"]:
                best["total"], best["image"] = values["total"], x.detach().clone()
            seen.append(best["total"])
            stop = (params.stop_tolerance is not None and len(seen) > STOP_WINDOW
                    and seen[-STOP_WINDOW - 1] - seen[-1] < params.stop_tolerance * abs(seen[-STOP_WINDOW - 1]))
            if stop:
                planned[0] -= scale.evaluations - len(seen)
            if progress is not None:
                progress(StyleProgress(len(history), planned[0], values["content"], values["style"],
                                       values["tv"], values["total"], time.perf_counter() - t_opt,
                                       index + 1, len(scales), scale.size))
            if stop:
                raise _Stop
            return total

        done_before = len(history)
        try:
            if params.optimizer == "lbfgs":
                optimizer.step(closure)
            else:
                for _ in range(scale.evaluations):
                    optimizer.step(closure)
        except _Stop:
            pass
        else:  # L-BFGS ended the scale sooner (a zero gradient): later events count without the rest
            planned[0] -= scale.evaluations - (len(history) - done_before)
        ran.append({"size": list(scale.work.shape[-1:-3:-1]), "evaluations": len(history) - done_before,
                    "planned": scale.evaluations})
    t_done = time.perf_counter()

    out = best["image"].clamp(0, 1)
    if luminance:
        out = ycbcr_to_rgb(torch.cat([out, rgb_to_ycbcr(c_rgb)[:, 1:]], 1)).clamp(0, 1)
    # 8 bits, rounded (to_pil_image on floats truncates: half a level darker on average); the
    # reported losses below are those of exactly these pixels.
    out8 = out.mul(255).round_().to(torch.uint8)
    out = out8.float().div_(255)
    # The reported losses: fp32, at the output size, on the returned 8-bit image (for luminance
    # its own Y after the chroma went back and the gamut was clipped) and on the start.
    final_scale = scales[-1]
    with torch.no_grad(), _exact_fp32():
        seen_out = _y(out) if luminance else out
        final = dict(zip(TERMS, torch.stack(_with_total(params, *_terms(
            extractor, seen_out, final_scale, params, all_layers, None))).tolist()))
        if params.init == "content":
            first = final_scale.work  # the content itself, not its coarse copy upsampled
        else:
            first = start if len(scales) == 1 else _upsample(start, final_scale.work.shape[-2:])
        initial = dict(zip(TERMS, torch.stack(_with_total(params, *_terms(
            extractor, first.clamp(0, 1), final_scale, params, all_layers, None))).tolist()))
    image = to_pil_image(out8[0].cpu())
    if decoded.alpha is not None:
        image.putalpha(decoded.alpha.resize(image.size, Image.Resampling.LANCZOS))
    metadata = {
        "params": params.model_dump(mode="json"),
        "weights_id": extractor.weights_id,
        "device": str(device),
        "size": list(image.size),
        "evaluations": len(history),
        "precision": precision,
        "memory_format": "channels_last" if extractor.memory_format == torch.channels_last else "contiguous",
        "scales": ran,
        "styles": n_styles,
        "backend": backend,
        "seconds": {
            "targets": round(t_targets, 4),
            "optimize": round(t_done - t_opt, 4),
            "total": round(time.perf_counter() - t_start, 4),
        },
        "versions": _versions(),
    }
    return StyleResult(image, {"initial": initial, "final": final}, history, metadata)


def _with_total(params: StyleParams, c: Tensor, s: Tensor, tv: Tensor) -> list[Tensor]:
    return [c, s, tv, _total(params, c, s, tv)]
