"""The one Prefect task of a pair: fetch (retried IO) -> stylize (in a device step, never retried) -> write.

One task run per pair, named after the pair's output. Fetches and writes are plain calls with
the storage layer's one retry budget (``storage.retrying``) and the run's ``StorageHealth``; many
pair tasks run at once, so the IO of some pairs overlaps the compute of others. The compute is a
device step (``tasks.steps``): the pair waits for a device with the others of its output shape
and is optimized together with up to ``RunOptions.pairs_per_step`` - 1 of them (one
``stylize_many``), one step per device at a time; its result or error comes back to its own
task, which writes it or fails with it alone. A pair stops at its next loss evaluation when the
run is interrupted, its storage is declared unreachable or it passes ``pair_timeout_s``; the
other pairs of its step then stop with it, each with its own reason.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timezone

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled, Failed, State

from nst_core.errors import NSTError, WeightsError
from nst_core.imageio import MAX_INPUT_BYTES
from nst_core.params import StyleParams

from .claims import Claims
from .compute import decode_slot, io_slot, run_on_device, targets_cache
from .contract import PairPlan, ReportItem, done_in, done_item, image_record, sidecar, skipped_item
from .credentials import DEFAULT_CHAIN, StorageCredentials
from .lru import LRU
from .steps import StepRequest, device_steps
from .storage import StorageHealth, WriteRefusedError, open_storage, read_object, retrying, weights_reader

__all__ = ["PairContext", "PairDone", "PairTimeoutError", "PairStopped", "InputChangedError", "ObjectCache", "process_pair",
           "stop_requested", "THUMB"]

THUMB = 96  # contact-sheet cell, px
#: Decoded styles a run keeps (bytes of pixels, 4 a pixel): 96 square styles at 512 px; a
#: full-size style (several scales) over it is decoded by each pair, as before.
STYLE_CACHE_BYTES = 96 * 2**20

#: Set (by the CLI on Ctrl-C) to stop every pair at its next loss evaluation or IO call.
stop_requested = threading.Event()


class PairTimeoutError(NSTError):
    """A pair ran past RunOptions.pair_timeout_s."""


class InputChangedError(NSTError):
    """An input's bytes are not the ones the pair was planned (and keyed) with."""


class PairStopped(NSTError):
    """The run was interrupted before this pair finished (nothing of it was written)."""


class ObjectCache:
    """Input objects by (URI, identity), made once per run even when many pairs ask at the same
    time: their bytes (``weigh=len``), or what they decode to; least recently used entries are
    dropped above ``max_bytes`` of ``weigh``."""

    def __init__(self, max_bytes: int = 256 * 2**20, weigh: Callable[[object], int] = len):
        self.max_bytes = max_bytes
        self._items: LRU = LRU(max_bytes, weigh=weigh)
        self._loading: dict[tuple[str, str], Future] = {}
        self._lock = threading.Lock()
        self.fetches = 0  # values made: downloads, decodes (tests and logs read it)

    def get(self, uri: str, identity: str, fetch: Callable[[str], object]):
        key = (uri, identity)
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                return data
            pending = self._loading.get(key)
            mine = pending is None
            if mine:
                pending = self._loading[key] = Future()
        if not mine:
            return pending.result()
        try:
            data = fetch(uri)
            self.fetches += 1
        except BaseException as err:
            with self._lock:
                del self._loading[key]
            pending.set_exception(err)
            raise
        with self._lock:
            del self._loading[key]
            self._items.put(key, data)
        pending.set_result(data)
        return data

    def drop(self, uri: str, identity: str) -> None:
        """Forget one entry (its bytes are kept in another form elsewhere)."""
        self._items.pop((uri, identity))


def _pixel_bytes(img) -> int:
    """Bytes of a decoded RGB image's pixels: Pillow holds 4 a pixel."""
    return img.width * img.height * 4


