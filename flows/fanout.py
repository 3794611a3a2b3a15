"""Fan-out to GPU workers (``run.fan_out: workers``): one stylize-chunk run per chunk of the plan.

1. ``plan_chunks``: chunks cut from the FULL plan by position, each keyed by its content alone
   (the output and its pairs' keys and names: ``contract.chunk_key``), never by its parent; chunks
   whose pairs are all done are not started.
2. ``start_chunks``: a chunk whose content had a Scheduled, Pending or Running run when the
   parent read the API (``live_before_done``: before the done set) — any parent's, e.g. one
   killed with ``kill -9`` whose chunk runs went on — and that is still live or Completed is
   adopted (waited for,
   merged, tagged with this parent so cancelling it reaches the run); otherwise ``start_chunk``
   starts one. Every chunk run carries its content tag (``content_tag``); its idempotency key is
   the tag and the number of runs that content had before, so a run that already ended (last
   night's, whose failed pairs need another try) is never taken for it, while two parents starting
   the same content at the same moment still get one run.
3. ``ChunkWatcher``: wait for them, one paged API query per poll (``poll``), every wait with a
   deadline (``check_deadlines``), each finished chunk merged as it ends (``settle``,
   ``merge_chunk``: its report's items by pair key, else its pairs' sidecars). A chunk that ends
   with "storage unreachable since …", or storage that stops answering the parent, ends the wait:
   the other chunk runs are cancelled and their pairs reported with the reason (``_unread``: by
   what each chunk's state says, its report unread).

Anything that ends the wait early (Ctrl-C, an error, the stop flag) cancels the unfinished chunk
runs first (``cancel_children``).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

from prefect import get_run_logger
from prefect.client.schemas.objects import StateType
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run

from nst_core.params import StyleParams
from tasks.contract import (PairPlan, ReportItem, attempt_report_key, chunk_items, chunk_key, chunk_report_key,
                            FAILED, decode_thumbs, done_in, done_item, failed_item, item_of, parse_totals_line,
                            totals)
from tasks.credentials import DEFAULT_CHAIN, StorageCredentials
from tasks.models import OutputSpec, RunOptions
from tasks.pair import PairStopped, stop_requested
from tasks.pipeline import PipelineResult
from tasks.plan import PreflightError
from tasks.storage import (Storage, StorageError, StorageHealth, StorageUnreachableError, env_seconds, open_storage,
                           retrying)

__all__ = ["fan_out_to_workers", "check_chunk_deployment", "plan_chunks", "chunk_parameters", "CHUNK_PAIRS_BYTES",
           "start_chunks", "start_chunk",
           "live_chunk_runs", "live_before_done", "merge_chunk", "read_children", "cancel_children", "parent_tag", "content_tag",
           "Chunk", "ChunkWatcher", "POLL_S", "API_PAGE", "START_TIMEOUT_S", "MAX_CHUNK_ATTEMPTS"]

#: Seconds between two polls of the chunk runs (one batched API query each).
POLL_S = 2.0
#: Flow runs per API read: Prefect's /flow_runs/filter answers 422 above PREFECT_SERVER_API_DEFAULT_LIMIT (200).
API_PAGE = 200
#: Queued chunks are cancelled after min(run.chunk_timeout_s, this) with no chunk running, started or
#: finished (no worker polling the pool). Env: NST_CHUNK_START_TIMEOUT_S.
START_TIMEOUT_S = env_seconds("NST_CHUNK_START_TIMEOUT_S", 3600)
#: Idempotency keys of a chunk's content tried by one parent past those its earlier runs took.
MAX_CHUNK_ATTEMPTS = 20
#: Times a chunk run cancelled by another parent's stop (``stopped_by_a_parent``), or crashed, is started again.
MAX_RESTARTS = 3
#: How cancel_children's messages begin ("... was cancelled", "... crashed", "... stopped before ..."),
#: and Prefect's when it cancels a cancelled flow run's subflows: ``stopped_by_a_parent``.
PARENT_STOPPED = "the parent stylize-batch run"
_PREFECT_PARENT_CANCELLED = "The parent flow run was cancelled."
#: JSON bytes of pair plans one chunk run's parameters may carry: Prefect's server refuses a flow run
#: whose parameters exceed server.api.max_parameter_size (default 524,288 bytes of compact JSON), and
#: the rest of them (output, params, run options, keys) takes a few KB. A plan takes 0.3-3 KB, so
#: a chunk of more than ~500 S3 pairs may be cut further.
CHUNK_PAIRS_BYTES = 384 * 1024
#: The states of a chunk run a new parent adopts instead of starting another.
LIVE_STATES = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]


def plan_chunks(plans: list[PairPlan], chunk_size: int, output_uri: str,
                done: set[int] | frozenset[int] = frozenset(), redo: bool = False) -> list[tuple[str, list[PairPlan]]]:
    """(content key, pairs) per chunk of the FULL plan, cut by position (then by size, see
    ``_by_size``) and keyed by the output and all of the chunk's pair keys and names
    (``chunk_key``). Any parent that plans the same source with the same settings, after some
    pairs finished or not, cuts the same chunks under the same keys; chunks whose pairs are all in
    ``done`` (or failed at planning) are not started. A child skips the pairs of its chunk that are done."""
    chunks = []
    for i in range(0, len(plans), chunk_size):
        for chunk in _by_size([p for p in plans[i:i + chunk_size] if p.runnable]):
            if any(p.index not in done for p in chunk):
                chunks.append((chunk_key(chunk, output_uri, redo), chunk))
    return chunks


def _by_size(chunk: list[PairPlan]) -> list[list[PairPlan]]:
    """``chunk`` cut into consecutive parts whose plans take at most CHUNK_PAIRS_BYTES of JSON (one
    part, ``chunk`` itself, when it fits). From the plans alone, so every parent cuts alike."""
    parts: list[list[PairPlan]] = [[]]
    size = 0
    for p in chunk:
        n = len(json.dumps(asdict(p), separators=(",", ":")).encode()) + 1
        if parts[-1] and size + n > CHUNK_PAIRS_BYTES:
            parts.append([])
            size = 0
        parts[-1].append(p)
        size += n
    return parts


def parent_tag(parent_id: str) -> str:
    """The tag every chunk run of a parent carries (how ``cancel_children`` finds them)."""
    return f"nst-parent:{parent_id}"


def content_tag(key: str) -> str:
    """The tag every run of a chunk's content carries, whichever parent started it."""
    return f"nst-chunk:{key[:32]}"


