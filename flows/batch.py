"""Flow ``stylize-batch``: preflight, plan, windowed fan-out, report.

1. Preflight before any fan-out: output writable (probe written and deleted), weights loadable,
   source listable and non-empty, manifest rows valid. A failure ends the run with one message.
2. Plan: list the output prefix once; name every pair; skip pairs whose sidecar exists.
3. Fan out in a sliding window of ``run.window`` pairs: fetch (IO) -> stylize (one per device,
   leased) -> write (image, then sidecar). IO of later pairs overlaps the compute of earlier ones.
4. Report: ``{output}/_runs/{flow_run_name}.json``, a contact sheet beside it, Prefect artifacts.
5. Failed with "k of n pairs failed (report: URI)" when k > run.max_failures, else Completed.
"""

from __future__ import annotations

import contextvars
import json
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.models import BatchSource, OutputSpec, RunOptions
from nst_core.errors import NSTError
from nst_core.params import StyleParams
from tasks.compute import expand_devices, run_on_device
from tasks.pair import fetch_image, stylize_pair, write_pair
from tasks.plan import PairPlan, PreflightError, plan_pairs, source_entries
from tasks.report import PairItem, contact_sheet, summary_markdown, table_rows, totals
from tasks.storage import StorageError, open_storage, read_uri

__all__ = ["stylize_batch", "preflight", "on_pair_done"]

#: Set by the CLI to draw a progress bar: called with (finished pairs, pairs to run).
on_pair_done: contextvars.ContextVar[Callable[[int, int], None] | None] = contextvars.ContextVar(
    "on_pair_done", default=None)


def preflight(source: BatchSource, output: OutputSpec, params: StyleParams, devices: list[str]):
    """Checks that fail fast, before any fan-out. Returns (entries, weights_id)."""
    from nst_core.optimize import extractor_for

    out = open_storage(output.uri)
    probe = f"_runs/.probe-{uuid.uuid4().hex}"
    try:
        out.write(probe, b"probe")
        out.delete(probe)
    except (StorageError, OSError) as err:
        raise PreflightError(f"output {output.uri} is not writable: {err}") from None
    try:
        first = params.model_copy(update={"device": devices[0]})
        weights_id = run_on_device(devices[0], lambda: extractor_for(first, opener=read_uri)).weights_id
    except NSTError as err:
        raise PreflightError(f"weights: {err}") from None
    return source_entries(source), weights_id


def _error_of(futures) -> str:
    """The first failure among a pair's task futures, as one line."""
    for fut in futures:
        state = fut.state
        if state.is_failed() or state.is_crashed():
            err = fut.result(raise_on_failure=False)
            return str(err) if isinstance(err, BaseException) else (state.message or state.name)
    return "did not finish"


@flow(name="stylize-batch", task_runner=ThreadPoolTaskRunner(max_workers=3 * 1024 + 16), persist_result=False,
      description="Stylize every content/style pair of a dataset (S3 or folder) and write results, sidecars and a run report.")
def stylize_batch(
    source: BatchSource,
    output: OutputSpec,
    params: StyleParams = StyleParams(),
    run: RunOptions = RunOptions(),
):
    """Neural style transfer over a dataset; see the module docstring for the steps."""
    logger = get_run_logger()
    run_name = flow_run.get_name() or f"local-{uuid.uuid4().hex[:8]}"
    started = datetime.now(timezone.utc)
    devices = expand_devices(run.devices, params.device)
    out = open_storage(output.uri)

    entries, weights_id = preflight(source, output, params, devices)
    plans = plan_pairs(entries, params, weights_id, output.format, run.io_workers)
    existing = {info.key for info in out.list()} if run.skip_existing else set()  # listed once
    items: list[PairItem | None] = [None] * len(plans)
    todo: list[PairPlan] = []
    for p in plans:
        if p.sidecar_key in existing:
            items[p.index] = PairItem(p.content, p.style, "skipped", out.uri_for(p.image_key))
        else:
            todo.append(p)
    logger.info("%d pairs: %d to run, %d already done; devices %s; weights %s",
                len(plans), len(todo), len(plans) - len(todo), devices, weights_id)

    progress_id = create_progress_artifact(0.0, key=None, description="pairs finished")
    hook = on_pair_done.get()
    thumbs: list[tuple[bytes, bytes, bytes]] = []
    finished, last_update = 0, 0.0

    def collect(entry) -> None:
        nonlocal finished, last_update
        p, fc, fs, fr, fw = entry
        fw.wait()
        if fw.state.is_completed():
            outcome = fr.result()
            items[p.index] = PairItem(p.content, p.style, "done", fw.result(),
                                      seconds=outcome.sidecar["seconds"]["total"], losses=outcome.sidecar["losses"])
            if len(thumbs) < run.contact_sheet_rows:
                thumbs.append(outcome.thumbs)
        else:
            error = _error_of([fc, fs, fr, fw])
            items[p.index] = PairItem(p.content, p.style, "failed", out.uri_for(p.image_key), error=error)
            logger.error("pair %s x %s failed: %s", p.content, p.style, error)
        finished += 1
        if hook:
            hook(finished, len(todo))
        now = time.monotonic()
        if finished == len(todo) or now - last_update > 2.0:  # throttle API calls on big runs
            last_update = now
            update_progress_artifact(progress_id, 100.0 * finished / max(len(todo), 1))

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
    update_progress_artifact(progress_id, 100.0)

    done_items = [i for i in items if i is not None]
    counts = totals(done_items)
    report_key = f"_runs/{run_name}.json"
    report_uri = out.uri_for(report_key)
    sheet_uri = None
    if thumbs:
        sheet_key = f"_runs/{run_name}-contact.jpg"
        out.write(sheet_key, contact_sheet(thumbs), "image/jpeg")
        sheet_uri = out.uri_for(sheet_key)
    report = {
        "flow_run": run_name,
        "flow_run_id": flow_run.get_id(),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source.model_dump(mode="json"),
        "output": output.model_dump(mode="json"),
        "params": params.model_dump(mode="json"),
        "run": run.model_dump(mode="json"),
        "weights_id": weights_id,
        "devices": devices,
        "totals": counts,
        "contact_sheet": sheet_uri,
        "items": [i.as_dict() for i in done_items],
    }
    out.write(report_key, json.dumps(report, indent=2).encode(), "application/json")

    failures = [i for i in done_items if i.status == "failed"]
    warning = run.labels.get("warning")
    create_table_artifact(table_rows(done_items), key=None, description=f"pairs of {run_name}")
    create_markdown_artifact(summary_markdown(run_name, counts, report_uri, sheet_uri, failures, warning),
                             description=f"summary of {run_name}")
    summary = f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed of {counts['pairs']} pairs"
    logger.info("%s (report: %s)", summary, report_uri)
    if counts["failed"] > run.max_failures:
        return Failed(message=f"{counts['failed']} of {counts['pairs']} pairs failed (report: {report_uri})",
                      data=report)
    return Completed(message=f"{summary} (report: {report_uri})", data=report)