class PairContext:
    """What every pair of a run shares, the run's resolved storage credentials included (every
    read and write of its pairs signs with them), and its StorageHealth (every attempt reports
    there). A plain class on purpose: Prefect does not walk it looking for futures, and it never
    leaves the process."""

    def __init__(self, output, params: StyleParams, devices: list[str], weights_id: str,
                 labels: dict[str, str] | None = None, io_workers: int = 8, pair_timeout_s: float | None = None,
                 flow_run: dict | None = None, cache: ObjectCache | None = None,
                 credentials: StorageCredentials = DEFAULT_CHAIN, health: StorageHealth | None = None,
                 pairs_per_step: int | str = 1, recheck_done: bool = False):
        self.output = output  # OutputSpec
        self.credentials = credentials
        self.health = health or StorageHealth()
        self.storage = open_storage(output.uri, credentials)
        self.params = params
        self.devices = devices
        self.weights_id = weights_id
        self.labels = labels or {}
        self.io_workers = io_workers
        self.pair_timeout_s = pair_timeout_s
        self.flow_run = flow_run or {}
        self.cache = cache or ObjectCache()
        # decoded styles, shared by the pairs of a style (a 64 MP scan decodes in ~1 s); at the output
        # size with one scale (nst_core.presized)
        self.styles = ObjectCache(STYLE_CACHE_BYTES, weigh=_pixel_bytes)
        # RunOptions.pairs_per_step; a context built without a run (tests) steps one pair at a time
        self.pairs_per_step = pairs_per_step
        self.steps = device_steps(devices)
        # RunOptions.skip_existing: each pair is judged by the done rule again as it starts (below),
        # and taken by a claim no other run on this output can hold at the same time (tasks.claims)
        self.recheck_done = recheck_done
        self.claims = Claims(self.storage, self.flow_run, self.health) if recheck_done else None

    def announce(self, pair: PairPlan) -> None:
        """``pair`` was submitted: a device step of this run may wait for it to arrive (tasks.steps)."""
        self.steps.announce(self, pair.index)

    def settle(self, pair: PairPlan) -> None:
        """``pair`` reached its step or ended without one: no step waits for it any more."""
        self.steps.settle(self, pair.index)

    def opener(self, uri: str) -> bytes:
        """Bytes of a URI the engine asks for (weights), read with the run's credentials."""
        return weights_reader(self.credentials, self.health, stop_requested.is_set)(uri)


@dataclass
class PairDone:
    """A finished pair: its report item and contact-sheet thumbnails (JPEG bytes; None for a pair
    another run made)."""

    item: ReportItem
    thumbs: tuple[bytes, bytes, bytes] | None = field(repr=False)


def _thumb(img) -> bytes:
    small = img.convert("RGB")
    small.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _check_stop(pair: PairPlan, ctx: PairContext) -> None:
    if stop_requested.is_set():
        raise PairStopped(f"{pair.name}: run interrupted before the pair finished")
    ctx.health.check()  # its result could not be written: stop computing it


def _fetch(ctx: PairContext, uri: str, identity: str) -> bytes:
    def once() -> bytes:
        with io_slot(ctx.io_workers):
            data, read = read_object(uri, ctx.credentials, MAX_INPUT_BYTES)
        if read != identity:  # its key was computed from other bytes: never write them under it
            raise InputChangedError(f"{uri} changed during the run (planned as {identity}, read as {read})")
        return data

    return ctx.cache.get(uri, identity, lambda _: retrying(once, should_stop=stop_requested.is_set, health=ctx.health))


