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
from collections.abc import Callable
from dataclasses import asdict
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

from tasks.models import BatchSource, OutputSpec, RunOptions
from nst_core.errors import NSTError
from nst_core.params import StyleParams
from flows.pipeline import PipelineResult, Throttle, run_pairs
from tasks.compute import expand_devices, run_on_device
from tasks.plan import PairPlan, PreflightError, plan_pairs, source_entries
from tasks.report import PairItem, contact_sheet, summary_markdown, table_rows, totals
from tasks.storage import StorageError, open_storage, read_uri

__all__ = ["stylize_batch", "preflight", "fan_out_to_workers", "on_pair_done"]

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


def fan_out_to_workers(
    todo: list[PairPlan], output: OutputSpec, params: StyleParams, run: RunOptions, weights_id: str,
    run_name: str, on_done: Callable[[int, int], None],
) -> PipelineResult:
    """One ``run.chunk_deployment`` run per chunk; wait for all; merge their chunk reports.

    The idempotency key (this flow run's id + chunk number) makes a retried parent find its
    children instead of starting them again. A chunk that fails without a report fails its pairs.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows.chunk import decode_thumbs

    logger = get_run_logger()
    out = open_storage(output.uri)
    parent_id = flow_run.get_id() or run_name
    chunks = [todo[i:i + run.chunk_size] for i in range(0, len(todo), run.chunk_size)]
    children = []
    for n, chunk in enumerate(chunks):
        report_key = f"_runs/{run_name}/chunk-{n:04d}.json"
        child = run_deployment(
            name=run.chunk_deployment,
            parameters={"pairs": [asdict(p) for p in chunk], "output": output.model_dump(mode="json"),
                        "params": params.model_dump(mode="json"), "run": run.model_dump(mode="json"),
                        "weights_id": weights_id, "report_key": report_key},
            flow_run_name=f"{run_name}-chunk-{n:04d}",
            idempotency_key=f"{parent_id}:chunk:{n}",
            timeout=0,  # start them all, then wait below
            as_subflow=True,
        )
        children.append((n, chunk, report_key, child.id))
    logger.info("started %d chunk runs of %s (chunk size %d)", len(children), run.chunk_deployment, run.chunk_size)

    result = PipelineResult()
    pending = list(children)
    finished = 0
    with get_client(sync_client=True) as client:
        while pending:
            still = []
            for n, chunk, report_key, child_id in pending:
                state = client.read_flow_run(child_id).state
                if not (state and state.is_final()):
                    still.append((n, chunk, report_key, child_id))
                    continue
                try:
                    report = json.loads(out.read(report_key)[0])
                except StorageError:
                    report = None
                by_index = {item["index"]: item for item in (report or {}).get("items", [])}
                for p in chunk:
                    item = by_index.get(p.index)
                    if item is None:
                        error = f"chunk {n} ended {state.name} without a result: {state.message or ''}".strip()
                        result.items[p.index] = PairItem(p.content, p.style, "failed", out.uri_for(p.image_key),
                                                         error=error)
                    else:
                        item.pop("index")
                        result.items[p.index] = PairItem(**item)
                    finished += 1
                    on_done(finished, len(todo))
                if report:
                    room = run.contact_sheet_rows - len(result.thumbs)
                    result.thumbs += decode_thumbs(report.get("thumbs", []))[:max(room, 0)]
                result.chunks.append({"chunk": n, "flow_run_id": str(child_id), "state": state.name,
                                      "report": out.uri_for(report_key),
                                      "worker": (report or {}).get("worker")})
            pending = still
            if pending:
                time.sleep(2.0)
    result.chunks.sort(key=lambda c: c["chunk"])
    return result


@flow(name="stylize-batch", task_runner=ThreadPoolTaskRunner(max_workers=3 * 1024 + 16), persist_result=False,
      description="Stylize every content/style pair of a dataset (S3 or folder) and write results, sidecars and a run report.")
def stylize_batch(
    source: BatchSource,
    output: OutputSpec,
    params: StyleParams = StyleParams(),
    run: RunOptions = RunOptions(),
):
    """Neural style transfer over a dataset in object storage or a folder.

    Args:
        source: The content/style pairs: a manifest, or content and style prefixes.
        output: Where stylized images, JSON sidecars and the run report are written.
        params: Style-transfer parameters (VGG16 layers, loss weights, iterations, size, weights).
        run: How the run executes: failures tolerated, skipping, devices, fan-out to GPU workers.
    """
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

    progress_id = create_progress_artifact(0.0, description="pairs finished")
    update = Throttle(lambda pct: update_progress_artifact(progress_id, pct))  # throttled: big runs, few API calls
    hook = on_pair_done.get()

    def on_done(finished: int, total: int) -> None:
        if hook:
            hook(finished, total)
        update(100.0 * finished / max(total, 1))

    if run.fan_out == "workers" and todo:
        result = fan_out_to_workers(todo, output, params, run, weights_id, run_name, on_done)
    else:
        result = run_pairs(todo, output, params, run, devices, weights_id, on_done)
    for index, item in result.items.items():
        items[index] = item
    thumbs = result.thumbs
    update(100.0, final=True)

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
        "contact_sheet": sheet_uri,
        **({"chunks": result.chunks} if result.chunks else {}),
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
