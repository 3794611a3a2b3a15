"""stylize(): the optimization, in named steps — prepare, optimize each scale, finish, measure,
describe.

The optimizer sees tensors and a device only: decoding and encoding live in ``imageio``, the
objective in ``objective``, style targets in ``targets``, the scale schedule in ``schedule``,
precision and torch's switches in ``backend``, colour in ``colour``.

Departures from Gatys et al. (2016), each marked where it happens: coarse to fine
(``schedule``); clamping to [0, 1] before each evaluation and returning the best evaluated image,
not the last (``_optimize_scale``); reduced precision for the VGG pass (``objective``), with the
reported losses always recomputed in exact fp32 at the output size (``_measure``); luminance-only
optimization (``_prepare``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import Tensor

from .backend import DTYPES, precision_section, resolve_precision, run_settings, uses_tf32
from .colour import luminance, with_chroma_of
from .errors import NonFiniteLossError, NSTError
from .imageio import DecodedImage, check_min_side, quantize, resize_longest, split_alpha, to_image, to_tensor
from .objective import TERMS, Objective
from .params import STOP_WINDOW, StyleParams
from .schedule import scale_sizes, split_budget
from .targets import StyleTargets, compute_style_targets, style_tensor, targets_key, targets_need_content
from .vgg import FeatureExtractor, Opener, extractor_for, min_side, resolve_device

__all__ = ["StyleProgress", "StyleResult", "stylize"]


@dataclass(frozen=True)
class StyleProgress:
    """One loss evaluation, as seen by a progress callback.

    Losses are at the working precision and at the current scale's size (the final fp32 loss at
    the output size is in ``StyleResult.losses``): with several scales the loss jumps between
    them, so show ``scale``/``scales`` and ``size`` beside it.
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
    shape: tuple[int, int] = (0, 0)  # (width, height) of the current scale, px


@dataclass
class StyleResult:
    """The stylized image (RGB, or RGBA when the content had alpha) and what produced it."""

    image: Image.Image
    # {"initial": {content, style, tv, total}, "final": {...}}: both fp32 at the output size,
    # "initial" on the starting image, "final" on the returned image.
    losses: dict[str, dict[str, float]]
    history: list[dict[str, float]] = field(repr=False)  # per evaluation, working precision
    metadata: dict


@dataclass
class _Stage:
    """One scale: what it optimizes against and how many evaluations it gets."""

    size: int
    objective: Objective
    work: Tensor  # the content as optimized: (1, 3, H, W) RGB or (1, 1, H, W) luminance
    evaluations: int


@dataclass
class _Job:
    """Everything prepared before the first evaluation."""

    extractor: FeatureExtractor
    decoded: DecodedImage  # the content (alpha kept apart)
    content: Tensor  # (1, 3, H, W) RGB at the output size
    stages: list[_Stage]
    start: Tensor  # the first scale's starting image
    styles: int


class _Stop(Exception):
    """Raised inside the closure to end a scale early (stop_tolerance)."""