def _runs_of(client, key: str) -> int:
    """How many chunk runs this content had so far (any state, any parent)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    return client.count_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[content_tag(key)])))


def live_chunk_runs(client, keys: list[str]) -> dict:
    """Content key -> a Scheduled, Pending or Running chunk run of that content (any parent's)."""
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
                                                FlowRunFilterTags)
    from prefect.client.schemas.sorting import FlowRunSort

    by_tag = {content_tag(k): k for k in keys}
    tags, found = list(by_tag), {}
    for i in range(0, len(tags), API_PAGE):
        query = FlowRunFilter(tags=FlowRunFilterTags(any_=tags[i:i + API_PAGE]),
                              state=FlowRunFilterState(type=FlowRunFilterStateType(any_=LIVE_STATES)))
        offset = 0
        while True:
            page = client.read_flow_runs(flow_run_filter=query, sort=FlowRunSort.ID_DESC, limit=API_PAGE,
                                         offset=offset)
            for run in page:
                for tag in run.tags:
                    if tag in by_tag:
                        found.setdefault(by_tag[tag], run)
            if len(page) < API_PAGE:
                break
            offset += API_PAGE
    return found


def _join(client, child, parent_id: str) -> None:
    """Tag a chunk run that another parent started with this one too: cancelling this parent reaches it."""
    if parent_tag(parent_id) not in (child.tags or []):
        client.update_flow_run(child.id, tags=[*(child.tags or []), parent_tag(parent_id)])

