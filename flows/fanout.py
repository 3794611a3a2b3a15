"""Fan-out to GPU workers (``run.fan_out: workers``): one stylize-chunk run per chunk of the plan.

1. ``plan_chunks``: chunks cut from the FULL plan by position, each keyed by its pairs' keys, so a
   retried parent finds its children again; chunks whose pairs are all done are not started.
2. ``start_chunk``: start (or find, by idempotency key) one chunk run; a chunk run that ended
   badly is started again as ``…-attempt-N``.
3. ``ChunkWatcher``: wait for them, one paged API query per poll (``poll``), every wait with a
   deadline (``check_deadlines``), each finished chunk merged as it ends (``settle``,
   ``merge_chunk``: its report's items by pair key, else its pairs' sidecars).

Anything that ends the wait early (Ctrl-C, an error, the stop flag) cancels the unfinished chunk
runs first (``cancel_children``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from prefect import get_run_logger
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run

from nst_core.params import StyleParams
from tasks.contract import (PairPlan, ReportItem, attempt_report_key, chunk_items, chunk_key, chunk_report_key,
                            decode_thumbs, done_in, done_item, failed_item)
from tasks.credentials import DEFAULT_CHAIN, StorageCredentials
from tasks.models import OutputSpec, RunOptions
from tasks.pair import PairStopped, stop_requested
from tasks.pipeline import PipelineResult
from tasks.storage import Storage, StorageError, open_storage, retrying

__all__ = ["fan_out_to_workers", "plan_chunks", "start_chunk", "merge_chunk", "read_children", "cancel_children",
           "parent_tag", "Chunk", "ChunkWatcher", "POLL_S", "API_PAGE", "START_TIMEOUT_S", "MAX_CHUNK_ATTEMPTS"]

#: Seconds between two polls of the chunk runs (one batched API query each).
POLL_S = 2.0
#: Flow runs per API read: Prefect's /flow_runs/filter answers 422 above PREFECT_SERVER_API_DEFAULT_LIMIT (200).
API_PAGE = 200
#: Queued chunks are cancelled after min(run.chunk_timeout_s, this) with no chunk running, started or
#: finished (no worker polling the pool). Env: NST_CHUNK_START_TIMEOUT_S.
START_TIMEOUT_S = float(os.environ.get("NST_CHUNK_START_TIMEOUT_S", 3600))
#: A chunk that ended without completing is started again at most this many times by one plan.
MAX_CHUNK_ATTEMPTS = 20


def plan_chunks(plans: list[PairPlan], chunk_size: int, parent_id: str,
                done: set[int] | frozenset[int] = frozenset()) -> list[tuple[str, list[PairPlan]]]:
    """(idempotency key, pairs) per chunk of the FULL plan, cut by position and keyed by all of the
    chunk's pair keys. A retried parent that re-plans after some pairs finished cuts the same chunks
    and finds the same children (still running or completed); chunks whose pairs are all in ``done``
    (or failed at planning) are not started. A child skips the pairs of its chunk that are done."""
    chunks = []
    for i in range(0, len(plans), chunk_size):
        chunk = [p for p in plans[i:i + chunk_size] if p.runnable]
        if any(p.index not in done for p in chunk):
            chunks.append((f"{parent_id}:chunk:{chunk_key(chunk)}", chunk))
    return chunks


def parent_tag(parent_id: str) -> str:
    """The tag every chunk run of a parent carries (how ``cancel_children`` finds them)."""
    return f"nst-parent:{parent_id}"


def read_children(client, ids: list[str]):
    """The flow runs with these ids, in pages the API accepts (it answers 422 above its limit)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = []
    for i in range(0, len(ids), API_PAGE):
        page = ids[i:i + API_PAGE]
        runs += client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=page)), limit=len(page))
    return runs


