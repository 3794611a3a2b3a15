"""The sliding window of pair tasks shared by stylize-batch and stylize-chunk (not a flow: the
driver that submits one ``process_pair`` task per pair and collects them as they finish).

It stops starting pairs when the run is interrupted or its storage is declared unreachable
(``ctx.health``); pairs never started are reported failed with the reason ("not run: storage
unreachable since HH:MM:SS UTC"), and a rerun does exactly those (the done rule skips the rest)."""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass, field

from prefect import get_run_logger

from .contract import PairPlan, ReportItem, failed_item
from .pair import PairContext, PairDone, process_pair, stop_requested

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
    Pairs another live run on the output is making (``PairDone.deferred``) are run again at the
    end, waiting for that run: made by it, or made here if it died."""
    if ctx.claims is None:
        return _run_pairs(todo, ctx, window, contact_sheet_rows, on_done, result)
    ctx.claims.start()
    try:
        return _run_pairs(todo, ctx, window, contact_sheet_rows, on_done, result)
    finally:
        ctx.claims.stop()


def _run_pairs(todo, ctx, window, contact_sheet_rows, on_done, result) -> PipelineResult:
    logger = get_run_logger()
    result = PipelineResult() if result is None else result
    finished = 0
    done: queue.Queue = queue.Queue()
    deferred: list[PairPlan] = []

    def collect() -> None:
        nonlocal finished
        while True:
            try:
                p, fut = done.get(timeout=1.0)  # a timeout keeps Ctrl-C responsive
                break
            except queue.Empty:
                continue
        outcome = fut.result(raise_on_failure=False)  # the task's return value, or its exception
        if isinstance(outcome, PairDone) and outcome.deferred:
            logger.info("pair %s x %s is being made by %s on this output: this run comes back to it at its end",
                        p.content, p.style, outcome.deferred)
            deferred.append(p)
            return
        if isinstance(outcome, PairDone):
            result.items[p.index] = outcome.item
            if outcome.thumbs is not None and len(result.thumbs) < contact_sheet_rows:
                result.thumbs.append(outcome.thumbs)
        else:
            error = _error_of(fut, outcome)
            result.items[p.index] = failed_item(p, error, ctx.storage)
            logger.error("pair %s x %s failed: %s", p.content, p.style, error)
        finished += 1
        if on_done:
            on_done(finished, len(todo))

    def drive(pairs: list[PairPlan], wait: bool) -> None:
        # A device step may wait for announced pairs (tasks.steps). The first window is announced before
        # any pair starts: announced one by one, a first pair could reach a device before the loop had
        # announced the rest, and start a step alone.
        for p in pairs[:window]:
            ctx.announce(p)
        inflight, submitted = 0, 0
        for p in pairs:
            if stop_requested.is_set() or ctx.health.unreachable_since():
                break
            ctx.announce(p)
            submitted += 1
            fut = process_pair.submit(p, ctx, wait)
            fut.add_done_callback(lambda f, p=p: done.put((p, f)))
            inflight += 1
            while inflight >= window:
                collect()
                inflight -= 1
        while inflight:
            collect()
            inflight -= 1
        for p in pairs[submitted:window]:
            ctx.settle(p)  # announced, never started: no step waits for it

    drive(todo, wait=False)
    if deferred:  # the other run's pairs: waited for, in plan order
        drive(sorted(deferred, key=lambda p: p.index), wait=True)
    stop = ctx.health.stop_error()
    why = f"not run: {stop}" if stop else "run interrupted before the pair started"
    for p in todo:
        result.items.setdefault(p.index, failed_item(p, why, ctx.storage))
    return result