def read_children(client, ids: list[str]):
    """The flow runs with these ids, in pages the API accepts (it answers 422 above its limit)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = []
    for i in range(0, len(ids), API_PAGE):
        page = ids[i:i + API_PAGE]
        runs += client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=page)), limit=len(page))
    return runs


def cancel_children(parent_id: str, message: str = f"{PARENT_STOPPED} was cancelled",
                    keep: set[str] = frozenset()) -> int:
    """Cancel every unfinished chunk run of a parent (found by its tag, read in pages) but those
    whose ids are in ``keep``; finished ones (Completed, Failed, ...) are left as they are. Returns
    how many were cancelled."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

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
            if child.state and not child.state.is_final() and str(child.id) not in keep:
                client.set_flow_run_state(child.id, _cancel_state(child.state, message), force=True)
                n += 1
    return n


def _cancel_state(state, message: str):
    """Cancelled at once, with ``message``, for a run no worker holds yet (Scheduled, Paused: no
    process to stop; set Cancelling, Prefect's server ends such a run Cancelled itself and drops the
    message, which stopped_by_a_parent reads); Cancelling for the rest, which their worker stops."""
    from prefect.states import Cancelled, Cancelling

    idle = state.type in (StateType.SCHEDULED, StateType.PAUSED)
    return (Cancelled if idle else Cancelling)(message=message)


