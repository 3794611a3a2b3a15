"""Flow ``stylize-batch``: preflight, plan, run, report, verdict.

1. Preflight before any fan-out: output writable (the probe is the run's report key with status
   "running", overwritten at the end; "crashed" if the run stops without its report),
   leftover temp files of a crashed run cleaned, weights loadable, source listable and non-empty.
2. Plan (``tasks.plan``): identities, names and keys; inputs outside ``run.allowed_sources`` or
   unidentifiable fail their pair. List the output once; skip pairs done by the one done rule
   (``tasks.contract``: image and sidecar exist, the sidecar's key is the planned key).
3. Run the rest: one ``pair`` task per pair in a sliding window of ``run.window`` (``tasks.pipeline``),
   computed in device steps of up to ``run.pairs_per_step`` pairs of one output size (``tasks.steps``),
   or one stylize-chunk run per chunk of the full plan on the GPU pool (``fan_out: workers``:
   ``flows.fanout``). Cancelling, interrupting or crashing the parent cancels its unfinished chunk runs.
4. Report: ``{output}/_runs/{flow_run_id}.json``, a contact sheet beside it, Prefect artifacts.
5. Verdict: Failed with "k of n pairs failed (report: URI)" when k > run.max_failures, else Completed.

After preflight, reports of this output that still say "running" while their flow runs ended
(or are unknown to the Prefect API) are marked crashed (``flows.orphans``). Storage that stops
answering mid-run (``tasks.storage.StorageHealth``, shared by the run's storage calls) ends the
run: no pair is started any more, the rest are reported "not run: storage unreachable since
HH:MM:SS UTC", the report gets one try, and the run ends Failed with that reason (``_outage``).

The storage credentials block named by ``output.storage_credentials`` is resolved once, on entry,
and every storage call of the run gets that value (``tasks.credentials``).
"""

from __future__ import annotations

import contextvars
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from prefect import flow, get_run_logger, runtime
from prefect.exceptions import TerminationSignal
from pydantic import Field
from prefect.states import Cancelled, Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from flows.fanout import (API_PAGE, PARENT_STOPPED, cancel_children, cancel_stopped_children, check_chunk_deployment,
                          fan_out_to_workers, live_before_done)
from flows.quiet import quiet_returned_failures
from flows.orphans import api_identity, mark_crashed_reports, still_running, this_process
from nst_core.errors import NSTError
from nst_core.params import StyleParams
from nst_core.uris import absolute_local
from nst_core.weights import portable_weights
from tasks.artifacts import RunProgress, publish_artifacts, run_label, run_warning, write_pictures
from tasks.compute import device_problem, expand_devices, run_on_device
from tasks.contract import (CANCELLED, CRASHED, DONE, FAILED, PairPlan, ReportItem, done_in, done_item, failed_item,
                            renamed_output, repeats_follow_their_first, report_bytes, report_key, run_report,
                            output_health, running_report, skipped_item, stopped_report, totals_line)
from tasks.credentials import CREDENTIALS_REFUSED, DEFAULT_CHAIN, CredentialsError, StorageCredentials, resolve
from tasks.models import BatchSource, InvalidInputs, OutputSpec, RunOptions, StyleForm, batch_inputs
from tasks.pair import PairContext, stop_requested
from tasks.pipeline import PipelineResult, run_pairs
from tasks.plan import PreflightError, default_allowed_sources, plan_pairs, refuse_outputs_over_inputs, source_entries
from tasks.storage import (LocalStorage, Storage, StorageError, StorageHealth, open_storage,
                           retrying, weights_reader, within)

__all__ = ["stylize_batch", "preflight", "on_pair_done"]

# A refused run ends Failed with its one line, without the engine's traceback of the returned state.
quiet_returned_failures()

#: Flow run ids of the stylize-batch runs started in this process: what `nst` records crashed when
#: it must exit at once (a second Ctrl-C) before the engine recorded the run's end (a run that
#: ended refuses the change). An id leaves when the engine has recorded its run's end (the state
#: hooks below), which is after the flow body returns.
in_progress: set[str] = set()