@dataclass(eq=False)
class _PairInputs:
    """A pair as its device step sees it: decoded inputs, and its checks between evaluations."""

    pair: PairPlan
    ctx: PairContext
    content: object  # PIL image, alpha kept
    style: object  # PIL image, RGB
    logger: object  # its task run's logger: the step may run in another pair's task
    deadline: float = 0.0  # pair_timeout_s from its optimization's (re)start: its own device time counts, not the wait
    best: tuple[int, int, float] = (0, 0, float("inf"))  # (scale, evaluation, loss) of the best so far at that scale

    def check(self, ev=None) -> None:
        """Raise when the pair must stop: Ctrl-C, a storage outage, or past pair_timeout_s."""
        _check_stop(self.pair, self.ctx)
        if self.ctx.pair_timeout_s is not None and self.deadline and time.monotonic() > self.deadline:
            at = f" at evaluation {ev.iteration} of {ev.total}" if ev is not None else ""
            raise PairTimeoutError(f"{self.pair.name}: over pair_timeout_s={self.ctx.pair_timeout_s:g} s{at}")

    def progress(self, ev) -> None:
        self.check(ev)
        # a new scale, or a step run again from its start (after running out of device memory), starts afresh
        if ev.scale != self.best[0] or ev.iteration <= self.best[1] or ev.loss < self.best[2]:
            self.best = (ev.scale, ev.iteration, ev.loss)
        step = max(1, self.ctx.params.iterations // 4)
        if ev.iteration % step == 0 or ev.iteration == ev.total:
            where = ev.where  # the loss jumps where a finer scale starts: say which
            # the best beside the current: L-BFGS without a line search may step uphill, and the
            # pair's image is its best evaluation, not its last
            self.logger.info("%s: evaluation %d/%d%s, loss %.4g (best %.4g)", self.pair.name, ev.iteration,
                             ev.total, f" ({where})" if where else "", ev.loss, self.best[2])

    def stopped_with_step(self, err: Exception) -> Exception:
        """This pair's own reason when another pair's stop or time limit ended their step."""
        try:
            self.check()
        except NSTError as own:
            return own
        return err if not isinstance(err, (PairStopped, PairTimeoutError)) else NSTError(
            f"{self.pair.name}: its device step ended early ({err})")


def _stylize_step(ctx: PairContext, device: str, requests: list[StepRequest]) -> list:
    """One device step: the requests' pairs through one ``stylize_many`` on ``device``. Returns one
    StyleResult or exception per request; a pair's bad style fails it alone, before the step."""
    from nst_core import (DeviceMemoryError, StylePair, compute_style_targets, extractor_for, stylize_many, targets_key,
                          targets_need_content)
    from nst_core.backend import OUT_OF_MEMORY, unless_out_of_memory
    from nst_core.imageio import read_back

    inputs: list[_PairInputs] = [r.payload for r in requests]  # type: ignore[misc]
    p = ctx.params.model_copy(update={"device": device})

    def on_device() -> list:
        extractor = extractor_for(p, opener=ctx.opener)
        if extractor.weights_id != ctx.weights_id:  # a worker whose weights differ from what the run planned with
            raise WeightsError(f"weights here are {extractor.weights_id}, but the run planned with {ctx.weights_id}")
        outcomes: list = [None] * len(inputs)
        live: list[int] = []
        pairs = []
        for i, x in enumerate(inputs):
            targets = None
            try:
                if not targets_need_content(p):  # histogram / luminance targets depend on each content
                    key = (x.pair.style, x.pair.style_identity, device, targets_key(p, extractor, 1))
                    targets = unless_out_of_memory(lambda x=x, key=key: targets_cache.get_or_compute(
                        key, lambda: compute_style_targets(x.style, p, extractor=extractor, style_names=[x.pair.style])),
                        extractor.device)
            except NSTError as err:
                outcomes[i] = err
                continue
            if targets is OUT_OF_MEMORY:  # a style too large for the device fails its pair alone, named
                outcomes[i] = DeviceMemoryError(f"style {x.pair.style}", p.image_size, device, p.tile_size)
                continue
            live.append(i)
            pairs.append(StylePair(x.content, x.style, targets, x.pair.content, [x.pair.style]))
        if not pairs:
            return outcomes
        # A pair's stop or time limit, raised by its progress check, ends that pair alone (the
        # engine fails it and the others run on, a pair already finished keeps its result).
        def clock_starts(indexes: list[int]) -> None:
            # as the pairs' optimization starts, weights loaded (a fresh worker's first load, VGG16's
            # 528 MB from S3 and a CUDA context, is no pair's time), and again when a step too large
            # for the device runs again in halves: the second half's pairs waited through the
            # failed step and the first half's run, time none of theirs
            for i in indexes:
                inputs[live[i]].deadline = time.monotonic() + (ctx.pair_timeout_s or 0)

        try:
            results = stylize_many(pairs, p, progress=lambda ev: inputs[live[ev.pair]].progress(ev),
                                   opener=ctx.opener, started=clock_starts,
                                   written=read_back(ctx.output.format, ctx.output.quality))  # its losses are the file's
        except NSTError as err:  # the step as a whole (the weights): each pair with its own reason if it has one
            results = [inputs[i].stopped_with_step(err) for i in live]
        for i, result in zip(live, results):
            outcomes[i] = result
        return outcomes

    return run_on_device(device, on_device)


@task(name="pair", task_run_name="{pair.name}", cache_policy=NO_CACHE, persist_result=False)
def process_pair(pair: PairPlan, ctx: PairContext) -> PairDone | State:
    """Fetch both inputs, stylize in a device step (``tasks.steps``: with up to
    ``pairs_per_step`` - 1 other pairs of the same output shape), write the image then the
    sidecar; never retried as a whole. A pair stopped on request (Ctrl-C, SIGTERM, the UI's Cancel)
    ends Cancelled with its reason; one that fails for a reason of ours (an NSTError: a bad or
    changed input, its time limit, storage) ends Failed with its one line, which names the input.
    Neither is a traceback: the task runner logs one per raising task, ~20 lines a pair in the
    nightly log for one bad style. Anything else (a bug) still raises, with its traceback. With
    claims (skip_existing) the run holds the pair's claim when this starts; it lets go at the end."""
    try:
        return _process(pair, ctx)
    except PairStopped as err:
        return Cancelled(message=str(err))
    except NSTError as err:
        return Failed(message=str(err) or type(err).__name__)
    finally:
        if ctx.claims is not None:
            ctx.claims.release(pair)
        ctx.settle(pair)  # a step waiting for it waits no more


#: The note of a pair another run on this output made after this run planned.
MADE_BY_ANOTHER = "made by another run on this output after this run planned"


def _made_meanwhile(pair: PairPlan, ctx: PairContext) -> bool:
    """The done rule for one pair, its reads within the run's io_workers like every other read."""
    with io_slot(ctx.io_workers):
        return bool(done_in(ctx.storage, [pair], list_once=False, io_workers=1, health=ctx.health))


def _decode_style(ctx: PairContext, uri: str, identity: str):
    """A style decoded and sized for ctx.styles; its file bytes leave the download cache once the
    decoded copy is kept (a 190 MB scan would crowd out the contents a cross run reads again)."""
    from nst_core import presized
    from nst_core.imageio import decode_image

    data = _fetch(ctx, uri, identity)
    with decode_slot():
        image = presized(decode_image(data, uri), ctx.params).rgb
    if _pixel_bytes(image) <= ctx.styles.max_bytes:
        ctx.cache.drop(uri, identity)
    return image


def _process(pair: PairPlan, ctx: PairContext) -> PairDone:
    from nst_core import presized
    from nst_core.imageio import decode_image, encode_image, fit_longest

    out = ctx.storage
    _check_stop(pair, ctx)
    # Another run on this output (a nightly running late, a manual rerun) may have made the pair since
    # this run planned: two reads (image, sidecar) against an optimization. Read once this run holds
    # the pair's claim (tasks.claims): a holder lets go only once its image and sidecar are written.
    if ctx.recheck_done and _made_meanwhile(pair, ctx):
        return PairDone(skipped_item(pair, out, note=MADE_BY_ANOTHER), None)
    # Decoded straight from the fetch and sized as the engine will (where that changes nothing): a
    # waiting pair holds its images at the output size, not their file bytes or a full-size scan.
    data = _fetch(ctx, pair.content, pair.content_identity)
    with decode_slot():  # a few at a time: a decode's peak is several times the image's pixels
        content = presized(decode_image(data, pair.content), ctx.params).merged()
    style = ctx.styles.get(pair.style, pair.style_identity, lambda uri: _decode_style(ctx, uri, pair.style_identity))
    inputs = _PairInputs(pair, ctx, content, style, get_run_logger())
    request = StepRequest(ctx, fit_longest(inputs.content.size, ctx.params.image_size), ctx.pairs_per_step,
                          lambda device, requests: _stylize_step(ctx, device, requests), inputs.check, inputs)
    ctx.steps.run(request, pair.index)
    if isinstance(request.outcome, BaseException):
        raise request.outcome
    result = request.outcome
    image = encode_image(result.image, ctx.output.format, quality=ctx.output.quality)

    def write(key: str, data: bytes, content_type: str) -> str:
        def once() -> str:
            with io_slot(ctx.io_workers):
                return out.write(key, data, content_type)
        started_at = datetime.now(timezone.utc)
        try:
            identity = retrying(once, health=ctx.health)
        except WriteRefusedError as err:  # a full disk: the run stops starting pairs after a few
            ctx.health.wrote(err, started_at)
            raise
        ctx.health.wrote(None, started_at)
        return identity

    # The image first, the sidecar last: a sidecar with this key and this image's record means done.
    identity = write(pair.image_key, image, f"image/{ctx.output.format}")
    meta = sidecar(pair, out.uri_for(pair.image_key), result, ctx.labels, ctx.flow_run,
                   {"device_wait": round(request.waited, 4)}, image_record(image, identity))
    write(pair.sidecar_key, json.dumps(meta, indent=2).encode(), "application/json")
    item = done_item(pair, out, seconds=meta["seconds"].get("total"), losses=result.losses)
    return PairDone(item, (_thumb(inputs.content), _thumb(inputs.style), _thumb(result.image)))
