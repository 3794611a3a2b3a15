"""Flow ``stylize-batch``: preflight, plan, windowed fan-out, report.

1. Preflight before any fan-out: output writable (the probe is the run's report key with status
   "running", overwritten at the end; "crashed" if the run stops without its report),
   leftover temp files of a crashed run cleaned, weights loadable, source listable and non-empty.
2. Plan (``tasks.plan``): identities, names and keys; inputs outside ``run.allowed_sources`` or
   unidentifiable fail their pair. List the output once; skip pairs done by the one done rule
   (``tasks.contract``: image and sidecar exist, the sidecar's key is the planned key).
3. Run the rest: one ``pair`` task per pair in a sliding window of ``run.window`` (``tasks.pipeline``),
   or one stylize-chunk run per chunk of the full plan on the GPU pool (``fan_out: workers``; keys,
   restarts and deadlines: ``plan_chunks``, ``start_chunk``, ``fan_out_to_workers``). Cancelling,
   interrupting or crashing the parent cancels its unfinished chunk runs.
4. Report: ``{output}/_runs/{flow_run_id}.json``, a contact sheet beside it, Prefect artifacts.
5. Failed with "k of n pairs failed (report: URI)" when k > run.max_failures, else Completed.
"""

from __future__ import annotations

import contextvars
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone

from prefect import flow, get_run_logger
from pydantic import Field
from prefect.runtime import flow_run
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.models import BatchSource, InvalidInputs, OutputSpec, RunOptions, batch_inputs
from nst_core.errors import NSTError
from nst_core.params import StyleParams
from tasks.compute import expand_devices, run_on_device
from tasks.credentials import CredentialsError, activate
from tasks.contract import (PairPlan, ReportItem, chunk_key, chunk_report_key, done_in, report_key,
                            totals)
from tasks.pair import PairContext, PairStopped, stop_requested
from tasks.pipeline import PipelineResult, failed_item, run_pairs
from tasks.plan import PreflightError, default_allowed_sources, plan_pairs, source_entries
from tasks.artifacts import RunProgress, publish_artifacts, write_pictures
from tasks.storage import LocalStorage, StorageError, open_storage, read_uri, retrying

__all__ = ["stylize_batch", "preflight", "fan_out_to_workers", "merge_chunk", "plan_chunks", "cancel_children",
           "read_children", "start_chunk", "on_pair_done", "POLL_S", "API_PAGE", "START_TIMEOUT_S"]

#: Set by the CLI to draw a progress bar: called with (finished pairs, pairs to run).
on_pair_done: contextvars.ContextVar[Callable[[int, int], None] | None] = contextvars.ContextVar(
    "on_pair_done", default=None)

#: Seconds between two polls of the chunk runs (one batched API query each).
POLL_S = 2.0
#: Flow runs per API read: Prefect's /flow_runs/filter answers 422 above PREFECT_SERVER_API_DEFAULT_LIMIT (200).
API_PAGE = 200
#: Queued chunks are cancelled after min(run.chunk_timeout_s, this) with no chunk running, started or
#: finished (no worker polling the pool). Env: NST_CHUNK_START_TIMEOUT_S.
START_TIMEOUT_S = float(os.environ.get("NST_CHUNK_START_TIMEOUT_S", 3600))
#: A chunk that ended without completing is started again at most this many times by one plan.
MAX_CHUNK_ATTEMPTS = 20