#: Set by the CLI to draw a progress bar: called with (finished pairs, pairs to run).
on_pair_done: contextvars.ContextVar[Callable[[int, int], None] | None] = contextvars.ContextVar(
    "on_pair_done", default=None)


def _refuse_output_inside_a_source(out: Storage, source: BatchSource, credentials: StorageCredentials) -> None:
    """PreflightError if the output lies within the contents or styles prefix: the next run would
    list this run's images, contact sheets and loss curves as new inputs, more every night. (A
    manifest names its objects: its output may be anywhere.)"""
    for side in ("contents", "styles"):
        prefix = getattr(source, side, None)
        if prefix and within(out, src := open_storage(prefix, credentials)):
            raise PreflightError(f"output {out.uri} is inside the {side} prefix {src.uri}: the next run would "
                                 f"list this run's results as {side}; write them elsewhere")


def preflight(source: BatchSource, output: OutputSpec, params: StyleParams, devices: list[str],
              run: dict | None = None, credentials: StorageCredentials = DEFAULT_CHAIN,
              chunk_deployment: str | None = None):
    """Checks that fail fast, before any fan-out. Returns (entries, weights_id).

    The write probe is the run's own report key, written with status "running" and overwritten by
    the report at the end: nothing extra is left in the output, and no DeleteObject is needed."""
    from nst_core.vgg import extractor_for

    try:  # a prefix whose key the tool cannot read as written (a drive-like "t:in/"): one line, not a traceback
        out = open_storage(output.uri, credentials)
        _refuse_output_inside_a_source(out, source, credentials)
    except StorageError as err:
        raise PreflightError(str(err)) from None
    own = run is None  # called on its own (no run report to come): remove the probe where allowed
    run = run or {"id": f"preflight-{uuid.uuid4().hex}", "name": ""}
    probe = report_bytes(running_report(run, process=this_process(), api=api_identity()))
    try:
        retrying(lambda: out.write(_report_key(run), probe, "application/json"))
    except (StorageError, OSError) as err:
        raise PreflightError(f"output {output.uri} is not writable: {err}") from None
    try:
        if isinstance(out, LocalStorage):
            try:
                out.clean_temp()
            except StorageError as err:
                raise PreflightError(f"output {output.uri}: {err}") from None
        # A fan-out parent computes nothing: it checks the weights on the CPU (the control pool has no
        # GPU; the chunk runs load them on theirs), so device "cuda" is not refused here.
        device = "cpu" if chunk_deployment else devices[0]
        if not chunk_deployment and (why := device_problem(devices)):
            raise PreflightError(why)
        try:
            first = params.model_copy(update={"device": device})
            extractor = run_on_device(device, lambda: extractor_for(first, opener=weights_reader(credentials)))
        except NSTError as err:
            raise PreflightError(f"weights: {err}") from None
        if chunk_deployment:  # fan_out=workers: before the plan lists every input
            check_chunk_deployment(chunk_deployment)
        entries = source_entries(source, credentials)
    except PreflightError as err:
        _drop_probe(out, run, f"preflight failed: {err}")
        raise
    if own:
        _drop_probe(out, run, "")
    return entries, extractor.weights_id


def _report_key(run: dict) -> str:
    """This attempt's report key (``run``: {id, name, attempt}): a Retry of a finished run (the same
    flow run id, run again) writes its own, never over an earlier attempt's."""
    return report_key(run["id"], run.get("attempt", 1))


def _drop_probe(out: Storage, run: dict, error: str) -> None:
    """Remove the "running" report of a run that stops before its report; where deleting is not
    allowed, overwrite it so that it says the run failed."""
    try:
        out.delete(_report_key(run))
    except (StorageError, OSError):
        try:
            retrying(lambda: out.write(_report_key(run), report_bytes(stopped_report(run, FAILED, error)),
                                       "application/json"))
        except (StorageError, OSError):
            pass