def check_chunk_deployment(name: str) -> None:
    """PreflightError unless the Prefect API has deployment ``name`` ("flow/deployment"); the message
    names the most recent deployments of that flow it does have."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import DeploymentSort
    from prefect.exceptions import ObjectNotFound

    flow_name = name.partition("/")[0]
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
            return
        except ObjectNotFound:
            found = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                            sort=DeploymentSort.CREATED_DESC, limit=5)
    have = ", ".join(f"{flow_name}/{d.name}" for d in found) or "none"
    raise PreflightError(f"fan_out=workers needs the deployment {name}, which this Prefect API does not have "
                         f"(latest of {flow_name}: {have}); deploy it (deployments/prefect.yaml, or `nst serve`), "
                         "set chunk_deployment, or use fan_out=local")


def start_chunk(client, deployment: str, key: str, parameters: dict, name: str, tags: list[str],
                earlier: int | None = None):
    """Start one run of chunk content ``key`` (tagged ``content_tag(key)``), or get the one another
    parent started at the same moment. Returns the flow run (its parameters name its report).

    The idempotency key is the content tag and ``earlier``, the number of runs this content had
    (counted before the caller looked for live ones: then two parents racing agree on it). A run
    that already ended under the key (one of a deleted run's successors) is skipped for the next
    key: a finished run is never taken for pairs still to do. Each key reports elsewhere."""
    from prefect.deployments import run_deployment

    tag = content_tag(key)
    earlier = _runs_of(client, key) if earlier is None else earlier
    for attempt in range(MAX_CHUNK_ATTEMPTS):
        generation = earlier + attempt
        child = run_deployment(name=deployment,
                               parameters={**parameters,
                                           "report_key": attempt_report_key(parameters["report_key"], generation)},
                               flow_run_name=name if attempt == 0 else f"{name}-attempt-{attempt}",
                               idempotency_key=f"{tag}:{generation}", tags=[*tags, tag],
                               timeout=0,  # start them all, then wait
                               as_subflow=True)
        if not (child.state and child.state.is_final()):
            break
    return child  # when every key was taken by an ended run, the last is reported as it ended


def merge_chunk(n: int, chunk: list[PairPlan], state_name: str, message: str, report: dict | None, out: Storage,
                io_workers: int = 8, health: StorageHealth | None = None,
                made_by: set[str] | None = None) -> dict[int, ReportItem]:
    """A finished chunk's pairs as report items. Pairs its report lacks (or all, without a readable
    report) are judged by the done rule on their sidecars before they are called failed (all of
    them, when the storage is unreachable). ``made_by``: a run that redoes its pairs (skip_existing
    off) counts only sidecars this chunk's runs wrote (their flow run ids), not an earlier run's."""
    listed = chunk_items(report)
    reported = {p.index: item for p in chunk if (item := item_of(listed, p)) is not None}
    missing = [p for p in chunk if p.index not in reported]
    try:
        done = done_in(out, missing, list_once=False, io_workers=io_workers, health=health,
                       made_by=made_by) if missing else set()
    except StorageError:
        done = set()
    items = {}
    for p in chunk:
        if p.index in reported:
            items[p.index] = reported[p.index]
        elif p.index in done:
            items[p.index] = done_item(p, out)
        else:
            # a Completed chunk's message gives its own counts: beside a pair it did not report, a contradiction
            why = (f"chunk {n} ended Completed without a result for this pair" if state_name == "Completed"
                   else f"chunk {n} ended {state_name}: {message}".rstrip(": "))
            items[p.index] = failed_item(p, why, out)
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
    restart: Callable[..., object] | None = None  # restart(client): a new run of its content (start_chunk)
    restarts: int = 0
    earlier_runs: list[str] = field(default_factory=list)  # the flow run ids it had before restarts
    #: pairs of its slice done before it started: the chunk run is given its whole slice and counts
    #: them skipped, so its row in the summary does too (the two pages agree)
    already_done: int = 0


def stopped_by_a_parent(state, history=()) -> bool:
    """Whether a chunk run ended Cancelled because a parent stopped (cancel_children, or Prefect
    for the subflows of a cancelled flow run), not for a reason of its own. The parent's word is in
    the Cancelling state it set: Prefect's runner or worker then ends the run Cancelled with its own
    ("Flow run was cancelled successfully.", "... while pending."), so ``history``, the run's
    states, is read too."""
    def by_a_parent(s) -> bool:
        message = s.message or ""
        return message.startswith(PARENT_STOPPED) or message == _PREFECT_PARENT_CANCELLED

    return state.type == StateType.CANCELLED and (by_a_parent(state) or any(
        s.type in (StateType.CANCELLING, StateType.CANCELLED) and by_a_parent(s) for s in history))


class ChunkWatcher:
    """Waits for a parent's chunk runs: ``poll`` (one paged query, finished chunks settled, starts
    noted), ``check_deadlines`` (cancel what is overdue), sleep, again; ``settle`` merges a chunk.

    Deadlines: a chunk that started (left Scheduled) is cancelled ``run.chunk_timeout_s`` after
    ITS start. Chunks still queued are cancelled only when nothing moved for
    min(chunk_timeout_s, START_TIMEOUT_S): no chunk running and none started or finished that long
    (no worker polls the pool, or `nst serve --limit 1`)."""

    def __init__(self, client, chunks: list[Chunk], out: Storage, run: RunOptions, on_done: Callable[[int, int], None],
                 n_todo: int, health: StorageHealth | None = None, parent_id: str = "",
                 result: PipelineResult | None = None):
        self.client, self.out, self.run, self.on_done, self.n_todo = client, out, run, on_done, n_todo
        self.parent_id = parent_id
        self.health = health or StorageHealth()
        self.chunks = {c.flow_run_id: c for c in chunks}
        self.result = PipelineResult() if result is None else result  # the caller's, to read if the wait is stopped
        self.finished = 0  # pairs merged so far
        self.start_limit = min(run.chunk_timeout_s, START_TIMEOUT_S)
        self.last_move = time.monotonic()  # when a chunk last started or finished, or one was seen running
        self._where: dict | None = None  # the filter of the chunk deployment's pool (or itself), once read
        self._busy: set[str] = set()  # other runs Pending/Running there at the last look
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
            since = self.health.unreachable_since()
            if since is not None:  # each chunk would wait out the outage on its own, one after another
                for chunk in self.pending:
                    self.cancel(chunk, f"cancelled by its parent: {StorageUnreachableError(since)}")
                break
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
                # Crashed: its process died (a server restart lost its slot lease, an OOM kill)
                again = self._crashed_unasked(child) if child.state.type == StateType.CRASHED \
                    else self._stopped_by_a_parent(child)
                if not (again and self.start_again(chunk)):
                    self.settle(chunk, child.state.name, child.state.message or "")
                self.last_move = now
            elif child.state.type != StateType.SCHEDULED and chunk.started is None:
                # its own start, by the API's clock (no skew with this machine's): a chunk adopted from
                # a parent that died hours ago (its GPU machine lost) has run that long already
                chunk.started = now - child.estimated_run_time.total_seconds()  # 0 while Pending
        if any(c.started is not None for c in self.pending):
            self.last_move = now  # a chunk is running: the queued ones wait for its slot
        return now

    def _crashed_unasked(self, child) -> bool:
        """Whether a Crashed run crashed with no one but a parent asking it to stop. Prefect ends a
        run it is cancelling Crashed when it cannot record Cancelled: a user's cancel is no crash to
        run again. One API call, for Crashed runs only; an API that fails to answer: asked."""
        try:
            states = self.client.read_flow_run_states(child.id)
        except Exception as err:
            self.logger.warning("could not read the states of chunk run %s: %s", child.id, err)
            return False
        return all((s.message or "").startswith(PARENT_STOPPED) or s.message == _PREFECT_PARENT_CANCELLED
                   for s in states if s.type == StateType.CANCELLING)

    def _stopped_by_a_parent(self, child) -> bool:
        """stopped_by_a_parent, reading the states of a Cancelled run whose last message is not a
        parent's (one API call, for Cancelled runs only); an API that fails to answer: not by a parent."""
        if child.state.type != StateType.CANCELLED or stopped_by_a_parent(child.state):
            return stopped_by_a_parent(child.state)
        try:
            return stopped_by_a_parent(child.state, self.client.read_flow_run_states(child.id))
        except Exception as err:
            self.logger.warning("could not read the states of chunk run %s: %s", child.id, err)
            return False

    def start_again(self, chunk: Chunk) -> bool:
        """Give a chunk whose run crashed, or another parent's stop cancelled, a new run (it skips the
        pairs the old one wrote). Two overlapping runs of one plan share chunk runs (``start_chunks``
        adopts them): cancelling one must not fail the other's pairs; a served chunk's slot lease,
        lost when the server restarts, crashes the run it holds. Not when this parent is itself
        stopping (its own cancel hook cancelled the run), nor past MAX_RESTARTS. True when a new run
        took over."""
        if chunk.restart is None or chunk.restarts >= MAX_RESTARTS or stop_requested.is_set() or self._stopping():
            return False
        try:
            child = chunk.restart(self.client)
        except Exception as err:  # the API: settle the chunk as it ended
            self.logger.warning("could not start chunk %d again: %s", chunk.number, err)
            return False
        how = "crashed" if chunk.state == "Crashed" else "was cancelled by another parent's stop"
        self.logger.warning("chunk %d: its run %s %s (%s); started again as %s",
                            chunk.number, chunk.flow_run_id, how, chunk.state, child.id)
        del self.chunks[chunk.flow_run_id]
        chunk.earlier_runs.append(chunk.flow_run_id)
        chunk.flow_run_id, chunk.started, chunk.restarts = str(child.id), None, chunk.restarts + 1
        chunk.report_key = (child.parameters or {}).get("report_key", "")
        self.chunks[chunk.flow_run_id] = chunk
        return True

    def _stopping(self) -> bool:
        """Whether this parent's own flow run is being cancelled or has ended (read now)."""
        if not self.parent_id:
            return False
        try:
            state = self.client.read_flow_run(self.parent_id).state
        except Exception:  # unknown to the API (a run outside Prefect's): not stopping by the API's word
            return False
        return state is not None and (state.is_final() or state.type == StateType.CANCELLING)

    def _others_moving(self) -> bool:
        """Whether other runs are busy on the chunk deployment's work pool (a served deployment has
        none: its own runs then, another batch run's chunks ahead of this one's in its concurrency
        slot) and moving: the Pending/Running set changed since the last look, or one of them started
        within ``run.chunk_timeout_s`` (a long chunk of an overrunning nightly). A run Running there
        for longer (its worker died) does not count, so the wait stays bounded. An API that fails to
        answer: not moving."""
        from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                    FlowRunFilterState, FlowRunFilterStateType, WorkPoolFilter,
                                                    WorkPoolFilterName)

        try:
            if self._where is None:
                deployment = self.client.read_deployment_by_name(self.run.chunk_deployment)
                self._where = ({"work_pool_filter": WorkPoolFilter(name=WorkPoolFilterName(
                    any_=[deployment.work_pool_name]))} if deployment.work_pool_name else
                    {"deployment_filter": DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))})
            busy = self.client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING]))), limit=API_PAGE,
                **self._where)
        except Exception as err:
            self.logger.warning("could not read the busy runs of the chunk pool: %s", err)
            return False
        ids = {str(r.id) for r in busy} - set(self.chunks) - {self.parent_id}  # a parent in the same pool is not busy work
        now = datetime.now(timezone.utc)

        def young(r) -> bool:  # started (or, Pending, taken) within chunk_timeout_s; a run with no time: stuck
            since = r.start_time or (r.state.timestamp if r.state else None)
            return since is not None and (now - since).total_seconds() < self.run.chunk_timeout_s

        moving = any(str(r.id) in ids and young(r) for r in busy)
        moved, self._busy = bool(ids) and (ids != self._busy or moving), ids
        return moved

    def check_deadlines(self, now: float) -> None:
        run = self.run
        if (any(c.started is None for c in self.pending) and now - self.last_move > self.start_limit
                and self._others_moving()):
            self.last_move = now  # the pool's worker is busy with other runs: our chunks are queued behind them
        for chunk in self.pending:
            if chunk.started is not None and now - chunk.started > run.chunk_timeout_s:
                self.cancel(chunk, f"ran longer than chunk_timeout_s={run.chunk_timeout_s:g} s (still {chunk.state}); "
                                   "cancelled")
            elif chunk.started is None and now - self.last_move > self.start_limit:
                self.cancel(chunk, f"not started within {self.start_limit:g} s (still {chunk.state}) while no chunk "
                                   f"of this run, nor any run of its work pool, was running; is a worker polling the work pool of "
                                   f"{run.chunk_deployment}? (with `nst serve`, --limit must be at least 2: this run "
                                   "takes one slot and its chunks need another); cancelled")

    def cancel(self, chunk: Chunk, why: str) -> None:
        from prefect.states import Cancelling

        try:  # its state now, not as last polled: a worker may have taken it since (then Cancelling, to stop it)
            now = self.client.read_flow_run(chunk.flow_run_id).state
        except Exception:
            now = None
        if now is not None and now.is_final():  # it ended meanwhile: merge it as it ended, never overwrite that
            self.settle(chunk, now.name, now.message or "")
            return
        # in a parent's words: another parent that adopted this run starts it again (stopped_by_a_parent)
        # and keeps its own deadlines, not this one's (it may have started waiting an hour later)
        said = f"{PARENT_STOPPED}{' ' + self.parent_id if self.parent_id else ''} cancelled it: {why}"
        try:
            state = _cancel_state(now, said) if now is not None else Cancelling(message=said)
            self.client.set_flow_run_state(chunk.flow_run_id, state, force=True)
        except Exception as err:
            self.logger.warning("could not cancel chunk run %s: %s", chunk.flow_run_id, err)
        self.settle(chunk, "Cancelled", why)

    def settle(self, chunk: Chunk, state_name: str, message: str) -> None:
        """Merge a finished chunk: its pairs' items, its thumbnails (while the sheet has room), a chunk line.
        A chunk that ended with "storage unreachable since …" (it wrote no report) declares the outage
        here; once it is declared, no storage is read: every pair of the chunk fails with the reason."""
        chunk.settled = True
        # a chunk run's own end only: a Cancelled one's message may be another parent's outage, seen
        # from its machine
        since = StorageUnreachableError.parse(message) if state_name != "Cancelled" else None
        if since is not None:
            self.health.declare(since)
        since = self.health.unreachable_since()
        report = None if since else self._read_report(chunk.report_key)
        if since is None:
            items = merge_chunk(chunk.number, chunk.pairs, state_name, message, report, self.out, self.run.io_workers,
                                self.health, made_by=None if self.run.skip_existing
                                else {chunk.flow_run_id, *chunk.earlier_runs})
        else:
            items = self._unread(chunk, state_name, message, StorageUnreachableError(since))
        for index, item in items.items():
            self.result.items[index] = item
            # progress counts the pairs known to have finished: after an outage, not those it cannot know
            if since is None or item.status != FAILED:
                self.finished += 1
                self.on_done(self.finished, self.n_todo)
        if report:
            room = self.run.contact_sheet_rows - len(self.result.thumbs)
            self.result.thumbs += decode_thumbs(report.get("thumbs", []))[:max(room, 0)]
        counts = totals(list(items.values()))  # the summary's chunk table shows them
        self.result.chunks.append({"chunk": chunk.number, "flow_run_id": chunk.flow_run_id, "state": state_name,
                                   "done": counts["done"], "skipped": counts["skipped"] + chunk.already_done,
                                   "failed": counts["failed"],
                                   "report": self.out.uri_for(chunk.report_key), "worker": (report or {}).get("worker")})

    def _unread(self, chunk: Chunk, state_name: str, message: str, outage: StorageUnreachableError) -> dict[int, ReportItem]:
        """A chunk's pairs once the storage is declared unreachable (its report is not read): what
        its state says. A Completed chunk whose message counts all its pairs done is taken at its
        word; any other pair fails with what is known, never "not run" for a pair that may have been
        made (a chunk cancelled mid-way), nor "skipped" (a skip may be a pair left to another run)."""
        counts = parse_totals_line(message) if state_name == "Completed" else None
        if counts and counts["pairs"] == len(chunk.pairs) and counts["done"] == len(chunk.pairs):
            return {p.index: done_item(p, self.out) for p in chunk.pairs}
        if state_name == "Failed" and StorageUnreachableError.parse(message):  # the chunk that met it: its own count
            why = f"chunk {chunk.number} ended {state_name}: {message}"
        else:
            why = (f"not known: {outage}; chunk {chunk.number} ended {state_name}" + (f" ({message})" if message else "")
                   + " and its report was not read")
        return {p.index: failed_item(p, why, self.out) for p in chunk.pairs}

    def _read_report(self, key: str) -> dict | None:
        try:
            return json.loads(retrying(lambda: self.out.read(key), health=self.health)[0])
        except (StorageError, ValueError):
            return None


