"""Flow ``stylize-chunk``: one chunk of a stylize-batch run, on a GPU worker.

The parent plans (preflight, names, skips) and starts one run of this flow per chunk with
``run_deployment``; the chunk report's schema and key are in ``tasks.contract``. The chunk writes its results to ``{output}/{report_key}`` — storage every
machine shares — and the parent merges those into its one run report.
"""

from __future__ import annotations

import base64
import json
import os
import socket

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.models import OutputSpec, RunOptions
from nst_core.params import StyleParams
from tasks.artifacts import ThumbRow
from tasks.compute import expand_devices
from tasks.contract import RUNS, PairPlan, ReportItem, done_in, naming_problem
from tasks.pair import PairContext
from tasks.pipeline import failed_item, run_pairs
from tasks.plan import outside_allowed
from tasks.credentials import activate
from tasks.storage import open_storage, retrying, safe_key

__all__ = ["stylize_chunk", "encode_thumbs", "decode_thumbs"]


def encode_thumbs(thumbs: list[tuple[bytes, bytes, bytes]], items: list[ReportItem] = ()) -> list[list[str]]:
    """Rows of base64 thumbnails, each followed by the content and style URIs of ``items[i]`` (its
    pair: the parent captions the contact sheet from them)."""
    return [[*(base64.b64encode(t).decode() for t in row[:3]), *((items[n].content, items[n].style)
             if n < len(items) else ())] for n, row in enumerate(thumbs)]


def decode_thumbs(rows: list[list[str]]) -> list[ThumbRow]:
    return [ThumbRow(tuple(base64.b64decode(t) for t in row[:3]), *row[3:5]) for row in rows]


@flow(name="stylize-chunk", task_runner=ThreadPoolTaskRunner(max_workers=1024 + 16), persist_result=False,
      description="Stylize a planned list of pairs (started by stylize-batch with fan_out=workers).")
def stylize_chunk(
    pairs: list[PairPlan],
    output: OutputSpec,
    params: StyleParams,
    run: RunOptions,
    weights_id: str,
    report_key: str,
) -> dict:
    logger = get_run_logger()
    activate(output.storage_credentials)  # the parent's credentials block, in this worker's process
    out = open_storage(output.uri)
    if safe_key(report_key).split("/")[0] != RUNS:
        raise ValueError(f"report_key {report_key!r} must be under {RUNS}/")
    devices = expand_devices(run.devices, params.device)
    # Anyone who can start a flow run can write these parameters: check what they ask for.
    refused: dict[int, str] = {}
    for p in pairs:
        outside = [u for u in (p.content, p.style) if outside_allowed(u, run.allowed_sources)]
        refused[p.index] = naming_problem(p, output.format) or (
            f"{outside[0]} is outside allowed_sources ({', '.join(run.allowed_sources) or 'none given'})"
            if outside else "")
    valid = [p for p in pairs if not refused[p.index]]
    # The same done rule as the parent's: a retried chunk redoes nothing that is done.
    done = done_in(out, valid, list_once=False, io_workers=run.io_workers) if run.skip_existing else set()
    todo = [p for p in valid if p.index not in done]
    logger.info("chunk of %d pairs (%d to run, %d refused) on %s", len(pairs), len(todo),
                len(pairs) - len(valid), devices)
    ctx = PairContext(output, params, devices, weights_id, run.labels, run.io_workers, run.pair_timeout_s,
                      {"id": str(flow_run.get_id()), "name": flow_run.get_name()})
    result = run_pairs(todo, ctx, run.window, run.contact_sheet_rows)
    items = [failed_item(p, refused[p.index]) if refused[p.index] else result.items.get(p.index)
             or ReportItem(p.content, p.style, "skipped", out.uri_for(p.image_key), out.uri_for(p.sidecar_key))
             for p in pairs]
    report = {
        "flow_run": flow_run.get_name(),
        "flow_run_id": flow_run.get_id(),
        "worker": {"host": socket.gethostname(), "pid": os.getpid(), "parent_pid": os.getppid(), "devices": devices},
        "items": [{"index": p.index, "key": p.key, **item.as_dict()} for p, item in zip(pairs, items)],
        # run_pairs keeps the thumbnails of the first pairs it saw done, in that order
        "thumbs": encode_thumbs(result.thumbs, [i for i in result.items.values() if i.status == "done"]),
    }
    retrying(lambda: out.write(report_key, json.dumps(report).encode(), "application/json"))
    return {"report": out.uri_for(report_key), "done": sum(i.status == "done" for i in items)}