def _mark_stopped(out: Storage, run: dict, error: str, status: str = CRASHED,
                  items: list[ReportItem] | None = None) -> None:
    """Replace the "running" report (the write probe) of a run that stops without its report;
    ``items``: what it knows of each pair, once planned."""
    try:
        out.write(_report_key(run), report_bytes(stopped_report(run, status, error, items)), "application/json")
    except Exception:
        pass  # the storage may be what failed


#: How long a stopping run looks in storage for pairs made but not collected (fan_out=workers: a
#: chunk's pairs reach the parent only when the whole chunk ends; a chunk run may have made 49 of 50).
#: Bounded: a cancel from the UI gives the run 30 s, and its chunk runs are cancelled after this.
STOPPED_LOOKUP_S = 5.0


def _made_before_the_stop(b: _Batch, plans: list[PairPlan]) -> set[int]:
    """Indexes of ``plans`` done by the done rule in storage, looked up once per run for at most
    STOPPED_LOOKUP_S, in one daemon thread (no pool, whose workers the interpreter joins at exit: a
    storage that does not answer cannot hold the exit). Only with skip_existing: without it a
    result of an earlier run under the same key would count as this run's."""
    if b.made_at_stop is None and not b.run.skip_existing:
        b.made_at_stop = set()
    if b.made_at_stop is None:
        found: list[set[int]] = []

        def look() -> None:
            try:  # many pairs: one listing; a few: one HEAD and one read each
                found.append(done_in(b.out, plans, list_once=len(plans) > 64, io_workers=1, health=b.health))
            except Exception:  # noqa: BLE001 (the storage may be why the run stopped: report them unfinished)
                pass

        looking = threading.Thread(target=look, name="nst-stopped-lookup", daemon=True)
        looking.start()
        looking.join(STOPPED_LOOKUP_S)
        b.made_at_stop = found[0] if found else set()
    return b.made_at_stop


def _stopped_items(b: _Batch, why: str, look: bool = True) -> list[ReportItem] | None:
    """Each planned pair of a run that stopped part-way: skipped or failed at planning, finished
    (done or failed) before the stop, done by the done rule in storage (made, not yet collected;
    ``look``: ask storage now, else only what an earlier call found), or failed "the run stopped
    before the pair finished (why)". None before the plan. Read in the flow's thread, where the
    pairs are collected."""
    if not b.plans:
        return None
    items = {**b.items, **b.result.items}
    unfinished = [p for p in b.plans if p.index not in items and p.duplicate_of < 0 and p.runnable]
    made = (_made_before_the_stop(b, unfinished) if look else b.made_at_stop or set()) if unfinished else set()
    for p in b.plans:
        if p.index not in items and p.duplicate_of < 0:
            items[p.index] = (done_item(p, b.out) if p.index in made
                              else failed_item(p, f"the run stopped before the pair finished ({why})", b.out))
    items = repeats_follow_their_first(items, b.plans, b.out)
    return [items[p.index] for p in b.plans if p.index in items]


#: How long a stopping run waits for the API to say whether it is being cancelled.
CANCEL_LOOKUP_S = 5.0


