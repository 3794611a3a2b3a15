"""Run reports whose run is gone.

A run killed with ``kill -9`` (or whose machine was lost) leaves its report saying "running" for
ever: no hook of it runs. At the start of each stylize-batch run, ``mark_crashed_reports`` lists
the reports of its output that may still say so and asks the Prefect API about their flow runs:
a report whose run ended (Completed, Failed, Cancelled, Crashed: it never replaced its report) or
is unknown to the API is replaced by a "crashed" report (``contract.stopped_report``) that keeps
the run's name and says why; so is an earlier attempt's report of this very flow run (Prefect's
Retry runs it again under its id), and the report of an earlier attempt of a flow run the API
calls Running. A run the API still calls Running cannot be told from one whose machine was lost
by the API, but its report records its process (``this_process``): when that ran on this machine
(same boot, same pid namespace) and is gone, the flow run is set Crashed (its chunk runs
cancelled) and then its report is marked (a kill -9 of `nst batch`: no worker watched it, and the
temporary API has no zombie detection). Otherwise it is left alone; Prefect's zombie-flow detection (flow heartbeats and
an automation that marks silent runs Crashed) can tell, and the next run after it marks the report.
A report also names the Prefect API of its run (``api_identity``): a run that this API does not
know but whose report names another server's API (the same output used from a server's
deployment and from `nst batch` on a temporary API) is judged by its process alone, or marked
once it started more than ELSEWHERE_STALE_S ago; never "unknown". A run of another temporary API
is still "unknown": such an API often dies with its container, and then none could tell.

Cheap on a long history: the ``_runs/`` folder is listed once and only small reports are read (a
"running" report is a few hundred bytes). The API is asked before a report is read, so a run that
ends in between wrote its full report before its state became final, and that is what is read.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import urllib.parse
from datetime import datetime, timezone
from uuid import UUID

from prefect import get_run_logger

from flows.fanout import PARENT_STOPPED, cancel_children, read_children
from nst_core.cli import without_userinfo
from tasks.contract import CRASHED, RUNNING, RUNS, report_bytes, stopped_report
from tasks.processes import process_alive, process_gone, this_process
from tasks.storage import Storage, StorageError, retrying

__all__ = ["mark_crashed_reports", "still_running", "this_process", "process_gone", "api_identity", "identity_of", "SMALL_REPORT"]

#: Reports larger than this are full reports (their run ended with them) and are not read.
SMALL_REPORT = 4096
#: ``_runs/{flow_run_id}.json``, or a later attempt's ``_runs/{flow_run_id}-attempt-N.json``.
#: Why a report is marked whose flow run this API has never heard of (its database was reset).
UNKNOWN = "its flow run is unknown to the Prefect API"
#: How the API of a run on Prefect's temporary API (no PREFECT_API_URL) is recorded, first.
TEMPORARY_API = "temporary API"
#: A report of a run on another Prefect API that still says "running" this long after it started
#: is marked crashed (nothing here can ask that API; a nightly batch takes hours, not a week).
ELSEWHERE_STALE_S = 7 * 24 * 3600
_REPORT_KEY = re.compile(rf"^{RUNS}/(?P<id>[^/]+?)(?:-attempt-(?P<attempt>\d+))?\.json$")


def _ask_api(ids: set[str]) -> tuple[dict[str, str], dict[str, int]]:
    """({flow run id: why its run is gone} for those of ``ids`` whose runs ended or that the Prefect
    API does not know, {flow run id: its run_count} for those it calls Running), one paged query."""
    from prefect.client.orchestration import get_client

    gone, known, running = {}, [], {}
    for run_id in ids:
        try:
            known.append(str(UUID(run_id)))
        except ValueError:
            gone[run_id] = UNKNOWN
    with get_client(sync_client=True) as client:
        found = {str(run.id): run for run in read_children(client, known)}
    for run_id in known:
        run = found.get(run_id)
        if run is None:
            gone[run_id] = UNKNOWN
        elif run.state is not None and run.state.is_final():
            gone[run_id] = f"its flow run ended {run.state.name} without writing its report"
        elif run.state is not None and run.state.is_running():
            running[run_id] = run.run_count or 1
    return gone, running


def mark_crashed_reports(out: Storage, own: dict, spare: set[str] = frozenset()) -> int:
    """Mark crashed the reports of ``out`` that say "running" while their run is gone (ended, or
    unknown to the API), that an attempt of their flow run since has superseded, or whose flow run
    the API calls Running while the process of its current attempt is gone from this machine
    (``process_gone``: the flow run is then set Crashed too, and its chunk runs cancelled but those
    of ``spare``, the flow run ids this run adopts: ``flows.fanout.live_before_done``); also
    those of earlier attempts of this run (``own``: {id, attempt}; Prefect's Retry runs a flow run
    again under its id). Never fails the run: storage or API trouble is logged and skipped.
    Returns how many."""
    logger = get_run_logger()
    try:
        listed = retrying(lambda: out.list(RUNS))
    except StorageError as err:
        logger.warning("could not list earlier run reports: %s", err)
        return 0
    ours, theirs = {}, {}  # report key -> why (earlier attempts of this run); report key -> (flow run id, attempt)
    attempt = own.get("attempt", 1)
    for info in listed:
        found = _REPORT_KEY.match(info.key)
        if not found or info.size > SMALL_REPORT:
            continue
        if found["id"] != own["id"]:
            theirs[info.key] = (found["id"], int(found["attempt"] or 1))
        elif int(found["attempt"] or 1) < attempt:
            ours[info.key] = f"attempt {attempt} of its flow run started"
    try:
        gone, running = _ask_api({i for i, _ in theirs.values()}) if theirs else ({}, {})
    except Exception as err:  # the API hiccuped: the next run looks again
        logger.warning("could not ask the Prefect API about %d earlier runs: %s", len(theirs), err)
        gone, running = {}, {}
    whys: dict[str, str | None] = dict(ours)  # None: the current attempt of a Running flow run, judged by its process
    for key, (run_id, at) in theirs.items():
        if run_id in gone:
            whys[key] = gone[run_id]
        elif run_id in running:
            whys[key] = f"attempt {running[run_id]} of its flow run started" if at < running[run_id] else None
    marked = 0
    for key, why in whys.items():
        try:
            marked += _mark(out, key, why, logger, spare)
        except Exception as err:  # an odd report, the storage, the API: never this run's failure
            logger.warning("could not mark %s crashed: %s", out.uri_for(key), err)
    return marked


def _mark(out: Storage, key: str, why: str | None, logger, spare: set[str] = frozenset()) -> bool:
    """Mark the report at ``key`` crashed for ``why`` if it still says "running"; ``why`` None:
    only if the process it recorded is gone from this machine, once the API has taken the flow
    run's Crashed state (read again then: the run may have ended meanwhile). A run this API does
    not know whose report names another server's API (``_judged_elsewhere``) is judged by its
    process and its age alone."""
    if (found := still_running(out, key)) is None:
        return False
    run = {"id": found.get("flow_run_id") or _REPORT_KEY.match(key)["id"], "name": found.get("flow_run")}
    if why == UNKNOWN and process_alive(found.get("process")):
        # unknown to this API, but its process runs on this machine (another Prefect home's
        # temporary API, another user's, a database reset under it): it will write its own end;
        # past ELSEWHERE_STALE_S, as another API's run, it is over (a notebook kernel that lost its end)
        if (why := _stale(found)) is None:
            logger.info("%s says running, and its process runs on this machine: left alone", out.uri_for(key))
            return False
    elsewhere = _judged_elsewhere(found) if why == UNKNOWN else None
    if elsewhere:  # not ours to ask, nor to set Crashed: its report is all this run can mend
        if (why := process_gone(found.get("process")) or _stale(found)) is None:
            logger.info("%s says running on another Prefect API (%s): left alone", out.uri_for(key), elsewhere)
            return False
        if still_running(out, key) is None:
            return False  # it ended meanwhile: its report is its own
    elif why is None:
        if (why := process_gone(found.get("process"))) is None:
            return False  # alive, or not this machine's to judge
        if not _crash_in_api(run["id"], why, logger, spare) or still_running(out, key) is None:
            return False  # the run ended meanwhile (Completed cannot become Crashed): its report is its own
    retrying(lambda: out.write(key, report_bytes(stopped_report(run, CRASHED, why)), "application/json"))
    logger.warning("%s said running, but %s: marked crashed", out.uri_for(key), why)
    return True


def api_identity() -> str:
    """The Prefect API this process uses, as a report records it (``identity_of``)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return identity_of(settings.api.url, settings.server.database.connection_url.get_secret_value())


