"""stylize() / stylize_many(): the optimization, in named steps — prepare each pair, optimize
each scale (all pairs of one shape in one tensor), finish, measure, describe.

The optimizer sees tensors and a device only: decoding and encoding live in ``imageio``, the
objective in ``objective``, style targets in ``targets``, the scale schedule in ``schedule``,
precision and torch's switches in ``backend``, colour in ``colour``, L-BFGS in ``lbfgs``.

Departures from Gatys et al. (2016), each marked where it happens: coarse to fine
(``schedule``, ``_scale_start``); clamping to [0, 1] before each evaluation and returning the
best evaluated image, not the last (``_optimize_scale``); reduced precision for the VGG pass
(``objective``), with the reported losses always recomputed in exact fp32 at the output size
(``_finish``); returning the start where the 8-bit best is above it (``_finish``); luminance-only
optimization (``_prepare``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .backend import (DTYPES, OUT_OF_MEMORY, precision_section, resolve_precision, run_settings, unless_out_of_memory,
                      uses_tf32)
from .colour import luminance, with_chroma_of
from .errors import DeviceMemoryError, NonFiniteLossError, NSTError
from .imageio import (DecodedImage, check_min_side, fit_longest, quantize, resize_longest, split_alpha, to_image,
                      to_tensor)
from .lbfgs import HISTORY, BatchedLBFGS
from .objective import TERMS, Objective
from .params import STOP_WINDOW, StyleParams
from .schedule import scale_sizes, split_budget
from .tiling import history_for, memory_budget, tiling_for
from .targets import StyleTargets, compute_style_targets, style_tensor, targets_key, targets_need_content
from .vgg import FeatureExtractor, Opener, extractor_for, resolve_device

__all__ = ["StyleProgress", "StyleResult", "StylePair", "stylize", "stylize_many", "presized"]

#: L-BFGS evaluations a pair may spend above its best before it goes back there and forgets its
#: history (``BatchedLBFGS.restart``). Without a line search, under the clamp to [0, 1] (a
#: projection its curvature pairs do not see), it can climb for good: the demo's harbour x waves
#: (192 px, random weights) was best at evaluation 28 and climbed to above its start by the 80th.
#: With 10 it ends at 1.577, 0.86x that best of 1.830, houses x waves at 0.91x its old result, and
#: the six pairs that never climbed for 10 evaluations (so never restart) with the same final losses
#: to 4 digits (examples/ and photos/, 192 px, 80 evaluations, fp32, random weights, 2-core CPU).
#: Tuned on that one run: at 200 evaluations (harbour x waves, 64 px) it restarts every 13-15
#: evaluations past the 110th, and still ends far below where the old code climbed to.
RESTART_AFTER = 10
#: Evaluations between two reads of the losses on a GPU (history, progress, finiteness, stops):
#: each read waits for the device, and at small sizes a VGG pass is shorter than that wait.
#: Elsewhere a read costs nothing and happens every evaluation.
GPU_READ_EVERY = 8
#: With precision="auto" at reduced precision, this share of the output size's evaluations runs
#: in exact fp32 at the end, continuing the same L-BFGS; the image returned is the best by exact
#: loss of the tail's evaluations and the reduced-precision phase's best.
#: Differs from a plain bf16 run because bf16 gradients carry ~0.4% rounding, as large as the
#: loss differences L-BFGS steers by near the end. Four fifths, because on a high-frequency style
#: the bf16 phase settles somewhere the tail cannot fully leave (chelsea × brick, 256 px, 300
#: evaluations, over single-scale fp32: bf16 alone 1.091, a third 1.038, half 1.023, two thirds
#: 1.014), and because after the L-BFGS restart two thirds left houses × mosaic at 512 px at
#: 1.023, four fifths at 1.019 (benchmarks/quality.py, 2026-12-07: README, Performance).
EXACT_TAIL = 0.8


@dataclass(frozen=True)
class StyleProgress:
    """One loss evaluation of one pair, as seen by a progress callback.

    Losses are at the working precision and at the current scale's size (the final fp32 loss at
    the output size is in ``StyleResult.losses``): with several scales the loss jumps between
    them, so show ``where`` beside it.
    """

    iteration: int  # 1-based loss evaluation count of this pair, over all scales
    # evaluations planned over all scales; an early stop (stop_tolerance) or an L-BFGS end lowers
    # it at the event that stops, so the last event has iteration == total
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
    pair: int = 0  # index of the pair in stylize_many's list (0 for stylize)

    @property
    def where(self) -> str:
        """``scale 2/3 (181×136)`` with several scales, "" with one: the loss jumps at each scale
        change, and a reader must not take the rise for divergence."""
        return f"scale {self.scale}/{self.scales} ({self.shape[0]}×{self.shape[1]})" if self.scales > 1 else ""


@dataclass
class StyleResult:
    """The stylized image (RGB, or RGBA when the content had alpha) and what produced it."""

    image: Image.Image
    # {"initial": {content, style, tv, total}, "final": {...}}: both fp32 at the output size,
    # "initial" on the starting image, "final" on the returned image.
    losses: dict[str, dict[str, float]]
    history: list[dict[str, float]] = field(repr=False)  # per evaluation, working precision
    metadata: dict


@dataclass(frozen=True)
class StylePair:
    """One (content, style) pair for stylize_many; ``targets`` and the names as for stylize."""

    content: Image.Image
    style: Image.Image | Sequence[Image.Image]
    targets: StyleTargets | None = None
    content_name: str = "content image"
    style_names: Sequence[str] | None = None


@dataclass
class _Stage:
    """One scale of one pair: the content as optimized and its style Grams."""

    size: int
    work: Tensor  # (1, 3, H, W) RGB or (1, 1, H, W) luminance
    grams: dict[str, Tensor]
    evaluations: int
    exact_tail: int = 0  # the last evaluations run in exact fp32 (EXACT_TAIL)


@dataclass
class _Job:
    """One pair, prepared: everything before the first evaluation, and its record as it runs."""

    decoded: DecodedImage  # the content (alpha kept apart)
    content: Tensor  # (1, 3, H, W) RGB at the output size
    stages: list[_Stage]
    start: Tensor  # the first scale's starting image
    styles: int
    seconds_targets: float
    history: list[dict[str, float]] = field(default_factory=list)
    ran: list[dict] = field(default_factory=list)
    planned: int = 0
    error: NSTError | None = None

    @property
    def shapes(self) -> tuple:
        """What pairs of one optimization step must share: every scale's shape."""
        return tuple(tuple(stage.work.shape) for stage in self.stages)