def _cancelled(flow_run_id: str) -> str | None:
    """"cancelled[: its message]" when the API says the flow run is Cancelling or Cancelled, else
    None. The UI's Cancel sets Cancelling; the runner or worker then SIGTERMs the run's process,
    which the flow body sees as TerminationSignal, like any other SIGTERM. Asked in a thread for
    at most CANCEL_LOOKUP_S: an API that does not answer cannot hold the exit (None then)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    found: list[str] = []

    def ask() -> None:
        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(uuid.UUID(flow_run_id)).state
        except Exception:
            return  # no answer: the report says crashed, with the signal
        if state is not None and state.type in (StateType.CANCELLING, StateType.CANCELLED):
            found.append(f"cancelled: {state.message}" if state.message else "cancelled")

    # in this context: the API the run uses may be set in it (temporary settings), not in the environment
    asking = threading.Thread(target=contextvars.copy_context().run, args=(ask,), name="nst-cancel-lookup", daemon=True)
    asking.start()
    asking.join(CANCEL_LOOKUP_S)
    return found[0] if found else None


def superseded() -> str | None:
    """Why this run stands down, or None: it is a scheduled run (a nightly) and a later scheduled
    run of its deployment is due too and not over. After days of a worker pool's downtime, Prefect
    starts every late nightly at once: each planned the whole dataset, and their chunk runs queued
    on the GPU pool behind each other's. The latest runs the dataset; the others end Cancelled,
    naming it. A run started by hand (the UI's Run, nst batch, a Retry of a cancelled one) is never
    superseded, nor is one whose later run passes other parameters; an API that cannot say lets
    the run go on."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterDeploymentId,
                                                FlowRunFilterExpectedStartTime, FlowRunFilterId,
                                                FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx is not None else None
    if run is None or run.deployment_id is None or not run.auto_scheduled or run.run_count > 1:
        return None
    now = datetime.now(timezone.utc)
    due = FlowRunFilter(
        id=FlowRunFilterId(not_any_=[run.id]),
        deployment_id=FlowRunFilterDeploymentId(any_=[run.deployment_id]),
        tags=FlowRunFilterTags(all_=["auto-scheduled"]),
        expected_start_time=FlowRunFilterExpectedStartTime(after_=run.expected_start_time, before_=now),
        state=FlowRunFilterState(type=FlowRunFilterStateType(
            any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING])))

    def newer_same(found) -> bool:
        # the same parameters only: a deployment's schedules may each pass their own (another
        # dataset); a run moved to a later time (rescheduled, waiting to retry) is not due yet
        # (expected_start_time is its first scheduled time, never moved)
        when = found.state.state_details.scheduled_time if found.state and found.state.is_scheduled() else None
        return (found.parameters == run.parameters and found.expected_start_time > run.expected_start_time
                and (when is None or when <= now))

    same, offset = [], 0
    try:
        with get_client(sync_client=True) as client:
            while not same:  # page by page: another schedule's due runs may fill whole pages
                found = client.read_flow_runs(flow_run_filter=due, sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                                              limit=API_PAGE, offset=offset)
                same, offset = [r for r in found if newer_same(r)], offset + API_PAGE
                if len(found) < API_PAGE:
                    break
    except Exception:
        return None
    if not same:
        return None
    newer = same[0]
    return (f"superseded: the scheduled run {newer.name} ({newer.id}) of "
            f"{newer.expected_start_time:%Y-%m-%d %H:%M} UTC is due too and runs the same dataset")


# Hooks are called with keywords (flow=, flow_run=, state=) by a Runner, positionally by the engine.
def _ended(flow, flow_run, state) -> None:
    """The engine recorded the run's end: nothing left for an exit at once to record."""
    in_progress.discard(str(flow_run.id))


def _on_cancel(flow, flow_run, state) -> None:
    try:
        cancel_children(str(flow_run.id))
    finally:  # after: an exit at once meanwhile must still find the run and cancel its chunk runs
        _ended(flow, flow_run, state)


def _on_crash(flow, flow_run, state) -> None:
    """The run crashed: replace the "running" report (the write probe), if it still says so, with
    one that says the run stopped (best effort). Its chunk runs stop with it only when the crash
    happened in this process (the engine saw it: a Kubernetes or Docker worker's Cancel is a plain
    SIGTERM). A worker runs this hook too, in its own process, once the flow's process died (kill -9,
    an OOM kill): then the chunk runs go on on their GPU workers and the next run adopts them;
    cancelled here, the pairs they were computing were lost and made again."""
    try:
        if str(flow_run.id) in in_progress:
            cancel_children(str(flow_run.id), f"{PARENT_STOPPED} crashed")
    except Exception:
        pass
    finally:  # after: an exit at once meanwhile must still find the run and cancel its chunk runs
        _ended(flow, flow_run, state)
    try:
        output = (flow_run.parameters or {}).get("output") or {}
        if not isinstance(output, dict):
            output = output.model_dump()
        if output.get("uri"):
            out = open_storage(output["uri"], resolve(output.get("storage_credentials") or ""))
            run = {"id": str(flow_run.id), "name": flow_run.name, "attempt": flow_run.run_count or 1}
            # only the write probe: the flow body may have said "cancelled" already (a Kubernetes
            # or Docker worker's Cancel reaches the flow as a plain SIGTERM, and Prefect calls it a crash)
            if still_running(out, _report_key(run)) is not None:
                _mark_stopped(out, run, (state.message or state.name) if state else "")
    except Exception:
        pass