class _Events:
    """Per-evaluation bookkeeping over all scales: history, the planned total, progress events."""

    def __init__(self, planned: int, progress: Callable[[StyleProgress], None] | None, scales: int):
        self.history: list[dict[str, float]] = []
        self.planned = planned  # an early stop lowers it, so the last event has iteration == total
        self.progress, self.scales = progress, scales
        self.started = time.perf_counter()

    def record(self, values: dict[str, float]) -> int:
        """Keep one evaluation's values; returns its 1-based number over all scales."""
        self.history.append(values)
        return len(self.history)

    def emit(self, values: dict[str, float], index: int, stage: _Stage) -> None:
        if self.progress is not None:
            height, width = stage.work.shape[-2:]
            self.progress(StyleProgress(len(self.history), self.planned, values["content"], values["style"],
                                        values["tv"], values["total"], time.perf_counter() - self.started,
                                        index + 1, self.scales, stage.size, (width, height)))


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

    Minimizes α·content + β·Σ_l w_l·style_l + γ·tv (``Objective``) over the pixels, clamped to
    [0, 1], coarse to fine over ``scale_sizes(params)`` with ``params.iterations`` loss
    evaluations in all (``split_budget``), and returns the lowest-loss image evaluated at the
    last scale. ``targets`` (from ``compute_style_targets``) skips recomputing the style Grams.
    ``content_name`` / ``style_names`` name the inputs in errors (an image too small for the layers).
    """
    params = params or StyleParams()
    device = resolve_device(params.device)
    precision = resolve_precision(params.precision, device)
    # Everything runs under the run's settings, the targets included: in deterministic mode cuBLAS
    # must see its workspace setting before its first product (the Grams).
    with run_settings(device, precision, params.deterministic) as backend:
        t_start = time.perf_counter()
        job = _prepare(content, style, params, targets, opener, content_name, style_names)
        t_targets = time.perf_counter() - t_start
        events = _Events(sum(s.evaluations for s in job.stages), progress, len(job.stages))
        x, ran = job.start, []
        for index, stage in enumerate(job.stages):
            if index:
                x = _upsample(x, stage.work.shape[-2:])
            x, evaluations = _optimize_scale(stage, x, params, precision, events, index)
            ran.append({"size": [stage.work.shape[-1], stage.work.shape[-2]], "evaluations": evaluations,
                        "planned": stage.evaluations})
        t_optimized = time.perf_counter()
        out8 = quantize(with_chroma_of(x, job.content) if x.shape[1] == 1 else x)
        losses = _measure(job, out8, params)
        image = to_image(out8, job.decoded.alpha)
        seconds = {"targets": round(t_targets, 4), "optimize": round(t_optimized - events.started, 4),
                   "total": round(time.perf_counter() - t_start, 4)}
        metadata = _metadata(job, params, precision, backend, image, events, ran, seconds)
    return StyleResult(image, losses, events.history, metadata)


def _prepare(content: Image.Image, style: Image.Image | Sequence[Image.Image], params: StyleParams,
             targets: StyleTargets | None, opener: Opener | None, content_name: str,
             style_names: Sequence[str] | None) -> _Job:
    """Decode and size the content, get the style targets, build one objective per scale, and
    the starting image."""
    extractor = extractor_for(params, opener=opener)
    device = extractor.device
    n_styles = 1 if isinstance(style, Image.Image) else len(style)
    decoded = split_alpha(content)
    need = min_side([*params.content_layers, *params.style_layers])
    content_full = resize_longest(decoded.rgb, params.image_size)
    check_min_side(content_full, need, content_name)
    c_rgb = to_tensor(content_full, device)
    if targets is None:
        targets = compute_style_targets(style, params, extractor=extractor, content=c_rgb, style_names=style_names)
    elif targets_need_content(params):
        raise NSTError(f"targets cannot be reused with preserve_color={params.preserve_color!r} "
                       "(they depend on the content)")
    elif targets.key != targets_key(params, extractor, n_styles):
        raise NSTError("style targets were computed with other params (weights, layers, size, scales, colour or blend)")

    sizes = scale_sizes(params)
    works = {size: c_rgb if size == params.image_size else to_tensor(resize_longest(decoded.rgb, size), device)
             for size in sizes}
    if params.preserve_color == "luminance":
        # Differs from optimizing RGB: one luminance channel is optimized (VGG sees it as grey)
        # and the content's chroma is put back at the end (Gatys et al. 2016, "Preserving color").
        works = {size: luminance(w) for size, w in works.items()}
    # A coarse scale at which the content would be thinner than the layers need is left out.
    sizes = [size for size in sizes if size == sizes[-1] or min(works[size].shape[-2:]) >= need]
    budget = split_budget(params.iterations, [works[s].shape[-1] * works[s].shape[-2] for s in sizes])
    stages = [_Stage(size, Objective.build(extractor, params, works[size], targets.by_size[size]), works[size], n)
              for size, n in zip(sizes, budget) if n > 0]  # n == 0: a budget too small to reach this coarse scale
    # init="style" with a blend starts from the first style image (a pixel blend would be a mix
    # no style looks like).
    first_style = style if isinstance(style, Image.Image) else style[0]
    init_style = (style_tensor(first_style, stages[0].size, params, device, c_rgb, (style_names or ["style image"])[0])
                  if params.init == "style" else None)
    start = _init_image(params.init, stages[0].work, init_style, params.seed)
    return _Job(extractor, decoded, c_rgb, stages, start, n_styles)


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


def _optimize_scale(stage: _Stage, x0: Tensor, params: StyleParams, precision: str, events: _Events,
                    index: int) -> tuple[Tensor, int]:
    """Run one scale's budget from x0. Returns (its lowest-loss evaluated image, evaluations run)."""
    dtype = DTYPES[precision]
    x = x0.detach().clone().contiguous().requires_grad_(True)
    optimizer = _make_optimizer(params, x, stage.evaluations)
    best = {"total": math.inf, "image": x.detach().clone()}
    seen: list[float] = []  # best total after each evaluation at this scale
    done_before = len(events.history)

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        # Differs from Gatys et al. (unconstrained pixels) because an image outside [0, 1] is not
        # one we can return, and VGG was trained on in-range inputs; the clamp is a projection
        # before each evaluation, so the loss reported is that of a valid image.
        with torch.no_grad():
            x.clamp_(0, 1)
        with precision_section(uses_tf32(precision)):
            terms = stage.objective(x, dtype)
            terms[3].backward()
        values = dict(zip(TERMS, terms.detach().tolist()))
        evaluation = events.record(values)
        if not all(map(math.isfinite, values.values())):
            raise NonFiniteLossError(evaluation, values)
        # A finite loss with a non-finite gradient (a reduced-precision backward overflowing)
        # would send the optimizer to NaN pixels and be reported one evaluation late, as a loss
        # problem; name it here.
        if not bool(torch.isfinite(x.grad).all()):
            raise NonFiniteLossError(evaluation, values, what="gradient", advice=(
                "use precision=fp32" if dtype is not None else "lower the style/content weights or the learning rate"))
        # Differs from Gatys et al. (the last iterate) because Adam and L-BFGS without a line
        # search can end on a worse step: each scale keeps its lowest-loss evaluated image.
        if values["total"] < best["total"]:
            best["total"], best["image"] = values["total"], x.detach().clone()
        seen.append(best["total"])
        stop = (params.stop_tolerance is not None and len(seen) > STOP_WINDOW
                and seen[-STOP_WINDOW - 1] - seen[-1] < params.stop_tolerance * abs(seen[-STOP_WINDOW - 1]))
        if stop:
            events.planned -= stage.evaluations - len(seen)
        events.emit(values, index, stage)
        if stop:
            raise _Stop
        return terms[3]

    try:
        if params.optimizer == "lbfgs":
            optimizer.step(closure)
        else:
            for _ in range(stage.evaluations):
                optimizer.step(closure)
    except _Stop:
        pass
    else:  # L-BFGS ended the scale sooner (a zero gradient): later events count without the rest
        events.planned -= stage.evaluations - (len(events.history) - done_before)
    return best["image"].clamp(0, 1), len(events.history) - done_before