class _Stop(Exception):
    """Every pair of the step stopped (early stop, uphill direction, failure): end the scale."""


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
    written: Callable[[Image.Image], Image.Image] | None = None,
) -> StyleResult:
    """Gatys style transfer of one content image to one style (or a blend of several).

    Minimizes α·content + β·Σ_l w_l·style_l + γ·tv (``Objective``) over the pixels, clamped to
    [0, 1], over ``scale_sizes(params)`` with ``params.iterations`` loss evaluations in all
    (``split_budget``), and returns the lowest-loss image evaluated at the last scale (or the
    start, where 8-bit rounding leaves that image above it).
    ``targets`` (from ``compute_style_targets``) skips recomputing the style Grams.
    ``content_name`` / ``style_names`` name the inputs in errors (an image too small for the layers).
    ``written``: the image as its file will read back (an encode and decode in a lossy format); the
    reported losses, and the choice of the start over the best evaluation, are then the file's.
    """
    [result] = stylize_many([StylePair(content, style, targets, content_name, style_names)], params,
                            progress=progress, opener=opener, written=written)
    if isinstance(result, Exception):
        raise result
    return result


def stylize_many(
    pairs: Sequence[StylePair | tuple],
    params: StyleParams | None = None,
    *,
    progress: Callable[[StyleProgress], None] | None = None,
    opener: Opener | None = None,
    started: Callable[[list[int]], None] | None = None,
    written: Callable[[Image.Image], Image.Image] | None = None,
) -> list[StyleResult | NSTError]:
    """Several pairs, each the same optimization as its own ``stylize`` call, optimized together.

    Pairs whose scales have the same shapes run as one (B, C, H, W) tensor through one VGG pass
    per evaluation (no padding: it would change the Grams); each keeps its own targets, L-BFGS
    history, step, best image, losses and history. Returns one StyleResult per pair, in order,
    or the pair's own NSTError (a bad input, a non-finite loss, or an NSTError that ``progress``
    raised for it: a stop or time limit of that pair) while the others finish. ``started(indexes)``
    is called as the optimization of those pairs starts, and again each time it starts afresh (a
    step too large for the device runs again in halves, one after the other): a caller's time
    limit per pair counts from there, not through the other half's run. ``written``: as ``stylize``'s.
    """
    params = params or StyleParams()
    device = resolve_device(params.device)
    precision = resolve_precision(params.precision, device, params.image_size)
    pairs = [p if isinstance(p, StylePair) else StylePair(*p) for p in pairs]
    results: list[StyleResult | NSTError | None] = [None] * len(pairs)
    # Everything runs under the run's settings, the targets included: in deterministic mode cuBLAS
    # must see its workspace setting before its first product (the Grams).
    with run_settings(device, precision, params.deterministic) as backend:
        extractor = extractor_for(params, opener=opener)
        jobs: dict[int, _Job] = {}

        def prepare(i: int) -> bool:
            """jobs[i] for pair i, or its error in results[i]: the targets of a style too large for
            the device fail that pair alone (DeviceMemoryError), as its optimization would."""
            jobs.pop(i, None)  # a failed step's job: its tensors must not outlive a failed re-prepare
            try:
                job = unless_out_of_memory(lambda: _prepare(pairs[i], params, extractor, precision), device)
            except NSTError as err:
                results[i] = err
                return False
            if job is OUT_OF_MEMORY:
                results[i] = DeviceMemoryError(pairs[i].content_name, params.image_size, str(device), params.tile_size)
                return False
            jobs[i] = job
            return True

        for i in range(len(pairs)):
            prepare(i)
        groups: dict[tuple, list[int]] = {}
        for i, job in jobs.items():
            groups.setdefault(job.shapes, []).append(i)
        steps = list(groups.values())
        while steps:
            indexes = steps.pop(0)
            if started is not None:
                started(indexes)
            step = unless_out_of_memory(lambda: _run_step(indexes, [jobs[i] for i in indexes], params, precision,
                                                          extractor, backend, progress, written), device)
            if step is not OUT_OF_MEMORY:
                for i, result in zip(indexes, step):
                    results[i] = result
                continue
            if len(indexes) == 1:
                results[indexes[0]] = DeviceMemoryError(pairs[indexes[0]].content_name, params.image_size, str(device), params.tile_size)
                continue
            # A step too large for the device runs again as two halves, each pair from its start
            # (fresh jobs: the failed step advanced their state); only a pair alone fails for memory.
            indexes = [i for i in indexes if prepare(i)]
            half = (len(indexes) + 1) // 2
            steps[:0] = [part for part in (indexes[:half], indexes[half:]) if part]
    return results  # type: ignore[return-value]