@dataclass
class _Batch:
    """One run's validated arguments and what its steps share."""

    source: BatchSource
    output: OutputSpec
    params: StyleParams
    run: RunOptions
    credentials: StorageCredentials
    flow_run: dict = field(init=False)  # {id, name}
    devices: list[str] = field(init=False)
    out: Storage = field(init=False)
    started: datetime = field(init=False)
    health: StorageHealth = field(init=False)  # every storage call of the run reports here
    progress: RunProgress | None = field(init=False, default=None)  # the progress card, once the pairs start
    # what a run stopped part-way reports: the plan, the items known before running, the pairs finished
    plans: list[PairPlan] = field(init=False, default_factory=list)
    items: dict[int, ReportItem] = field(init=False, default_factory=dict)
    result: PipelineResult = field(init=False, default_factory=PipelineResult)
    made_at_stop: set[int] | None = field(init=False, default=None)  # _made_before_the_stop's answer

    def __post_init__(self):
        run_id = runtime.flow_run.get_id() or f"local-{uuid.uuid4().hex}"
        # attempt: Prefect's Retry runs a finished flow run again under the same id (run_count 2, 3, ...)
        self.flow_run = {"id": run_id, "name": runtime.flow_run.get_name() or run_id,
                         "attempt": max(1, runtime.flow_run.get_run_count() or 1)}
        self.started = datetime.now(timezone.utc)
        self.devices = expand_devices(self.run.devices, self.params.device)
        self.out = open_storage(self.output.uri, self.credentials)
        self.health = output_health(self.out)


def _plan(b: _Batch) -> tuple[list[PairPlan], str, list[str]]:
    """Preflight, then plan inside the allowed sources. Returns (plans, weights id, allowed sources)."""
    entries, weights_id = preflight(b.source, b.output, b.params, b.devices, b.flow_run, b.credentials,
                                    b.run.chunk_deployment if b.run.fan_out == "workers" else None)
    allowed = b.run.allowed_sources or default_allowed_sources(b.source)
    try:
        plans = plan_pairs(entries, b.params, weights_id, b.output.format, b.output.quality, b.run.io_workers, allowed,
                           b.credentials, fold_case=b.out.folds_case(), tree=isinstance(b.out, LocalStorage))
    except PreflightError as err:
        _drop_probe(b.out, b.flow_run, f"preflight failed: {err}")
        raise
    plans = refuse_outputs_over_inputs(plans, b.out, getattr(b.source, "manifest", None))
    renamed = [(e, to) for e in entries if (to := renamed_output(e.output, b.output.format))]
    if renamed:  # the run's format decides the extension: say so rather than write another file than the row names
        e, to = renamed[0]
        get_run_logger().warning("%d manifest row(s) name an output written under another name (the run's format, %s, "
                                 "decides the extension); e.g. %s: %s written as %s", len(renamed), b.output.format,
                                 e.where, e.output, to)
    return plans, weights_id, allowed