def identity_of(api_url: str | None, database_url: str) -> str:
    """A Prefect API as a report records it, never with credentials: its URL without user,
    password, query or fragment, and this machine's name where the URL is a loopback one (each
    machine's 127.0.0.1:4200 is its own `nst serve` server); or, for the temporary API (no API
    URL), TEMPORARY_API, this machine's name and the database that keeps its runs (one started
    again on the same database knows the same runs)."""
    def bare(url: str) -> str:
        return re.split(r"[?#]", without_userinfo(url), maxsplit=1)[0].rstrip("/")

    if not api_url:
        return f"{TEMPORARY_API} on {socket.gethostname()}: {bare(database_url)}"
    host = (urllib.parse.urlsplit(api_url).hostname or "").lower()
    try:
        ip = ipaddress.ip_address(host)
        # 0.0.0.0 and [::] too: copied from a server's --host, each machine reaches its own there
        loopback = ip.is_loopback or ip.is_unspecified
    except ValueError:  # a name
        loopback = host == "localhost"
    return f"{bare(api_url)} on {socket.gethostname()}" if loopback else bare(api_url)


def _judged_elsewhere(found: dict) -> str | None:
    """For the report ``found`` of a run this API does not know: None when it may be marked as
    unknown (it names no API, or ours, or another temporary API: one that dies with its container
    takes its runs with it, and nothing could judge them after), else that other API: a server's
    run is judged by its process alone, or by its age past ELSEWHERE_STALE_S."""
    api = found.get("api")
    if not isinstance(api, str) or api.startswith(TEMPORARY_API) or api == api_identity():
        return None
    return api