def presized(image: DecodedImage, params: StyleParams) -> DecodedImage:
    """``image`` (a content or a style) sized as stylize will size it, where doing so now gives the
    same result bit for bit: with one scale every input is resized to image_size once (Lanczos;
    a content's rgb and alpha apart: ``_prepare``, ``style_tensor``, ``to_image``), and that resize
    of the returned image is then a no-op. A caller that holds inputs a while (a pair waiting for
    its device step) holds a small image, not a 64 MP scan. With several scales each scale is
    resized from the original (and a smaller image is enlarged there): returned as it is."""
    if params.scales != 1 or max(image.rgb.size) <= params.image_size:
        return image
    size = fit_longest(image.rgb.size, params.image_size)
    return DecodedImage(image.rgb.resize(size, Image.Resampling.LANCZOS),
                        None if image.alpha is None else image.alpha.resize(size, Image.Resampling.LANCZOS))


def _alpha_tensor(alpha: Image.Image | None, size: tuple[int, int], device) -> Tensor | None:
    """A content's alpha (mode L) at ``size`` as (1, 1, H, W) in [0, 1], or None."""
    if alpha is None:
        return None
    a = alpha.resize(size, Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(a)).to(device=device, dtype=torch.float32).div_(255)[None, None]


def _prepare(pair: StylePair, params: StyleParams, extractor: FeatureExtractor, precision: str) -> _Job:
    """Decode and size the content, get the style targets, the content at each scale, and the
    starting image."""
    t0 = time.perf_counter()
    device = extractor.device
    style, targets = pair.style, pair.targets
    n_styles = 1 if isinstance(style, Image.Image) else len(style)
    decoded = split_alpha(pair.content)
    need = params.content_min_side()
    content_full = resize_longest(decoded.rgb, params.image_size)
    check_min_side(content_full.size, need, pair.content_name)
    c_rgb = to_tensor(content_full, device)
    c_alpha = _alpha_tensor(decoded.alpha, content_full.size, device)  # preserve_color: the visible pixels' colours
    if targets is None:
        targets = compute_style_targets(style, params, extractor=extractor, content=c_rgb, style_names=pair.style_names,
                                        content_alpha=c_alpha)
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
    stages = [_Stage(size, works[size], targets.by_size[size], n)
              for size, n in zip(sizes, budget) if n > 0]  # n == 0: a budget too small to reach this coarse scale
    if params.precision == "auto" and DTYPES[precision] is not None:
        stages[-1].exact_tail = int(EXACT_TAIL * stages[-1].evaluations)  # floor: 1 evaluation stays bf16
    # init="style" with a blend starts from the first style image (a pixel blend would be a mix
    # no style looks like).
    first_style = style if isinstance(style, Image.Image) else style[0]
    init_style = (style_tensor(first_style, stages[0].size, params, device, c_rgb, (pair.style_names or ["style image"])[0],
                               c_alpha) if params.init == "style" else None)
    start = _init_image(params.init, stages[0].work, init_style, params.seed)
    return _Job(decoded, c_rgb, stages, start, n_styles, time.perf_counter() - t0,
                planned=sum(s.evaluations for s in stages))


