"""The sliding window of pair tasks shared by stylize-batch and stylize-chunk (not a flow: the
driver that submits one ``process_pair`` task per pair and collects them as they finish).

It stops starting pairs when the run is interrupted or its storage is declared unreachable
(``ctx.health``); pairs never started are reported failed with the reason ("not run: storage
unreachable since HH:MM:SS UTC"), and a rerun does exactly those (the done rule skips the rest)."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prefect import get_run_logger

from nst_core.errors import NSTError

from . import claims as claims_mod
from .contract import NOT_RUN, PairPlan, ReportItem, failed_item, left_item
from .pair import PairContext, PairDone, process_pair, stop_requested
from .storage import env_seconds

__all__ = ["PipelineResult", "run_pairs"]


@dataclass
class PipelineResult:
    items: dict[int, ReportItem] = field(default_factory=dict)  # by PairPlan.index
    thumbs: list[tuple[bytes, bytes, bytes]] = field(default_factory=list)  # first contact_sheet_rows done pairs
    chunks: list[dict] = field(default_factory=list)  # fan-out: one line per child run


def _error_of(fut, outcome) -> str:
    if isinstance(outcome, BaseException):
        return str(outcome) or type(outcome).__name__
    state = fut.state
    return state.message or state.name


def run_pairs(
    todo: list[PairPlan], ctx: PairContext, window: int, contact_sheet_rows: int = 0,
    on_done: Callable[[int, int], None] | None = None, result: PipelineResult | None = None,
) -> PipelineResult:
    """Run ``todo`` with at most ``window`` pair tasks in flight, collecting whichever finishes
    first (one slow pair never idles the other devices). Never raises for a bad pair. ``result``:
    where to collect, so that a caller stopped part-way (Ctrl-C) still has the pairs finished.

    With ``ctx.claims`` (skip_existing) a pair's task starts only once this run holds its claim
    (``tasks.claims``): a pair another live run on the output holds is left until this run's own
    pairs are through, then started as its claim comes free (its task finds it made by that run,
    or makes it if that run died), for at most WAIT_S; one pair, one task run."""
    if ctx.claims is None:
        return _run_pairs(todo, ctx, window, contact_sheet_rows, on_done, result)
    ctx.claims.start()
    ended = False
    try:
        result = _run_pairs(todo, ctx, window, contact_sheet_rows, on_done, result)
        ended = True
        return result
    finally:  # stopped part-way, the pairs in flight keep their claims until they stop
        ctx.claims.stop(ended=ended)


def _run_pairs(todo, ctx, window, contact_sheet_rows, on_done, result) -> PipelineResult:
    logger = get_run_logger()
    result = PipelineResult() if result is None else result
    finished = 0
    done: queue.Queue = queue.Queue()
    deferred: dict[int, tuple[PairPlan, str]] = {}  # by PairPlan.index: the pair, who holds it

    def collect(within: float | None = None) -> bool:
        """Account for one finished pair, waiting for it (``within`` seconds at most: False if none
        finished by then)."""
        ends = None if within is None else time.monotonic() + within
        while True:
            try:
                p, fut = done.get(timeout=1.0 if ends is None else max(0.0, min(1.0, ends - time.monotonic())))
                break  # a timeout keeps Ctrl-C responsive
            except queue.Empty:
                if ends is not None and time.monotonic() >= ends:
                    return False
        outcome = fut.result(raise_on_failure=False)  # the task's return value, or its exception
        if isinstance(outcome, PairDone):
            result.items[p.index] = outcome.item
            if outcome.thumbs is not None and len(result.thumbs) < contact_sheet_rows:
                result.thumbs.append(outcome.thumbs)
        else:
            error = _error_of(fut, outcome)
            result.items[p.index] = failed_item(p, error, ctx.storage)
            logger.error("pair %s x %s failed: %s", p.content, p.style, error)
        count()
        return True

    def count() -> None:
        nonlocal finished
        finished += 1
        if on_done:
            on_done(finished, len(todo))

    def claimed(p: PairPlan) -> bool:
        """Whether this run holds ``p``'s claim now (always, without claims); a pair it cannot
        claim for a reason of the storage's fails with that reason."""
        if ctx.claims is None:
            return True
        try:
            holder = ctx.claims.take(p)
        except (NSTError, OSError) as err:  # a stale NFS handle, a disconnected mount: this pair fails, not the run
            deferred.pop(p.index, None)
            why = str(err) if isinstance(err, NSTError) else f"{p.name}: its claim could not be taken: {err}"
            result.items[p.index] = failed_item(p, why, ctx.storage)
            logger.error("pair %s x %s failed: %s", p.content, p.style, why)
            count()
            return False
        if holder is None:
            deferred.pop(p.index, None)
            return True
        if p.index not in deferred:
            logger.info("pair %s x %s is being made by %s on this output: this run comes back to it at its end",
                        p.content, p.style, holder)
        deferred[p.index] = (p, holder)
        return False

    def start(p: PairPlan) -> None:
        nonlocal inflight
        started.add(p.index)
        fut = process_pair.submit(p, ctx)
        fut.add_done_callback(lambda f, p=p: done.put((p, f)))
        inflight += 1
        while inflight >= window:
            collect()
            inflight -= 1

    def stopped() -> bool:
        return stop_requested.is_set() or ctx.health.unreachable_since() is not None

    # A device step may wait for announced pairs (tasks.steps). The first window is announced before
    # any pair starts: announced one by one, a first pair could reach a device before the loop had
    # announced the rest, and start a step alone.
    for p in todo[:window]:
        ctx.announce(p)
    inflight, started = 0, set()
    for p in todo:
        if stopped():
            break
        if claimed(p):
            ctx.announce(p)
            start(p)
        else:
            ctx.settle(p)  # announced perhaps, not started: no step waits for it
    for p in todo[:window]:
        if p.index not in started:
            ctx.settle(p)  # announced, never started (a stop): no step waits for it
    # the pairs another run held: started as their claims come free, for at most WAIT_S
    deadline = time.monotonic() + env_seconds("NST_CLAIM_WAIT_S", claims_mod.WAIT_S)
    while deferred and not stopped() and time.monotonic() < deadline:
        for p, _ in sorted(deferred.values(), key=lambda d: d[0].index):
            if stopped():
                break
            if claimed(p):
                ctx.announce(p)
                start(p)
        # look again in POLL_S, accounting meanwhile for the pairs that finish (the progress moves on)
        look = time.monotonic() + claims_mod.POLL_S
        while deferred and inflight and not stop_requested.is_set() and time.monotonic() < look:
            if collect(within=look - time.monotonic()):
                inflight -= 1
        if deferred and not inflight:
            stop_requested.wait(max(0.0, look - time.monotonic()))
    while inflight:
        collect()
        inflight -= 1
    for p, holder in deferred.values() if not stopped() else ():
        result.items[p.index] = left_item(p, ctx.storage, holder)
        count()
    stop = ctx.health.stop_error()
    why = f"{NOT_RUN}{stop}" if stop else "run interrupted before the pair started"
    for p in todo:
        result.items.setdefault(p.index, failed_item(p, why, ctx.storage))
    return result