def _stale(found: dict) -> str | None:
    """Why a report whose run this run cannot ask about (another API's; one whose process lives on
    this machine, unknown to this API) is over by its age alone, or None."""
    try:
        started = datetime.fromisoformat(found["started"])
        age = (datetime.now(timezone.utc) - started).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None
    if age <= ELSEWHERE_STALE_S:
        return None
    return f"its run started {age / 86400:.0f} days ago and never wrote its report"


def still_running(out: Storage, key: str) -> dict | None:
    """The report at ``key`` if it still says "running" (the write probe), else None."""
    found = json.loads(retrying(lambda: out.read(key))[0])
    return found if isinstance(found, dict) and found.get("status") == RUNNING else None


def _crash_in_api(flow_run_id: str, why: str, logger, spare: set[str] = frozenset()) -> bool:
    """Set a Running flow run whose process is gone Crashed, and cancel its chunk runs (a fan-out
    parent's) but those of ``spare``, which this run adopts. True when the API took the state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            taken = client.set_flow_run_state(UUID(flow_run_id), Crashed(message=f"nst: {why}")).status
    except Exception as err:
        logger.warning("could not set flow run %s Crashed: %s", flow_run_id, err)
        return False
    if taken != SetStateStatus.ACCEPT:
        return False
    try:
        cancel_children(flow_run_id, f"{PARENT_STOPPED} crashed", keep=spare)
    except Exception as err:
        logger.warning("could not cancel the chunk runs of flow run %s: %s", flow_run_id, err)
    return True