def _init_image(kind: str, content: Tensor, style: Tensor | None, seed: int) -> Tensor:
    """The start image, (1, 3, H, W) in [0, 1].

    Differs from Gatys et al., whose main results start from white noise: the default starts from
    the content (which the paper's CVPR version also compares), so a nightly budget of a few
    hundred L-BFGS evaluations ends on a clean image with the content's structure, not on residual
    noise; ``init="noise"`` (seeded by ``seed``) is the paper's start."""
    if kind == "content":
        return content.clone()
    if kind == "noise":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return torch.rand(content.shape, generator=gen).to(content.device)
    return torch.nn.functional.interpolate(style, size=content.shape[-2:], mode="bilinear", align_corners=False)


def _upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    return torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def _run_step(indexes: list[int], jobs: list[_Job], params: StyleParams, precision: str,
              extractor: FeatureExtractor, backend: dict, progress, written=None) -> list[StyleResult | NSTError]:
    """Optimize pairs of one shape together, scale by scale, then finish each."""
    t_opt = time.perf_counter()
    log = _Log(indexes, jobs, progress, t_opt)
    x = torch.cat([job.start for job in jobs])
    for index in range(len(jobs[0].stages)):
        stages = [job.stages[index] for job in jobs]
        work = torch.cat([s.work for s in stages])
        # per pair, as alone: a step's size must not change how its pairs are optimized
        tiling = tiling_for(params, *work.shape[-2:], extractor.device)
        objective = Objective.build(extractor, params, work, [s.grams for s in stages], tiling)
        if index:
            size = stages[0].work.shape[-2:]
            x = _scale_start(objective, x if x.shape[-2:] == size else _upsample(x, size),
                             torch.cat([_own_start(job, index, params) for job in jobs]), precision)
        x = _optimize_scale(objective, x, stages[0].evaluations, params, precision, log, index, stages[0].exact_tail)
        for job, stage in zip(jobs, stages):
            job.ran.append({"size": [stage.work.shape[-1], stage.work.shape[-2]], "precision": precision,
                            "exact_tail": stage.exact_tail, "tiling": tiling and tiling.describe(),
                            "evaluations": log.ran_in_stage.get(id(job), 0), "planned": stage.evaluations})
    seconds = time.perf_counter() - t_opt
    return _finish(jobs, x, objective, params, precision, extractor, backend, seconds, written)