def live_before_done(plans: list[PairPlan], chunk_size: int, output_uri: str, redo: bool = False) -> dict:
    """Content key -> the live chunk run of every chunk of the full plan, read BEFORE the done set.

    The order is what makes adoption sound: a chunk run that completes after this read was live in
    it and is merged (``start_chunks``; one that crashes or is cancelled meanwhile gets a new run);
    one that ended before it wrote its sidecars before the done set was read, so its pairs are
    done. Read after the done set (old), a run ending in between was neither, and its chunk ran
    twice. Left: a run another parent starts after this read and that completes before this
    parent starts its chunks is run again (it must fit a whole chunk into the done set's read).
    One query per 200 chunks."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return live_chunk_runs(client, [key for key, _ in plan_chunks(plans, chunk_size, output_uri, redo=redo)])


def _still_adoptable(client, live: dict, keys: list[str]) -> dict:
    """The runs of ``live`` for ``keys``, read again now (their state and tags as they are): one
    that is still live, or Completed since (merged as it ended), is kept; one that ended Failed,
    Crashed or Cancelled since, or is being cancelled or paused, is dropped, so its pairs get a new
    run (which skips what it wrote)."""
    ids = {str(live[k].id): k for k in keys if k in live}
    kept = {}
    for now in read_children(client, list(ids)) if ids else []:
        if now.state and now.state.type in (*LIVE_STATES, StateType.COMPLETED):  # not Cancelling, not Paused
            kept[ids[str(now.id)]] = now
    return kept


def chunk_parameters(pairs: list[PairPlan], output: OutputSpec, params: StyleParams, run: RunOptions,
                     weights_id: str, report_key: str) -> dict:
    """The parameters of a stylize-chunk run (JSON): its pairs' plans inline, and the run's settings."""
    return {"pairs": [asdict(p) for p in pairs], "output": output.model_dump(mode="json"),
            "params": params.model_dump(mode="json"), "run": run.model_dump(mode="json"),
            "weights_id": weights_id, "report_key": report_key}


def start_chunks(plans: list[PairPlan], done: set[int], output: OutputSpec, params: StyleParams, run: RunOptions,
                 weights_id: str, parent_id: str, live: dict) -> list[Chunk]:
    """One ``run.chunk_deployment`` run per chunk of ``plan_chunks``, tagged with the parent and
    its content. A chunk adopts the run of its content (any parent's) that was live in ``live``
    (``live_before_done``) and is still live or Completed; else the run live now, counted first,
    then read (see start_chunk); else it starts one."""
    from prefect.client.orchestration import get_client

    worker_run = run.model_copy(update={"devices": ["auto"]})  # a worker leases the devices it has
    planned = plan_chunks(plans, run.chunk_size, output.uri, done, redo=not run.skip_existing)
    chunks, started, rejoined, adopted = [], 0, 0, 0
    with get_client(sync_client=True) as client:
        adopt = _still_adoptable(client, live, [key for key, _ in planned])
        fresh = [key for key, _ in planned if key not in adopt]
        earlier = {key: _runs_of(client, key) for key in fresh}
        adopt.update(live_chunk_runs(client, fresh))
        for n, (key, pairs) in enumerate(planned):
            if stop_requested.is_set():
                raise PairStopped("run interrupted while starting its chunk runs")
            child = adopt.get(key)
            start = partial(start_chunk, deployment=run.chunk_deployment, key=key,
                            parameters=chunk_parameters(pairs, output, params, worker_run, weights_id,
                                                        chunk_report_key(parent_id, key)),
                name=f"{flow_run.get_name() or 'stylize-batch'}-chunk-{n:04d}", tags=[parent_tag(parent_id)])
            new = child is None
            if new:
                child = start(client, earlier=earlier[key])  # maybe the run another parent started just now
            if parent_tag(parent_id) not in (child.tags or []):
                adopted += 1
            elif new:
                started += 1
            else:
                rejoined += 1  # a Retry keeps its flow run id: its earlier attempt's run, still going
            _join(client, child, parent_id)
            # the run's own parameters name its report (an adopted run reports under its first parent)
            todo = [p for p in pairs if p.index not in done]
            chunks.append(Chunk(n, todo, (child.parameters or {}).get("report_key", ""), str(child.id), restart=start,
                                already_done=len(pairs) - len(todo)))
    get_run_logger().info("%d chunk runs of %s (chunk size %d): %d started, %d rejoined from this run's earlier "
                          "attempt, %d adopted from other parents", len(chunks), run.chunk_deployment, run.chunk_size,
                          started, rejoined, adopted)
    return chunks


def fan_out_to_workers(
    plans: list[PairPlan], done: set[int], output: OutputSpec, params: StyleParams, run: RunOptions,
    weights_id: str, parent_id: str, on_done: Callable[[int, int], None],
    credentials: StorageCredentials = DEFAULT_CHAIN, health: StorageHealth | None = None, *, live: dict,
    result: PipelineResult | None = None,
) -> PipelineResult:
    """Start the chunk runs of the plan (``start_chunks``, adopting those of ``live``), wait for all (``ChunkWatcher``) and merge
    their chunk reports, read with ``credentials`` (each chunk run resolves its own from ``output``)
    and heard by ``health`` (the parent's StorageHealth: an outage there, or in a chunk run, ends
    the wait). Anything that ends the wait early (Ctrl-C, an error, the stop flag) cancels the
    unfinished chunk runs first; ``result`` then holds the chunks merged before."""
    from prefect.client.orchestration import get_client

    try:
        chunks = start_chunks(plans, done, output, params, run, weights_id, parent_id, live)
        n_todo = sum(1 for p in plans if p.runnable and p.index not in done)
        with get_client(sync_client=True) as client:
            watcher = ChunkWatcher(client, chunks, open_storage(output.uri, credentials), run, on_done, n_todo,
                                   health, parent_id, result)
            return watcher.wait()
    except (KeyboardInterrupt, SystemExit, TerminationSignal):
        raise  # a stop: the flow marks its report and card first, then cancels (cancel_stopped_children)
    except BaseException:
        cancel_stopped_children(parent_id)
        raise


def cancel_stopped_children(parent_id: str) -> None:
    """Cancel the unfinished chunk runs of a parent that stopped before they finished (best effort:
    the API may be what failed)."""
    try:
        cancel_children(parent_id, f"{PARENT_STOPPED} stopped before its chunks finished")
    except Exception as err:  # the API is gone too: nothing more to do here
        get_run_logger().warning("could not cancel the chunk runs: %s", err)
