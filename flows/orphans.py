"""Run reports whose run is gone.

A run killed with ``kill -9`` (or whose machine was lost) leaves its report saying "running" for
ever: no hook of it runs. At the start of each stylize-batch run, ``mark_crashed_reports`` lists
the reports of its output that may still say so and asks the Prefect API about their flow runs:
a report whose run ended (Completed, Failed, Cancelled, Crashed: it never replaced its report) or
is unknown to the API is replaced by a "crashed" report (``contract.stopped_report``) that keeps
the run's name and says why; so is an earlier attempt's report of this very flow run (Prefect's
Retry runs it again under its id). A run the API still calls Running cannot be told from one
whose machine was lost by the API, but its report records its process (``this_process``): when
that ran on this machine (same boot, same pid namespace) and is gone, the report is marked and the
flow run set Crashed (a kill -9 of `nst batch`: no worker watched it, and the temporary API has no
zombie detection). Otherwise it is left alone; Prefect's zombie-flow detection (flow heartbeats and
an automation that marks silent runs Crashed) can tell, and the next run after it marks the report.

Cheap on a long history: the ``_runs/`` folder is listed once and only small reports are read (a
"running" report is a few hundred bytes). The API is asked before a report is read, so a run that
ends in between wrote its full report before its state became final, and that is what is read.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from uuid import UUID

from prefect import get_run_logger

from flows.fanout import read_children
from tasks.contract import CRASHED, RUNNING, RUNS, report_bytes, stopped_report
from tasks.storage import Storage, StorageError, retrying

__all__ = ["mark_crashed_reports", "gone_runs", "this_process", "process_gone", "SMALL_REPORT"]

#: Reports larger than this are full reports (their run ended with them) and are not read.
SMALL_REPORT = 4096
#: ``_runs/{flow_run_id}.json``, or a later attempt's ``_runs/{flow_run_id}-attempt-N.json``.
_REPORT_KEY = re.compile(rf"^{RUNS}/(?P<id>[^/]+?)(?:-attempt-(?P<attempt>\d+))?\.json$")


def gone_runs(ids: set[str]) -> dict[str, str]:
    """Flow run id -> why its run is gone, for those of ``ids`` whose runs ended or that the
    Prefect API does not know (one paged query)."""
    from prefect.client.orchestration import get_client

    gone, known = {}, []
    for run_id in ids:
        try:
            known.append(str(UUID(run_id)))
        except ValueError:
            gone[run_id] = "its flow run is unknown to the Prefect API"
    with get_client(sync_client=True) as client:
        found = {str(run.id): run for run in read_children(client, known)}
    for run_id in known:
        run = found.get(run_id)
        if run is None:
            gone[run_id] = "its flow run is unknown to the Prefect API"
        elif run.state is not None and run.state.is_final():
            gone[run_id] = f"its flow run ended {run.state.name} without writing its report"
    return gone


def mark_crashed_reports(out: Storage, own: dict) -> int:
    """Mark crashed the reports of ``out`` that say "running" while their run is gone (``gone_runs``,
    or ``process_gone``: the API calls it running, but the process that ran it is gone from this
    machine; the flow run is then set Crashed too), and those of earlier attempts of this run
    (``own``: {id, attempt}; Prefect's Retry runs a flow run again under its id). Never fails the
    run: storage or API trouble is logged and skipped. Returns how many."""
    logger = get_run_logger()
    try:
        listed = retrying(lambda: out.list(RUNS))
    except StorageError as err:
        logger.warning("could not list earlier run reports: %s", err)
        return 0
    ours, theirs = {}, {}  # report key -> why (earlier attempts of this run); report key -> flow run id
    attempt = own.get("attempt", 1)
    for info in listed:
        found = _REPORT_KEY.match(info.key)
        if not found or info.size > SMALL_REPORT:
            continue
        if found["id"] != own["id"]:
            theirs[info.key] = found["id"]
        elif int(found["attempt"] or 1) < attempt:
            ours[info.key] = f"attempt {attempt} of its flow run started"
    try:
        gone = gone_runs(set(theirs.values())) if theirs else {}
    except Exception as err:  # the API hiccuped: the next run looks again
        logger.warning("could not ask the Prefect API about %d earlier runs: %s", len(set(theirs.values())), err)
        return _mark(out, own, ours, logger)
    # runs the API calls running (or never ended): their process, if it ran on this machine, tells
    ours.update({key: gone.get(i) for key, i in theirs.items()})
    return _mark(out, own, ours, logger)


def _mark(out: Storage, own: dict, whys: dict, logger) -> int:
    """Mark crashed each report of ``whys`` (key -> why, or None: ask its recorded process) that
    still says "running"."""
    marked = 0
    for key, why in whys.items():
        try:
            report = json.loads(retrying(lambda: out.read(key))[0])
            if not isinstance(report, dict) or report.get("status") != RUNNING:
                continue
            run = {"id": report.get("flow_run_id") or _REPORT_KEY.match(key)["id"], "name": report.get("flow_run")}
            if why is None:
                if (why := process_gone(report.get("process"))) is None:
                    continue  # alive, or not this machine's to judge
                _crash_in_api(run["id"], why, logger)
            retrying(lambda: out.write(key, report_bytes(stopped_report(run, CRASHED, why)), "application/json"))
        except (StorageError, ValueError) as err:
            logger.warning("could not mark %s crashed: %s", out.uri_for(key), err)
            continue
        logger.warning("%s said running, but %s: marked crashed", out.uri_for(key), why)
        marked += 1
    return marked


def this_process(pid: int | None = None) -> dict | None:
    """{boot, pid_ns, pid, started} of this process (or ``pid``) on Linux, else None: enough for a
    later run on this machine to know the process is gone, and never to mistake another machine's
    or container's process for it (a boot and a pid namespace of its own: pids repeat across
    them; ``started``, in clock ticks since boot: a pid is reused once its process is gone)."""
    try:
        return {"boot": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                "pid_ns": os.readlink("/proc/self/ns/pid"), "pid": pid or os.getpid(),
                "started": _started(pid or os.getpid())}
    except (OSError, ValueError, IndexError):
        return None


def process_gone(process) -> str | None:
    """Why the process a report recorded (``this_process``) is gone, or None: it is alive, or it ran
    on another machine or container, or nothing was recorded (nothing here can tell)."""
    here = this_process()
    if not isinstance(process, dict) or here is None:
        return None
    if (process.get("boot"), process.get("pid_ns")) != (here["boot"], here["pid_ns"]):
        return None
    try:
        pid, started = int(process["pid"]), int(process["started"])
    except (KeyError, TypeError, ValueError):
        return None
    try:
        alive = _started(pid) == started and _state(pid) != "Z"  # a zombie has ended: only its reaper is late
    except (OSError, ValueError, IndexError):
        alive = False  # no such process
    return None if alive else f"its process (pid {pid}) is gone from this machine"


def _stat(pid: int) -> list[str]:
    """/proc/{pid}/stat's fields from the third on (after the command name, which may hold spaces)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _started(pid: int) -> int:
    return int(_stat(pid)[19])  # field 22, starttime


def _state(pid: int) -> str:
    return _stat(pid)[0]  # field 3


def _crash_in_api(flow_run_id: str, why: str, logger) -> None:
    """Set a flow run whose process is gone Crashed (best effort: the report is what counts)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(UUID(flow_run_id), Crashed(message=f"nst: {why}"))
    except Exception as err:
        logger.warning("could not set flow run %s Crashed: %s", flow_run_id, err)