def _own_start(job: _Job, index: int, params: StyleParams) -> Tensor:
    """The image a single-scale run at this scale's size would start from."""
    work = job.stages[index].work
    if params.init == "content":
        return work
    return job.start if job.start.shape[-2:] == work.shape[-2:] else _upsample(job.start, work.shape[-2:])


def _scale_start(objective: Objective, upsampled: Tensor, own: Tensor, precision: str) -> Tensor:
    """Where a finer scale starts, per pair: the coarser result upsampled, unless its own start
    is better.

    Differs from plain coarse to fine (crowsonkb's included), which always continues from the
    upsampled result: when the coarse scales could not express the style (a tiny image, a
    high-frequency texture), the blurred upsampled image can sit far above what this size
    starts from, and a short final scale never recovers (measured: 64 px noise × noise ended
    600× above its start). Two forward passes per scale change, not counted as evaluations.
    """
    with torch.no_grad(), precision_section(uses_tf32(precision)):
        ours = objective(upsampled, DTYPES[precision])[:, 3]
        theirs = objective(own, DTYPES[precision])[:, 3]
    return torch.where((ours <= theirs)[:, None, None, None], upsampled, own.clamp(0, 1))


class _Log:
    """What the host learns of a step's evaluations: each pair's history, progress events,
    failures and stops. On a GPU it reads the device every GPU_READ_EVERY evaluations."""

    def __init__(self, indexes: list[int], jobs: list[_Job], progress, started: float):
        self.indexes, self.jobs, self.progress, self.started = indexes, jobs, progress, started
        self.ran_in_stage: dict[int, int] = {}
        self.pending: list[tuple] = []

    def add(self, terms: Tensor, active: Tensor, loss_ok: Tensor, grad_ok: Tensor, stopped: Tensor) -> None:
        self.pending.append((terms.detach(), active, loss_ok, grad_ok, stopped))

    def flush(self, index: int, objective_shape: tuple, evaluations: int, reduced: bool) -> None:
        """Read the pending evaluations back and account for them pair by pair."""
        if not self.pending:
            return
        stacked = [torch.stack(column).tolist() for column in zip(*self.pending)]  # one read of the device
        self.pending.clear()
        height, width = objective_shape
        for terms, active, loss_ok, grad_ok, stopped in zip(*stacked):
            for b, job in enumerate(self.jobs):
                if not active[b] or job.error is not None:
                    continue
                values = dict(zip(TERMS, terms[b]))
                job.history.append(values)
                ran = self.ran_in_stage[id(job)] = self.ran_in_stage.get(id(job), 0) + 1
                if not loss_ok[b]:
                    job.error = NonFiniteLossError(len(job.history), values)
                    continue
                if not grad_ok[b]:
                    # A finite loss with a non-finite gradient (a reduced-precision backward
                    # overflowing) would send the optimizer to NaN pixels and be reported one
                    # evaluation late, as a loss problem; name it here.
                    job.error = NonFiniteLossError(len(job.history), values, what="gradient", advice=(
                        "use precision=fp32" if reduced else "lower the style/content weights or the learning rate"))
                    continue
                if stopped[b]:
                    job.planned -= evaluations - ran
                if self.progress is not None:
                    try:
                        self.progress(StyleProgress(
                            len(job.history), job.planned, values["content"], values["style"], values["tv"],
                            values["total"], time.perf_counter() - self.started, index + 1, len(job.stages),
                            job.stages[index].size, (width, height), self.indexes[b]))
                    except NSTError as err:  # this pair's stop or time limit: it ends alone
                        job.error = err

    def failed(self, device: torch.device) -> Tensor:
        """(B,) bool: the pairs that have failed (a non-finite loss, their progress callback's stop)."""
        return torch.tensor([job.error is not None for job in self.jobs], device=device)

    def start_stage(self) -> None:
        self.ran_in_stage = {}