def _skip(b: _Batch, plans: list[PairPlan], weights_id: str) -> tuple[dict[int, ReportItem], list[PairPlan], set[int]]:
    """The report items of the pairs not to run (failed at planning, repeated, done by the done rule
    on one listing of the output), and the pairs to run. Returns (items by index, to run, done)."""
    logger = get_run_logger()
    done = done_in(b.out, plans, io_workers=b.run.io_workers, health=b.health) if b.run.skip_existing else set()
    items: dict[int, ReportItem] = {}
    todo: list[PairPlan] = []
    for p in plans:
        if p.error:
            items[p.index] = failed_item(p, p.error, b.out)  # with the output its row asked for, if any
            logger.error("pair %s x %s failed at planning: %s", p.content, p.style, p.error)
        elif p.duplicate_of >= 0:
            items[p.index] = skipped_item(p, b.out, duplicate_of=plans[p.duplicate_of])
        elif p.index in done:
            items[p.index] = skipped_item(p, b.out)
        else:
            todo.append(p)
    logger.info("%d pairs: %d to run, %d already done, %d failed at planning; devices %s; weights %s",
                len(plans), len(todo), len(done), sum(bool(p.error) for p in plans), b.devices, weights_id)
    return items, todo, done


def _run(b: _Batch, plans: list[PairPlan], todo: list[PairPlan], done: set[int], weights_id: str,
         allowed: list[str], already: int = 0, live: dict | None = None) -> PipelineResult:
    """``todo`` in a window of pair tasks here, or in chunk runs on the GPU pool (adopting those of
    ``live``, the chunk runs live before ``done`` was read); progress is
    reported to the progress artifact (throttled; ``already``: pairs skipped as done) and the CLI's bar."""
    progress = RunProgress(len(todo), pairs=len(plans), already=already,
                           run_name=run_label(b.flow_run["name"], b.flow_run["attempt"]))
    b.progress = progress
    hook = on_pair_done.get()

    def on_done(finished: int, total: int) -> None:
        if hook:
            hook(finished, total)
        progress.update(finished)

    if b.run.fan_out == "workers" and todo:
        # the chunk runs read only where this run may: the resolved list, never the empty default;
        # every local place absolute, as they run in their workers' working folders, not this one's
        # (the output is, since stylize_batch began)
        run = b.run.model_copy(update={"allowed_sources": [absolute_local(a) for a in allowed]})
        params = b.params.model_copy(update={"weights": portable_weights(b.params.weights)})
        result = fan_out_to_workers(plans, done, b.output, params, run,
                                    weights_id, b.flow_run["id"], on_done, b.credentials, b.health, live=live or {},
                                    result=b.result)
    else:
        ctx = PairContext(b.output, b.params, b.devices, weights_id, b.run.labels, b.run.io_workers,
                          b.run.pair_timeout_s, {"id": b.flow_run["id"], "name": b.flow_run["name"]},
                          credentials=b.credentials, health=b.health, pairs_per_step=b.run.pairs_per_step,
                          recheck_done=b.run.skip_existing)
        result = run_pairs(todo, ctx, b.run.window, b.run.contact_sheet_rows, on_done, result=b.result)
    if b.health.unreachable_since() is None:  # else _outage says the run stopped, and why
        progress.update(len(todo), final=True)
    return result


def _write_report(b: _Batch, items: list[ReportItem], result: PipelineResult, weights_id: str) -> dict:
    """The contact sheet and loss curve, then the run report over the write probe. Returns the report."""
    # local fan-out: the k-th thumbnail row is the k-th pair run_pairs finished (captions exact)
    thumb_items = ([i.as_dict() for i in result.items.values() if i.status == DONE][:len(result.thumbs)]
                   if b.run.fan_out == "local" else None)
    pictures = write_pictures(b.out, b.flow_run["id"], [i.as_dict() for i in items], result.thumbs, thumb_items,
                              run_warning(weights_id, b.run.labels), b.run.io_workers, attempt=b.flow_run["attempt"])
    key = _report_key(b.flow_run)
    report = run_report(b.flow_run, b.out.uri_for(key), b.started,
                        {"source": b.source, "output": b.output, "params": b.params, "run": b.run},
                        weights_id, b.devices, items, pictures, result.chunks)
    retrying(lambda: b.out.write(key, report_bytes(report, indent=2), "application/json"))
    return report


