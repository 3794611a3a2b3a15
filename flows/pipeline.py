"""The windowed fetch -> stylize -> write pipeline shared by stylize-batch and stylize-chunk."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from prefect import get_run_logger

from tasks.models import OutputSpec, RunOptions
from nst_core.params import StyleParams
from tasks.pair import fetch_image, stylize_pair, write_pair
from tasks.plan import PairPlan
from tasks.report import PairItem
from tasks.storage import open_storage

__all__ = ["PipelineResult", "run_pairs", "Throttle"]


@dataclass
class PipelineResult:
    items: dict[int, PairItem] = field(default_factory=dict)  # by PairPlan.index
    thumbs: list[tuple[bytes, bytes, bytes]] = field(default_factory=list)  # first contact_sheet_rows done pairs
    chunks: list[dict] = field(default_factory=list)  # fan-out: one line per child run


def _error_of(futures) -> str:
    """The first failure among a pair's task futures, as one line."""
    for fut in futures:
        state = fut.state
        if state.is_failed() or state.is_crashed():
            err = fut.result(raise_on_failure=False)
            return str(err) if isinstance(err, BaseException) else (state.message or state.name)
    return "did not finish"


def run_pairs(
    todo: list[PairPlan], output: OutputSpec, params: StyleParams, run: RunOptions, devices: list[str],
    weights_id: str, on_done: Callable[[int, int], None] | None = None,
) -> PipelineResult:
    """Stylize ``todo`` with at most ``run.window`` pairs in flight; never raises for a bad pair.

    Submission order fetch(c), fetch(s), stylize, write per pair keeps every upstream task ahead
    of its downstream ones in the thread pool's FIFO queue, so waiting tasks cannot starve them.
    """
    logger = get_run_logger()
    out = open_storage(output.uri)
    result = PipelineResult()
    finished = 0

    def collect(entry) -> None:
        nonlocal finished
        p, fc, fs, fr, fw = entry
        fw.wait()
        if fw.state.is_completed():
            outcome = fr.result()
            result.items[p.index] = PairItem(p.content, p.style, "done", fw.result(),
                                             seconds=outcome.sidecar["seconds"]["total"],
                                             losses=outcome.sidecar["losses"])
            if len(result.thumbs) < run.contact_sheet_rows:
                result.thumbs.append(outcome.thumbs)
        else:
            error = _error_of([fc, fs, fr, fw])
            result.items[p.index] = PairItem(p.content, p.style, "failed", out.uri_for(p.image_key), error=error)
            logger.error("pair %s x %s failed: %s", p.content, p.style, error)
        finished += 1
        if on_done:
            on_done(finished, len(todo))

    inflight: deque = deque()
    for p in todo:
        fc = fetch_image.submit(p.content, run.io_workers)
        fs = fetch_image.submit(p.style, run.io_workers)
        fr = stylize_pair.submit(p, fc, fs, params, output, devices, weights_id, run.labels)
        fw = write_pair.submit(p, fr, output.uri, run.io_workers)
        inflight.append((p, fc, fs, fr, fw))
        while len(inflight) >= run.window:
            collect(inflight.popleft())
    while inflight:
        collect(inflight.popleft())
    return result


class Throttle:
    """Calls ``fn`` at most every ``seconds``, and always for the last value."""

    def __init__(self, fn: Callable[[float], None], seconds: float = 2.0):
        self.fn, self.seconds, self._last = fn, seconds, 0.0

    def __call__(self, value: float, final: bool = False) -> None:
        now = time.monotonic()
        if final or now - self._last >= self.seconds:
            self._last = now
            self.fn(value)