def _back_to_best(lbfgs: BatchedLBFGS, x: Tensor, best: Tensor, which: Tensor) -> None:
    """Pairs ``which`` (B,) bool go back to their best: x (B, C, H, W) moved there in place, their
    L-BFGS history forgotten (their next step is a first step, by the gradient there)."""
    x.data.copy_(torch.where(which[:, None, None, None], best, x.data))
    lbfgs.restart(which)


def _optimize_scale(objective: Objective, x0: Tensor, evaluations: int, params: StyleParams, precision: str,
                    log: _Log, index: int, exact_tail: int = 0) -> Tensor:
    """Run one scale's budget from x0 (B, C, H, W). Returns each pair's lowest-loss evaluated image
    (with an ``exact_tail``, the lowest of the exact fp32 evaluations at the end)."""
    dtype = DTYPES[precision]
    read_every = GPU_READ_EVERY if x0.is_cuda else 1
    log.start_stage()
    x = x0.detach().clone().contiguous().requires_grad_(True)
    b = x.shape[0]
    frozen = torch.tensor([job.error is not None for job in log.jobs], device=x.device)
    history = HISTORY if objective.tiling is None else history_for(
        memory_budget(params, x.device), x[0].numel(), HISTORY)
    lbfgs = BatchedLBFGS(x, params.step_size(), history) if params.optimizer == "lbfgs" else None
    adam = torch.optim.Adam([x], lr=params.step_size()) if lbfgs is None else None
    best_total = x.new_full((b,), math.inf)
    best = x.detach().clone()
    since_best = torch.zeros(b, dtype=torch.long, device=x.device)  # evaluations since each pair's best
    before_tail = None
    seen: list[Tensor] = []  # best total after each evaluation at this scale, (B,) each
    shape = tuple(x.shape[-2:])
    for e in range(evaluations):
        if e == evaluations - exact_tail:  # from here on exact fp32, judged by exact losses only
            dtype, precision = None, "fp32"
            # The reduced-precision best, measured exactly (one forward pass, not counted as an
            # evaluation): the tail must beat it to replace it. Reset to inf instead, a tail that
            # went astray returned an image worse than the bf16 phase had (harbour × waves,
            # 256 px, 300 evaluations: 2.04x the fp32 run's loss).
            with torch.no_grad(), precision_section(False):
                best_total = torch.where(best_total.isfinite(), objective(best)[:, 3], best_total)
            # Tiled, the tail's own values carry the halo's approximation (±0.05% between grid
            # offsets in a one-off check at 96 px): its best is measured exactly again at the end.
            before_tail = (best.clone(), best_total.clone()) if objective.tiling is not None else None
            # The early stop judges exact values only: the reduced-precision phase levels off at its
            # own rounding floor, which is why the tail exists (judged there, a stop skipped the tail
            # and returned the best by bf16 values, worse than the start in the engine review).
            seen = []
        # Differs from Gatys et al. (unconstrained pixels) because an image outside [0, 1] is not
        # one we can return, and VGG was trained on in-range inputs; the clamp is a projection
        # before each evaluation, so the loss reported is that of a valid image.
        with torch.no_grad():
            x.clamp_(0, 1)
        x.grad = None
        with precision_section(uses_tf32(precision)):
            terms = objective.value_and_grad(x, dtype, e)
        with torch.no_grad():
            active = ~frozen
            loss_ok = torch.isfinite(terms).all(1)
            grad_ok = torch.isfinite(x.grad.flatten(1)).all(1)
            # Differs from Gatys et al. (the last iterate) because Adam and L-BFGS without a line
            # search can end on a worse step: each pair keeps its lowest-loss evaluated image
            # (tiled, lowest by the evaluation's own halo-approximate values).
            better = active & loss_ok & grad_ok & (terms[:, 3] < best_total)
            best_total = torch.where(better, terms[:, 3], best_total)
            best = torch.where(better[:, None, None, None], x.detach(), best)
            since_best = torch.where(better, 0, since_best + 1)
            seen.append(best_total)
            stopped = torch.zeros_like(active)
            in_tail = exact_tail == 0 or e >= evaluations - exact_tail
            if params.stop_tolerance is not None and in_tail and len(seen) > STOP_WINDOW:
                before = seen[-STOP_WINDOW - 1]
                stopped = active & (before - best_total < params.stop_tolerance * before.abs())
            frozen = frozen | ~loss_ok | ~grad_ok | stopped
            last = e == evaluations - 1
            read = last or (e + 1) % read_every == 0
            # The step before this evaluation's events: a pair whose L-BFGS ends here closes its
            # progress count with this event (total = iteration), as an early stop does.
            ended = torch.zeros_like(active)
            if not last and lbfgs is not None:
                grad = torch.where((loss_ok & grad_ok)[:, None, None, None], x.grad, 0.0)
                # Differs from torch's LBFGS as Gatys et al. used it (which goes on from its last
                # iterate) because without a line search, and under the clamp above, it can climb
                # for good (RESTART_AFTER): a pair above its best for that long goes back to its
                # best, forgets its history and holds still for one evaluation, whose gradient (at
                # this precision) starts it afresh. Checked where the losses are read anyway (on
                # CUDA every GPU_READ_EVERY evaluations, so after 10 to 17 there).
                held = frozen
                if read:
                    climbing = ~frozen & (since_best >= RESTART_AFTER) & (terms[:, 3] > best_total)
                    if bool(climbing.any()):
                        _back_to_best(lbfgs, x, best, climbing)
                        since_best = torch.where(climbing, 0, since_best)
                        held = frozen | climbing
                # exact fp32 whatever the VGG pass uses: the step's batched products (curvature
                # s·y, the direction) would otherwise run in the TF32 mode the last section left
                with precision_section(False):
                    lbfgs.step(x.data, grad, held)
                ended = frozen.logical_not() & ~lbfgs.descending  # torch's LBFGS would end the scale here
                frozen = frozen | ended
            elif not last:
                kept = x.detach().clone()
                adam.step()
                x.data = torch.where(frozen[:, None, None, None], kept, x.data)
            log.add(terms, active, loss_ok, grad_ok, stopped | ended)
            if read:
                log.flush(index, shape, evaluations, dtype is not None)
                frozen = frozen | log.failed(x.device)
                if bool(frozen.all()):  # (one more pass saved once every pair's L-BFGS has ended)
                    break
            if last:
                break
    log.flush(index, shape, evaluations, dtype is not None)
    if before_tail is not None:
        with torch.no_grad(), precision_section(False):
            exact = objective(best)[:, 3]  # the exact halo
        best = torch.where((before_tail[1] < exact)[:, None, None, None], before_tail[0], best)
    return best.clamp(0, 1)


