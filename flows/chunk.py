"""Flow ``stylize-chunk``: one chunk of a stylize-batch run, on a GPU worker.

The parent plans (preflight, names, skips) and starts one run of this flow per chunk with
``run_deployment`` (``flows.fanout``). The chunk resolves the parent's storage credentials block
itself, writes its results and its chunk report (``tasks.contract.chunk_report``) to
``{output}/{report_key}`` — storage every machine shares — and the parent merges those into its
one run report. When its storage is declared unreachable (``tasks.storage.StorageHealth``) it
stops starting pairs and ends Failed with "storage unreachable since HH:MM:SS UTC: k of n pairs
not run", writing no report (the parent judges it by that state and ends too).
"""

from __future__ import annotations

import os
import socket

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from flows.quiet import quiet_returned_failures
from tasks.models import OutputSpec, RunOptions
from nst_core.params import StyleParams
from tasks.compute import device_problem, expand_devices
from tasks.contract import (DONE, FAILED, NOT_RUN, RUNS, PairPlan, chunk_report, done_in, failed_item, in_runs,
                            naming_problem, output_health, report_bytes, skipped_item, totals, totals_line)
from tasks.credentials import resolve
from tasks.pair import PairContext, stop_requested
from tasks.pipeline import run_pairs
from tasks.plan import outside_allowed
from tasks.storage import StorageUnreachableError, open_storage, retrying, safe_key

__all__ = ["stylize_chunk"]

# A chunk worker's pair that fails on its input logs one line, as in stylize-batch's own process.
quiet_returned_failures()


def _refusals(pairs: list[PairPlan], fmt: str, allowed_sources: list[str]) -> dict[int, str]:
    """Why each pair is refused ("" = it may run). Anyone who can start a flow run can write these
    parameters: inputs outside ``allowed_sources`` and output keys that break the naming rule are refused."""
    refused: dict[int, str] = {}
    for p in pairs:
        refused[p.index] = naming_problem(p, fmt) or next(
            (why for u in (p.content, p.style) if (why := outside_allowed(u, allowed_sources))), "")
    return refused


@flow(name="stylize-chunk", task_runner=ThreadPoolTaskRunner(max_workers=1024 + 16), persist_result=False,
      description="Stylize a planned list of pairs (started by stylize-batch with fan_out=workers).")
def stylize_chunk(
    pairs: list[PairPlan],
    output: OutputSpec,
    params: StyleParams,
    run: RunOptions,
    weights_id: str,
    report_key: str,
) -> State:
    logger = get_run_logger()
    credentials = resolve(output.storage_credentials)  # the parent's credentials block, read by this worker
    out = open_storage(output.uri, credentials)
    if not in_runs(safe_key(report_key)):
        raise ValueError(f"report_key {report_key!r} must be under {RUNS}/")
    devices = expand_devices(run.devices, params.device)
    refused = _refusals(pairs, output.format, run.allowed_sources)
    if unusable := device_problem(devices):  # this worker lacks a device the run names: no pair runs here
        refused = {i: why or f"worker {socket.gethostname()}: {unusable}" for i, why in refused.items()}
    valid = [p for p in pairs if not refused[p.index]]
    health = output_health(out)
    try:  # the same done rule as the parent's: a retried chunk redoes nothing that is done
        done = done_in(out, valid, list_once=False, io_workers=run.io_workers, health=health) if run.skip_existing else set()
    except StorageUnreachableError:
        done = set()  # run_pairs starts no pair once the storage is declared unreachable
    todo = [p for p in valid if p.index not in done]
    logger.info("chunk of %d pairs (%d to run, %d refused) on %s", len(pairs), len(todo),
                len(pairs) - len(valid), devices)
    this_run = {"id": flow_run.get_id(), "name": flow_run.get_name()}
    ctx = PairContext(output, params, devices, weights_id, run.labels, run.io_workers, run.pair_timeout_s,
                      {**this_run, "id": str(this_run["id"])}, credentials=credentials, health=health,
                      pairs_per_step=run.pairs_per_step, recheck_done=run.skip_existing)
    stop_requested.clear()  # as stylize_batch: a stop of an earlier run in this process is not this one's
    try:
        result = run_pairs(todo, ctx, run.window, run.contact_sheet_rows)
    except BaseException:  # SIGTERM (a cancel), an error: the pairs in flight stop at their next evaluation
        stop_requested.set()
        raise
    since = health.unreachable_since()
    if since is not None:  # its report could not be written either: the state carries the reason
        # the pairs the outage kept from being made (never started, or stopped in flight by it): not
        # those refused, done before, or finished either way
        stop = str(health.stop_error())  # unreachable, or refusing writes: the error of a pair it stopped
        not_run = sum(1 for p in todo if (item := result.items.get(p.index)) is None
                      or (item.status == FAILED and ((item.error or "").startswith(NOT_RUN) or stop in (item.error or ""))))
        return Failed(message=f"{stop}: {not_run} of {len(pairs)} pairs not run")
    items = [failed_item(p, refused[p.index]) if refused[p.index] else result.items.get(p.index)
             or skipped_item(p, out) for p in pairs]
    worker = {"host": socket.gethostname(), "pid": os.getpid(), "parent_pid": os.getppid(), "devices": devices}
    # run_pairs keeps the thumbnails of the first pairs it saw done, in that order
    report = chunk_report(this_run, worker, pairs, items,
                          result.thumbs, [i for i in result.items.values() if i.status == DONE])
    retrying(lambda: out.write(report_key, report_bytes(report), "application/json"))
    uri, counts = out.uri_for(report_key), totals(items)
    # The message is what the chunk's run page says: a chunk whose pairs all failed is still
    # Completed (the parent judges failures against max_failures), but not a silent green.
    return Completed(message=f"{totals_line(counts)} (chunk report: {uri})", data={"report": uri, "done": counts["done"]})