def preflight(source: BatchSource, output: OutputSpec, params: StyleParams, devices: list[str],
              run: dict | None = None):
    """Checks that fail fast, before any fan-out. Returns (entries, weights_id).

    The write probe is the run's own report key, written with status "running" and overwritten by
    the report at the end: nothing extra is left in the output, and no DeleteObject is needed."""
    from nst_core.optimize import extractor_for

    out = open_storage(output.uri)
    own = run is None  # called on its own (no run report to come): remove the probe where allowed
    run = run or {"id": f"preflight-{uuid.uuid4().hex}", "name": ""}
    probe = json.dumps({"flow_run": run["name"], "flow_run_id": run["id"], "status": "running",
                        "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode()
    try:
        retrying(lambda: out.write(report_key(run["id"]), probe, "application/json"))
    except (StorageError, OSError) as err:
        raise PreflightError(f"output {output.uri} is not writable: {err}") from None
    try:
        if isinstance(out, LocalStorage):
            out.clean_temp()
        try:
            first = params.model_copy(update={"device": devices[0]})
            weights_id = run_on_device(devices[0], lambda: extractor_for(first, opener=read_uri)).weights_id
        except NSTError as err:
            raise PreflightError(f"weights: {err}") from None
        entries = source_entries(source)
    except PreflightError as err:
        _drop_probe(out, run["id"], f"preflight failed: {err}")
        raise
    if own:
        _drop_probe(out, run["id"], "")
    return entries, weights_id


def _drop_probe(out, run_id: str, error: str) -> None:
    """Remove the "running" report of a run that stops before its report; where deleting is not
    allowed, overwrite it so that it says the run failed."""
    try:
        out.delete(report_key(run_id))
    except (StorageError, OSError):
        try:
            retrying(lambda: out.write(report_key(run_id), json.dumps(
                {"flow_run_id": run_id, "status": "failed", "error": error}).encode(), "application/json"))
        except (StorageError, OSError):
            pass


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


def _parent_tag(parent_id: str) -> str:
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
        query = FlowRunFilter(tags=FlowRunFilterTags(all_=[_parent_tag(parent_id)]))
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


def _on_cancel(flow, run, state) -> None:
    cancel_children(str(run.id))


def _mark_stopped(out, run_id: str, run_name: str, error: str) -> None:
    """Replace the "running" report (the write probe) of a run that stops without its report."""
    try:
        out.write(report_key(run_id), json.dumps(
            {"flow_run": run_name, "flow_run_id": run_id, "status": "crashed", "error": error,
             "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode(), "application/json")
    except Exception:
        pass  # the storage may be what failed


def _on_crash(flow, run, state) -> None:
    """The process died under the flow (a crash the flow body did not see): stop the chunk runs and
    replace the "running" report (the write probe) with one that says the run stopped (best effort)."""
    try:
        cancel_children(str(run.id), "the parent stylize-batch run crashed")
    except Exception:
        pass
    try:
        output = (run.parameters or {}).get("output") or {}
        uri = output.get("uri") if isinstance(output, dict) else getattr(output, "uri", None)
        if uri:
            _mark_stopped(open_storage(uri), str(run.id), run.name, (state.message or state.name) if state else "")
    except Exception:
        pass


def start_chunk(deployment: str, idem: str, parameters: dict, name: str, tags: list[str]):
    """Start (or find, by idempotency key) one chunk run. Returns (flow run, its report key).

    A run found by the key that is Completed is kept (its report is merged); one that ended
    otherwise (Cancelled, Failed, Crashed) is replaced by a new attempt with its own key and
    report key, so a retried parent redoes the chunk instead of reporting its failure again."""
    from prefect.deployments import run_deployment

    for attempt in range(MAX_CHUNK_ATTEMPTS):
        key = idem if attempt == 0 else f"{idem}:attempt-{attempt}"
        report = parameters["report_key"]
        if attempt:
            report = report.removesuffix(".json") + f"-attempt-{attempt}.json"
        child = run_deployment(name=deployment, parameters={**parameters, "report_key": report},
                               flow_run_name=name if attempt == 0 else f"{name}-attempt-{attempt}",
                               idempotency_key=key, tags=tags, timeout=0,  # start them all, then wait
                               as_subflow=True)
        if not (child.state and child.state.is_final() and not child.state.is_completed()):
            return child, (child.parameters or {}).get("report_key", report)
    return child, (child.parameters or {}).get("report_key", report)  # every attempt ended badly: reported failed


def merge_chunk(n: int, chunk: list[PairPlan], state_name: str, message: str, report: dict | None, out,
                io_workers: int = 8) -> dict[int, ReportItem]:
    """A finished chunk's pairs as report items. Pairs its report lacks (or all, without a readable
    report) are judged by the done rule on their sidecars before they are called failed."""
    by_key = {item.get("key"): item for item in (report or {}).get("items", [])}  # by pair key, not position
    missing = [p for p in chunk if p.key not in by_key]
    done = done_in(out, missing, list_once=False, io_workers=io_workers) if missing else set()
    items = {}
    for p in chunk:
        item = by_key.get(p.key)
        if item is not None:
            items[p.index] = ReportItem(**{k: v for k, v in item.items() if k not in ("index", "key")})
        elif p.index in done:
            items[p.index] = ReportItem(p.content, p.style, "done", out.uri_for(p.image_key), out.uri_for(p.sidecar_key))
        else:
            items[p.index] = failed_item(p, f"chunk {n} ended {state_name}: {message}".rstrip(": "), out)
    return items


def fan_out_to_workers(
    plans: list[PairPlan], done: set[int], output: OutputSpec, params: StyleParams, run: RunOptions,
    weights_id: str, parent_id: str, on_done: Callable[[int, int], None],
) -> PipelineResult:
    """One ``run.chunk_deployment`` run per chunk of the plan (``plan_chunks``); wait for all (one
    paged query per poll); merge their chunk reports. A chunk that ends without a readable report:
    its pairs' sidecars decide which are done.

    Deadlines: a chunk that started (left Scheduled) is cancelled ``run.chunk_timeout_s`` after
    ITS start. Chunks still queued are cancelled only when nothing moved for
    min(chunk_timeout_s, START_TIMEOUT_S): no chunk running and none started or finished that long
    (no worker polls the pool, or `nst serve --limit 1`). Anything that ends the wait early (Ctrl-C,
    an error, the stop flag) cancels the unfinished chunk runs first."""
    try:
        return _fan_out(plans, done, output, params, run, weights_id, parent_id, on_done)
    except BaseException:
        try:
            cancel_children(parent_id, "the parent stylize-batch run stopped before its chunks finished")
        except Exception as err:  # the API is gone too: nothing more to do here
            get_run_logger().warning("could not cancel the chunk runs: %s", err)
        raise


def _fan_out(plans, done, output, params, run, weights_id, parent_id, on_done) -> PipelineResult:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelling

    from flows.chunk import decode_thumbs

    logger = get_run_logger()
    out = open_storage(output.uri)
    worker_run = run.model_copy(update={"devices": ["auto"]})  # a worker leases the devices it has
    n_todo = sum(1 for p in plans if p.runnable and p.index not in done)
    children: dict[str, tuple[int, list[PairPlan], str]] = {}  # id -> (chunk number, pairs to run, report key)
    for n, (idem, chunk) in enumerate(plan_chunks(plans, run.chunk_size, parent_id, done)):
        if stop_requested.is_set():
            raise PairStopped("run interrupted while starting its chunk runs")
        report = chunk_report_key(parent_id, idem.rsplit(":", 1)[1])
        child, report = start_chunk(
            run.chunk_deployment, idem,
            {"pairs": [asdict(p) for p in chunk], "output": output.model_dump(mode="json"),
             "params": params.model_dump(mode="json"), "run": worker_run.model_dump(mode="json"),
             "weights_id": weights_id, "report_key": report},
            f"{flow_run.get_name() or 'stylize-batch'}-chunk-{n:04d}", [_parent_tag(parent_id)])
        children[str(child.id)] = (n, [p for p in chunk if p.index not in done], report)
    logger.info("started %d chunk runs of %s (chunk size %d)", len(children), run.chunk_deployment, run.chunk_size)

    result = PipelineResult()
    finished = 0
    settled: set[str] = set()

    def settle(child_id: str, state_name: str, message: str, report: dict | None) -> None:
        nonlocal finished
        n, chunk, key = children[child_id]
        settled.add(child_id)
        for index, item in merge_chunk(n, chunk, state_name, message, report, out, run.io_workers).items():
            result.items[index] = item
            finished += 1
            on_done(finished, n_todo)
        if report:
            room = run.contact_sheet_rows - len(result.thumbs)
            result.thumbs += decode_thumbs(report.get("thumbs", []))[:max(room, 0)]
        result.chunks.append({"chunk": n, "flow_run_id": child_id, "state": state_name, "report": out.uri_for(key),
                              "worker": (report or {}).get("worker")})

    def read_report(key: str) -> dict | None:
        try:
            return json.loads(retrying(lambda: out.read(key))[0])
        except (StorageError, ValueError):
            return None

    start_limit = min(run.chunk_timeout_s, START_TIMEOUT_S)
    last_move = time.monotonic()  # when a chunk last started or finished, or one was seen running
    started: dict[str, float] = {}  # child id -> when it was first seen out of Scheduled
    states: dict[str, str] = {}  # child id -> last state name seen
    with get_client(sync_client=True) as client:

        def cancel(child_id: str, why: str) -> None:
            try:
                client.set_flow_run_state(child_id, Cancelling(message=why), force=True)
            except Exception as err:
                logger.warning("could not cancel chunk run %s: %s", child_id, err)
            settle(child_id, "Cancelled", why, read_report(children[child_id][2]))

        while pending := [i for i in children if i not in settled]:
            if stop_requested.is_set():
                for child_id in pending:
                    cancel(child_id, "the run was interrupted before the chunk finished; cancelled")
                break
            try:
                runs = read_children(client, pending)
            except Exception as err:  # the API hiccuped: poll again, the deadlines still hold
                logger.warning("polling %d chunk runs failed (%s); retrying", len(pending), err)
                runs = []
            now = time.monotonic()
            for child in runs:
                child_id = str(child.id)
                if not child.state:
                    continue
                states[child_id] = child.state.name
                if child.state.is_final():
                    settle(child_id, child.state.name, child.state.message or "",
                           read_report(children[child_id][2]))
                    last_move = now
                elif child.state.type != StateType.SCHEDULED and child_id not in started:
                    started[child_id] = now
            if any(i in started for i in pending if i not in settled):
                last_move = now  # a chunk is running: the queued ones wait for its slot
            for child_id in [i for i in pending if i not in settled]:
                state = states.get(child_id, "unknown")
                if child_id in started and now - started[child_id] > run.chunk_timeout_s:
                    cancel(child_id, f"ran longer than chunk_timeout_s={run.chunk_timeout_s:g} s (still {state}); "
                                     "cancelled")
                elif child_id not in started and now - last_move > start_limit:
                    cancel(child_id, f"not started within {start_limit:g} s (still {state}) while no chunk of this "
                                     f"run was running; is a worker polling the work pool of {run.chunk_deployment}? "
                                     "(with `nst serve`, --limit must be at least 2: this run takes one slot and "
                                     "its chunks need another); cancelled")
            if any(i not in settled for i in children):
                time.sleep(POLL_S)
    result.chunks.sort(key=lambda c: c["chunk"])
    return result


# validate_parameters=False: the flow validates its arguments itself, first thing (batch_inputs),
# so a run created without the API's schema check fails at once with one line, not a traceback.
@flow(name="stylize-batch", task_runner=ThreadPoolTaskRunner(max_workers=1024 + 16), persist_result=False,
      on_cancellation=[_on_cancel], on_crashed=[_on_crash], validate_parameters=False,
      description="Stylize every content/style pair of a dataset (S3 or folder) and write results, sidecars and a run report.")
def stylize_batch(
    source: BatchSource = Field(
        description="The content/style pairs: two prefixes (content images, style images) or a manifest.",
        json_schema_extra={"title": "Images to stylize"}),
    output: OutputSpec = Field(
        description="Where stylized images, JSON sidecars and the run report are written.",
        json_schema_extra={"title": "Where results go"}),
    params: StyleParams = Field(
        StyleParams(), description="Image size, iterations, loss weights; advanced: VGG16 layers, weights, seed.",
        json_schema_extra={"title": "Style settings"}),
    run: RunOptions = Field(
        RunOptions(), description="Failures tolerated, skipping, devices, fan-out to GPU workers.",
        json_schema_extra={"title": "Run settings (advanced)"}),
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
        activate(output.storage_credentials)  # "" = boto3's default chain
    except (InvalidInputs, CredentialsError) as err:
        return Failed(message=str(err))
    logger = get_run_logger()
    stop_requested.clear()
    run_id = flow_run.get_id() or f"local-{uuid.uuid4().hex}"
    run_name = flow_run.get_name() or run_id
    started = datetime.now(timezone.utc)
    devices = expand_devices(run.devices, params.device)
    out = open_storage(output.uri)
    reported = False  # the final report is written: never replace it

    try:
        try:
            entries, weights_id = preflight(source, output, params, devices, {"id": run_id, "name": run_name})
            allowed = run.allowed_sources or default_allowed_sources(source)
            try:
                plans = plan_pairs(entries, params, weights_id, output.format, output.quality, run.io_workers, allowed)
            except PreflightError as err:
                _drop_probe(out, run_id, f"preflight failed: {err}")
                raise
        except PreflightError as err:  # a refusal before any work: one line, no traceback
            logger.error("preflight failed: %s", err)
            return Failed(message=f"preflight failed: {err}")
        done = done_in(out, plans, io_workers=run.io_workers) if run.skip_existing else set()  # output listed once
        items: list[ReportItem | None] = [None] * len(plans)
        todo: list[PairPlan] = []
        for p in plans:
            if p.error:
                items[p.index] = failed_item(p, p.error)
                logger.error("pair %s x %s failed at planning: %s", p.content, p.style, p.error)
            elif p.duplicate_of >= 0:
                first = plans[p.duplicate_of]
                items[p.index] = ReportItem(p.content, p.style, "skipped", out.uri_for(p.image_key),
                                            out.uri_for(p.sidecar_key),
                                            note=f"duplicate of pair {p.duplicate_of} ({first.content} x {first.style}): "
                                                 "the same result, made once")
            elif p.index in done:
                items[p.index] = ReportItem(p.content, p.style, "skipped", out.uri_for(p.image_key),
                                            out.uri_for(p.sidecar_key))
            else:
                todo.append(p)
        logger.info("%d pairs: %d to run, %d already done, %d failed at planning; devices %s; weights %s",
                    len(plans), len(todo), len(done), sum(bool(p.error) for p in plans), devices, weights_id)

        progress = RunProgress(len(todo))  # pairs/s and ETA; throttled: big runs, few API calls
        hook = on_pair_done.get()

        def on_done(finished: int, total: int) -> None:
            if hook:
                hook(finished, total)
            progress.update(finished)

        if run.fan_out == "workers" and todo:
            # the chunk runs read only where this run may: the resolved list, never the empty default
            result = fan_out_to_workers(plans, done, output, params, run.model_copy(update={"allowed_sources": allowed}),
                                        weights_id, run_id, on_done)
        else:
            ctx = PairContext(output, params, devices, weights_id, run.labels, run.io_workers, run.pair_timeout_s,
                              {"id": run_id, "name": run_name})
            result = run_pairs(todo, ctx, run.window, run.contact_sheet_rows, on_done)
        for index, item in result.items.items():
            items[index] = item
        progress.update(len(todo), final=True)

        done_items = [i for i in items if i is not None]
        counts = totals(done_items)
        report_uri = out.uri_for(report_key(run_id))
        warning = run.labels.get("warning")
        # local fan-out: the k-th thumbnail row is the k-th pair run_pairs finished (captions exact)
        thumb_items = ([i.as_dict() for i in result.items.values() if i.status == "done"][:len(result.thumbs)]
                       if run.fan_out == "local" else None)
        pictures = write_pictures(out, run_id, [i.as_dict() for i in done_items], result.thumbs, thumb_items, warning,
                                  run.io_workers)
        report = {
            "flow_run": run_name,
            "flow_run_id": run_id,
            "report": report_uri,
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": source.model_dump(mode="json"),
            "output": output.model_dump(mode="json"),
            "params": params.model_dump(mode="json"),
            "run": run.model_dump(mode="json"),
            "weights_id": weights_id,
            "devices": devices,
            "totals": counts,
            **pictures,  # contact_sheet, loss_curve
            **({"chunks": result.chunks} if result.chunks else {}),
            "items": [i.as_dict() for i in done_items],
        }
        retrying(lambda: out.write(report_key(run_id), json.dumps(report, indent=2).encode(), "application/json"))
        reported = True

        publish_artifacts(report, out, output.link_expiry_hours, warning,
                          seconds=(datetime.now(timezone.utc) - started).total_seconds())
        summary = f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed of {counts['pairs']} pairs"
        logger.info("%s (report: %s)", summary, report_uri)
        if counts["failed"] > run.max_failures:
            # No data=: Prefect 3 treats a Failed state's data as its exception ("Unexpected result
            # for failed state" with the whole report otherwise). The report is in storage.
            return Failed(message=f"{counts['failed']} of {counts['pairs']} pairs failed (report: {report_uri})")
        return Completed(message=f"{summary} (report: {report_uri})", data=report)
    except BaseException as err:  # Ctrl-C, SIGTERM, an unhandled error: the report must not say "running"
        if not reported:
            _mark_stopped(out, run_id, run_name, f"{type(err).__name__}: {err}".rstrip(": "))
        raise