def _finish(jobs: list[_Job], x: Tensor, objective: Objective, params: StyleParams, precision: str,
            extractor: FeatureExtractor, backend: dict, seconds: float,
            written: Callable[[Image.Image], Image.Image] | None = None) -> list[StyleResult | NSTError]:
    """8-bit images, their exact fp32 losses, and each pair's record.

    The reported losses: fp32 at the output size, on the returned 8-bit image as its file reads
    back (``written``; else the 8-bit image itself) (for luminance its own Y after the chroma went
    back into the gamut) and on the start (with ``written``, the start as its file would read back).
    """
    content = torch.cat([job.content for job in jobs])

    def delivered(image: Tensor) -> tuple[Tensor, Tensor]:
        """(the 8-bit image written, what the objective sees of its file) of an optimized (B, C, H, W) image."""
        out8 = quantize(with_chroma_of(image, content) if image.shape[1] == 1 else image)
        seen = out8.float().div_(255)
        if written is not None:  # a lossy format's file is not the 8-bit image: JPEG q92 moved a loss by 30%
            seen = torch.cat([to_tensor(written(to_image(out8[b:b + 1], job.decoded.alpha)).convert("RGB"), seen.device)
                              for b, job in enumerate(jobs)])
        return out8, luminance(seen) if image.shape[1] == 1 else seen

    out8, seen = delivered(x)
    final_size = jobs[0].stages[-1].work.shape[-2:]
    firsts = torch.cat([_own_start(job, len(job.stages) - 1, params) if params.init == "content"
                        else (job.start if len(job.stages) == 1 else _upsample(job.start, final_size)) for job in jobs])
    finals = objective.measure(seen)
    starts = None  # the start as it would be written
    if written is not None:
        # the start's losses as its file's too: measured before encoding, a JPEG sidecar that
        # returned its start read "initial 0.0072, final 1.76", as if the image had got worse
        start8, start_seen = delivered(firsts.clamp(0, 1))
        initials = starts = objective.measure(start_seen)
    else:
        initials = objective.measure(firsts.clamp(0, 1))
    returned = ["best evaluation"] * len(jobs)
    if params.init == "content" and any(f["total"] > i["total"] for f, i in zip(finals, initials)):
        # Differs from Gatys et al. (the optimized image) because the best float image can lose
        # its small gain to 8-bit rounding and end above the content it started from (light
        # stylization, a short budget: 0.050763 against 0.050663 in the engine review): the start,
        # rounded alike, is returned where it is lower.
        if starts is None:
            start8, start_seen = delivered(firsts.clamp(0, 1))
            starts = objective.measure(start_seen)
        for b, start in enumerate(starts):
            if start["total"] < finals[b]["total"]:
                out8[b], finals[b], returned[b] = start8[b], start, "start"
    results: list[StyleResult | NSTError] = []
    for b, job in enumerate(jobs):
        if job.error is not None:
            results.append(job.error)
            continue
        image = to_image(out8[b:b + 1], job.decoded.alpha)
        metadata = {
            "params": params.model_dump(mode="json"),
            "weights_id": extractor.weights_id,
            "device": str(extractor.device),
            "size": list(image.size),
            "evaluations": len(job.history),
            # "start": the content it started from, rounded to 8 bits, beat every evaluation's
            # image once rounded alike (its final losses are then the start's)
            "returned": returned[b],
            "precision": precision,
            "memory_format": "channels_last" if extractor.memory_format == torch.channels_last else "contiguous",
            "scales": job.ran,
            "styles": job.styles,
            "pairs_per_step": len(jobs),
            "backend": backend,
            # optimize: this pair's share of the step (pairs_per_step pairs ran in it together),
            # so summing a run's pairs gives its device time; step: the whole step, how long the
            # pair waited for it.
            "seconds": {"targets": round(job.seconds_targets, 4), "optimize": round(seconds / len(jobs), 4),
                        "total": round(job.seconds_targets + seconds / len(jobs), 4), "step": round(seconds, 4)},
            "versions": _versions(),
        }
        results.append(StyleResult(image, {"initial": initials[b], "final": finals[b]}, job.history, metadata))
    return results


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("prefect-nst", "torch", "torchvision", "pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out