def _outage(b: _Batch, items: list[ReportItem], result: PipelineResult, weights_id: str) -> State:
    """The end of a run whose storage stopped answering, or refused writes: the report (no pictures: they need the
    storage) gets one try, bounded by the request timeouts; the artifacts show the pairs; Failed."""
    key = _report_key(b.flow_run)
    report = run_report(b.flow_run, b.out.uri_for(key), b.started,
                        {"source": b.source, "output": b.output, "params": b.params, "run": b.run},
                        weights_id, b.devices, items, {"contact_sheet": None, "loss_curve": None}, result.chunks)
    try:
        b.out.write(key, report_bytes(report, indent=2), "application/json")
        written, unwritten = "", ""
    except (StorageError, OSError) as err:
        written = ", not written: the next run on this output marks it crashed"
        unwritten = str(b.health.stop_error() or err)
    counts = report["totals"]
    stop = b.health.stop_error()
    message = (f"{stop}: {counts['failed']} of {counts['pairs']} pairs failed "
               f"(report: {report['report']}{written})")
    if b.progress is not None:  # not "n of n finished": the pairs left were never run
        b.progress.stopped(str(stop))
    try:
        publish_artifacts(report, b.out, b.output.link_expiry_hours, run_warning(weights_id, b.run.labels),
                          unwritten=unwritten)
    except Exception as err:  # as in a run that ended well: the cards never replace the run's own verdict
        get_run_logger().warning("artifacts not published: %s: %s", type(err).__name__, err)
    get_run_logger().error(message)
    return Failed(message=message)


def _verdict(report: dict, max_failures: int) -> State:
    counts = report["totals"]
    summary = totals_line(counts)
    get_run_logger().info("%s (report: %s)", summary, report["report"])
    if counts["failed"] > max_failures:
        # No data=: Prefect 3 treats a Failed state's data as its exception ("Unexpected result
        # for failed state" with the whole report otherwise). The report is in storage.
        return Failed(message=f"{counts['failed']} of {counts['pairs']} pairs failed (report: {report['report']})")
    return Completed(message=f"{summary} (report: {report['report']})", data=report)


# validate_parameters=False: the flow validates its arguments itself, first thing (batch_inputs),
# so a run created without the API's schema check fails at once with one line, not a traceback.
@flow(name="stylize-batch", task_runner=ThreadPoolTaskRunner(max_workers=1024 + 16), persist_result=False,
      on_completion=[_ended], on_failure=[_ended], on_cancellation=[_on_cancel], on_crashed=[_on_crash],
      validate_parameters=False,
      description="Stylize every content/style pair of a dataset (S3 or folder) and write results, sidecars and a run report.")