def cancel_children(parent_id: str, message: str = "the parent stylize-batch run was cancelled") -> int:
    """Cancel every unfinished chunk run of a parent (found by its tag, read in pages); finished
    ones (Completed, Failed, ...) are left as they are. Returns how many were cancelled."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.states import Cancelling

    runs = []
    with get_client(sync_client=True) as client:
        query = FlowRunFilter(tags=FlowRunFilterTags(all_=[parent_tag(parent_id)]))
        while True:  # read them all first: cancelling does not change the tag, so the pages stay put
            page = client.read_flow_runs(flow_run_filter=query, sort=FlowRunSort.ID_DESC, limit=API_PAGE,
                                         offset=len(runs))
            runs += page
            if len(page) < API_PAGE:
                break
        n = 0
        for child in runs:
            if child.state and not child.state.is_final():
                client.set_flow_run_state(child.id, Cancelling(message=message), force=True)
                n += 1
    return n


def start_chunk(deployment: str, idem: str, parameters: dict, name: str, tags: list[str]):
    """Start (or find, by idempotency key) one chunk run. Returns (flow run, its report key).

    A run found by the key that is Completed is kept (its report is merged); one that ended
    otherwise (Cancelled, Failed, Crashed) is replaced by a new attempt with its own key and
    report key, so a retried parent redoes the chunk instead of reporting its failure again."""
    from prefect.deployments import run_deployment

    for attempt in range(MAX_CHUNK_ATTEMPTS):
        report = attempt_report_key(parameters["report_key"], attempt)
        child = run_deployment(name=deployment, parameters={**parameters, "report_key": report},
                               flow_run_name=name if attempt == 0 else f"{name}-attempt-{attempt}",
                               idempotency_key=idem if attempt == 0 else f"{idem}:attempt-{attempt}",
                               tags=tags, timeout=0,  # start them all, then wait
                               as_subflow=True)
        if not (child.state and child.state.is_final() and not child.state.is_completed()):
            break
    # the run's own parameters name its report (a run found by its key may predate this attempt's key);
    # when every attempt ended badly, the last one is reported failed
    return child, (child.parameters or {}).get("report_key", report)


def merge_chunk(n: int, chunk: list[PairPlan], state_name: str, message: str, report: dict | None, out: Storage,
                io_workers: int = 8) -> dict[int, ReportItem]:
    """A finished chunk's pairs as report items. Pairs its report lacks (or all, without a readable
    report) are judged by the done rule on their sidecars before they are called failed."""
    by_key = chunk_items(report)  # by pair key, not position
    missing = [p for p in chunk if p.key not in by_key]
    done = done_in(out, missing, list_once=False, io_workers=io_workers) if missing else set()
    items = {}
    for p in chunk:
        if p.key in by_key:
            items[p.index] = by_key[p.key]
        elif p.index in done:
            items[p.index] = done_item(p, out)
        else:
            items[p.index] = failed_item(p, f"chunk {n} ended {state_name}: {message}".rstrip(": "), out)
    return items


@dataclass
class Chunk:
    """One started chunk run, as the watcher sees it."""

    number: int
    pairs: list[PairPlan]  # the pairs it runs (those of its slice not already done)
    report_key: str
    flow_run_id: str
    state: str = "unknown"  # the last state name seen
    started: float | None = None  # when it was first seen out of Scheduled (time.monotonic)
    settled: bool = False


class ChunkWatcher:
    """Waits for a parent's chunk runs: ``poll`` (one paged query, finished chunks settled, starts
    noted), ``check_deadlines`` (cancel what is overdue), sleep, again; ``settle`` merges a chunk.

    Deadlines: a chunk that started (left Scheduled) is cancelled ``run.chunk_timeout_s`` after
    ITS start. Chunks still queued are cancelled only when nothing moved for
    min(chunk_timeout_s, START_TIMEOUT_S): no chunk running and none started or finished that long
    (no worker polls the pool, or `nst serve --limit 1`)."""

    def __init__(self, client, chunks: list[Chunk], out: Storage, run: RunOptions, on_done: Callable[[int, int], None],
                 n_todo: int):
        self.client, self.out, self.run, self.on_done, self.n_todo = client, out, run, on_done, n_todo
        self.chunks = {c.flow_run_id: c for c in chunks}
        self.result = PipelineResult()
        self.finished = 0  # pairs merged so far
        self.start_limit = min(run.chunk_timeout_s, START_TIMEOUT_S)
        self.last_move = time.monotonic()  # when a chunk last started or finished, or one was seen running
        self.logger = get_run_logger()

    @property
    def pending(self) -> list[Chunk]:
        return [c for c in self.chunks.values() if not c.settled]

    def wait(self) -> PipelineResult:
        while self.pending:
            if stop_requested.is_set():
                for chunk in self.pending:
                    self.cancel(chunk, "the run was interrupted before the chunk finished; cancelled")
                break
            self.check_deadlines(self.poll())
            if self.pending:
                time.sleep(POLL_S)
        self.result.chunks.sort(key=lambda c: c["chunk"])
        return self.result

    def poll(self) -> float:
        """Read the pending chunk runs' states; settle the finished ones. Returns when it looked."""
        pending = self.pending
        try:
            runs = read_children(self.client, [c.flow_run_id for c in pending])
        except Exception as err:  # the API hiccuped: poll again, the deadlines still hold
            self.logger.warning("polling %d chunk runs failed (%s); retrying", len(pending), err)
            runs = []
        now = time.monotonic()
        for child in runs:
            chunk = self.chunks[str(child.id)]
            if not child.state:
                continue
            chunk.state = child.state.name
            if child.state.is_final():
                self.settle(chunk, child.state.name, child.state.message or "")
                self.last_move = now
            elif child.state.type != StateType.SCHEDULED and chunk.started is None:
                chunk.started = now
        if any(c.started is not None for c in self.pending):
            self.last_move = now  # a chunk is running: the queued ones wait for its slot
        return now

    def check_deadlines(self, now: float) -> None:
        run = self.run
        for chunk in self.pending:
            if chunk.started is not None and now - chunk.started > run.chunk_timeout_s:
                self.cancel(chunk, f"ran longer than chunk_timeout_s={run.chunk_timeout_s:g} s (still {chunk.state}); "
                                   "cancelled")
            elif chunk.started is None and now - self.last_move > self.start_limit:
                self.cancel(chunk, f"not started within {self.start_limit:g} s (still {chunk.state}) while no chunk "
                                   f"of this run was running; is a worker polling the work pool of "
                                   f"{run.chunk_deployment}? (with `nst serve`, --limit must be at least 2: this run "
                                   "takes one slot and its chunks need another); cancelled")

    def cancel(self, chunk: Chunk, why: str) -> None:
        from prefect.states import Cancelling

        try:
            self.client.set_flow_run_state(chunk.flow_run_id, Cancelling(message=why), force=True)
        except Exception as err:
            self.logger.warning("could not cancel chunk run %s: %s", chunk.flow_run_id, err)
        self.settle(chunk, "Cancelled", why)

    def settle(self, chunk: Chunk, state_name: str, message: str) -> None:
        """Merge a finished chunk: its pairs' items, its thumbnails (while the sheet has room), a chunk line."""
        chunk.settled = True
        report = self._read_report(chunk.report_key)
        for index, item in merge_chunk(chunk.number, chunk.pairs, state_name, message, report, self.out,
                                       self.run.io_workers).items():
            self.result.items[index] = item
            self.finished += 1
            self.on_done(self.finished, self.n_todo)
        if report:
            room = self.run.contact_sheet_rows - len(self.result.thumbs)
            self.result.thumbs += decode_thumbs(report.get("thumbs", []))[:max(room, 0)]
        self.result.chunks.append({"chunk": chunk.number, "flow_run_id": chunk.flow_run_id, "state": state_name,
                                   "report": self.out.uri_for(chunk.report_key), "worker": (report or {}).get("worker")})

    def _read_report(self, key: str) -> dict | None:
        try:
            return json.loads(retrying(lambda: self.out.read(key))[0])
        except (StorageError, ValueError):
            return None