def _measure(job: _Job, out8: Tensor, params: StyleParams) -> dict[str, dict[str, float]]:
    """The reported losses: exact fp32 at the output size, on the returned 8-bit image (for
    luminance its own Y after the chroma went back and the gamut was clipped) and on the start."""
    final = job.stages[-1]
    out = out8.float().div_(255)
    if final.work.shape[1] == 1:
        out = luminance(out)
    if params.init == "content":
        first = final.work  # the content itself, not its coarse copy upsampled
    else:
        first = job.start if len(job.stages) == 1 else _upsample(job.start, final.work.shape[-2:])
    return {"initial": final.objective.measure(first.clamp(0, 1)), "final": final.objective.measure(out)}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("prefect-nst", "torch", "torchvision", "pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _metadata(job: _Job, params: StyleParams, precision: str, backend: dict, image: Image.Image,
              events: _Events, ran: list[dict], seconds: dict) -> dict:
    """What produced the result, JSON-able (the sidecar's engine part)."""
    return {
        "params": params.model_dump(mode="json"),
        "weights_id": job.extractor.weights_id,
        "device": str(job.extractor.device),
        "size": list(image.size),
        "evaluations": len(events.history),
        "precision": precision,
        "memory_format": "channels_last" if job.extractor.memory_format == torch.channels_last else "contiguous",
        "scales": ran,
        "styles": job.styles,
        "backend": backend,
        "seconds": seconds,
        "versions": _versions(),
    }