def stylize_batch(
    source: BatchSource = Field(
        description="The content/style pairs: two prefixes (content images, style images) or a manifest.",
        json_schema_extra={"title": "Images to stylize"}),
    output: OutputSpec = Field(
        description="Where stylized images, JSON sidecars and the run report are written.",
        json_schema_extra={"title": "Where results go"}),
    params: StyleForm = Field(
        StyleParams(), description="Everyday first: size, iterations, loss weights; then layers, weights, seed.",
        json_schema_extra={"title": "Style settings"}),
    run: RunOptions = Field(
        RunOptions(), description="Where the work runs (fan-out to GPU workers), failures tolerated, limits.",
        json_schema_extra={"title": "Run settings"}),
):
    """Neural style transfer over a dataset in object storage or a folder.

    Args:
        source: The content/style pairs: a manifest, or content and style prefixes.
        output: Where stylized images, JSON sidecars and the run report are written.
        params: Style-transfer parameters (VGG16 layers, loss weights, iterations, size, weights).
        run: How the run executes: failures tolerated, skipping, devices, fan-out to GPU workers.
    """
    try:
        source, output, params, run = batch_inputs(source, output, params, run)
        credentials = resolve(output.storage_credentials)  # "" = boto3's default chain
    except InvalidInputs as err:
        return Failed(message=str(err))
    except CredentialsError as err:  # a refusal too: the CLI exits 2 on its prefix (REFUSALS)
        return Failed(message=f"{CREDENTIALS_REFUSED} {err}")
    if run.fan_out == "workers":  # chunk runs write it from their workers' working folders, and key by it
        output = output.model_copy(update={"uri": absolute_local(output.uri)})
    if (why := superseded()) is not None:
        get_run_logger().info("%s; this run stands down", why)
        return Cancelled(message=why)
    stop_requested.clear()
    try:
        b = _Batch(source, output, params, run, credentials)
    except StorageError as err:  # an output prefix the tool cannot read as written (s3://b/t:out/)
        get_run_logger().error("preflight failed: %s", err)
        return Failed(message=f"preflight failed: {err}")
    reported = False  # the final report is written: never replace it
    in_progress.add(b.flow_run["id"])
    try:
        try:
            plans, weights_id, allowed = _plan(b)
        except PreflightError as err:  # a refusal before any work: one line, no traceback
            get_run_logger().error("preflight failed: %s", err)
            return Failed(message=f"preflight failed: {err}")
        # the chunk runs in flight are read before the done set, never after: see live_before_done
        live = (live_before_done(plans, run.chunk_size, output.uri, redo=not run.skip_existing)
                if run.fan_out == "workers" else None)
        # a crashed parent's chunk runs that this run adopts keep running (the rest are cancelled)
        mark_crashed_reports(b.out, b.flow_run, spare={str(r.id) for r in (live or {}).values()})
        items, todo, done = _skip(b, plans, weights_id)
        b.plans, b.items = plans, items
        # already: what the done rule found made, not repeats (their outcome is their first's, known only after the run)
        result = _run(b, plans, todo, done, weights_id, allowed, already=len(done), live=live)
        items = repeats_follow_their_first({**items, **result.items}, plans, b.out)
        if b.health.unreachable_since() is not None:
            return _outage(b, [items[p.index] for p in plans if p.index in items], result, weights_id)
        report = _write_report(b, [items[p.index] for p in plans if p.index in items], result, weights_id)
        reported = True
        try:
            publish_artifacts(report, b.out, output.link_expiry_hours, run_warning(weights_id, run.labels),
                              seconds=(datetime.now(timezone.utc) - b.started).total_seconds())
        except Exception as err:  # the cards are a view of the report, which is written: never fail the run over them
            get_run_logger().warning("artifacts not published (the run's report %s is complete): %s: %s",
                                     report["report"], type(err).__name__, err)
        return _verdict(report, run.max_failures)
    except BaseException as err:  # Ctrl-C, SIGTERM, an unhandled error: the report must not say "running"
        # and the pairs still running stop at their next evaluation: the task runner waits for them
        # before the run can record its end (SIGTERM, or a cancel, waited for whole pairs)
        stop_requested.set()
        if not reported:
            why = f"{type(err).__name__}: {err}".rstrip(": ")
            # first without asking storage (a second signal during the lookup must not leave "running"),
            # then again with the pairs found made
            _mark_stopped(b.out, b.flow_run, why, items=_stopped_items(b, why, look=False))
            if b.plans:
                _mark_stopped(b.out, b.flow_run, why, items=_stopped_items(b, why))
            # then, a SIGTERM of a run being cancelled (the UI's Cancel) says so: written second, so
            # that a second signal during the lookup leaves "crashed", not "running"
            if isinstance(err, TerminationSignal) and (cancelled := _cancelled(b.flow_run["id"])):
                _mark_stopped(b.out, b.flow_run, cancelled, CANCELLED, _stopped_items(b, cancelled))
                why = cancelled
            if b.progress is not None:  # after the report: its card would keep its rate and ETA
                b.progress.stopped(why, found=len(b.made_at_stop or ()))
        if run.fan_out == "workers" and isinstance(err, (KeyboardInterrupt, SystemExit, TerminationSignal)):
            # last: a nightly's hundreds of chunk runs take as many API calls, and a cancel from the UI
            # gives the run 30 s after SIGTERM; its report and card must not wait for them
            cancel_stopped_children(b.flow_run["id"])
        raise