def start_chunks(plans: list[PairPlan], done: set[int], output: OutputSpec, params: StyleParams, run: RunOptions,
                 weights_id: str, parent_id: str) -> list[Chunk]:
    """One ``run.chunk_deployment`` run per chunk of ``plan_chunks``, tagged with the parent."""
    worker_run = run.model_copy(update={"devices": ["auto"]})  # a worker leases the devices it has
    chunks = []
    for n, (idem, pairs) in enumerate(plan_chunks(plans, run.chunk_size, parent_id, done)):
        if stop_requested.is_set():
            raise PairStopped("run interrupted while starting its chunk runs")
        child, report = start_chunk(
            run.chunk_deployment, idem,
            {"pairs": [asdict(p) for p in pairs], "output": output.model_dump(mode="json"),
             "params": params.model_dump(mode="json"), "run": worker_run.model_dump(mode="json"),
             "weights_id": weights_id, "report_key": chunk_report_key(parent_id, idem.rsplit(":", 1)[1])},
            f"{flow_run.get_name() or 'stylize-batch'}-chunk-{n:04d}", [parent_tag(parent_id)])
        chunks.append(Chunk(n, [p for p in pairs if p.index not in done], report, str(child.id)))
    get_run_logger().info("started %d chunk runs of %s (chunk size %d)", len(chunks), run.chunk_deployment,
                          run.chunk_size)
    return chunks


def fan_out_to_workers(
    plans: list[PairPlan], done: set[int], output: OutputSpec, params: StyleParams, run: RunOptions,
    weights_id: str, parent_id: str, on_done: Callable[[int, int], None],
    credentials: StorageCredentials = DEFAULT_CHAIN,
) -> PipelineResult:
    """Start the chunk runs of the plan (``start_chunks``), wait for all (``ChunkWatcher``) and merge
    their chunk reports, read with ``credentials`` (each chunk run resolves its own from ``output``).
    Anything that ends the wait early (Ctrl-C, an error, the stop flag) cancels the unfinished
    chunk runs first."""
    from prefect.client.orchestration import get_client

    try:
        chunks = start_chunks(plans, done, output, params, run, weights_id, parent_id)
        n_todo = sum(1 for p in plans if p.runnable and p.index not in done)
        with get_client(sync_client=True) as client:
            watcher = ChunkWatcher(client, chunks, open_storage(output.uri, credentials), run, on_done, n_todo)
            return watcher.wait()
    except BaseException:
        try:
            cancel_children(parent_id, "the parent stylize-batch run stopped before its chunks finished")
        except Exception as err:  # the API is gone too: nothing more to do here
            get_run_logger().warning("could not cancel the chunk runs: %s", err)
        raise
