"""Run reports left "running" by runs that are gone (kill -9, a lost machine) are marked crashed
by the next run on the same output."""

from __future__ import annotations

import json
import sys
import uuid

import pytest

from flows.batch import stylize_batch
from tasks.contract import report_bytes, running_report
from tasks.models import BatchSource, OutputSpec, RunOptions

from helpers import pattern, tiny_params

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]


def _one_pair_and_runs(tmp_path):
    """A content folder c/ and a style folder s/ of one image each; returns out/_runs/, made."""
    for folder, kind in (("c", "content"), ("s", "style")):
        (tmp_path / folder).mkdir()
        pattern((24, 24), kind).save(tmp_path / folder / f"{kind}.png")
    runs = tmp_path / "out" / "_runs"
    runs.mkdir(parents=True)
    return runs


def _batch(tmp_path):
    """stylize_batch of c/ x s/ into out/, its state."""
    return stylize_batch(BatchSource(contents=str(tmp_path / "c"), styles=str(tmp_path / "s")),
                         OutputSpec(uri=str(tmp_path / "out")), tiny_params(), RunOptions(), return_state=True)


def test_running_reports_whose_runs_ended_or_are_unknown_are_marked_crashed(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Crashed, Running

    runs = _one_pair_and_runs(tmp_path)
    with get_client(sync_client=True) as client:
        ended, crashed, alive = (client.create_flow_run(stylize_batch, name=name, state=state)
                                 for name, state in (("ended", Completed()), ("killed", Crashed()), ("alive", Running())))
    unknown = str(uuid.uuid4())
    for run_id, name in ((ended.id, "ended"), (crashed.id, "killed"), (alive.id, "alive"), (unknown, "elsewhere")):
        (runs / f"{run_id}.json").write_bytes(report_bytes(running_report({"id": str(run_id), "name": name})))
    finished = {"flow_run_id": str(ended.id), "totals": {"pairs": 1}, "items": []}
    (runs / "finished.json").write_text(json.dumps(finished))  # a full report: never touched

    state = _batch(tmp_path)
    assert state.is_completed(), state.message

    def report(run_id) -> dict:
        return json.loads((runs / f"{run_id}.json").read_text())

    assert report(ended.id)["status"] == "crashed" and "ended Completed" in report(ended.id)["error"]
    assert report(crashed.id)["status"] == "crashed" and "ended Crashed" in report(crashed.id)["error"]
    assert report(unknown)["status"] == "crashed" and "unknown to the Prefect API" in report(unknown)["error"]
    assert report(ended.id)["flow_run"] == "ended"  # the run's name is kept
    assert report(alive.id)["status"] == "running"  # still running as far as the API knows
    assert json.loads((runs / "finished.json").read_text()) == finished
    own = report(state.state_details.flow_run_id)
    assert own["totals"]["done"] == 1



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process identities are read from /proc")
def test_the_chunk_runs_a_new_parent_adopts_are_spared_when_their_killed_parent_is_marked_crashed(tmp_path,
                                                                                                  monkeypatch):
    """`nst batch --fan-out workers` killed with kill -9, then run again: the new parent crashed the
    old flow run and cancelled its chunk runs, then found them Cancelling, not adoptable, and started
    new ones: every pair in flight was thrown away and redone. Those the new parent adopts (live for
    its plan: ``spare``) are left running; the others are cancelled as before."""
    import logging
    import subprocess

    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from flows import orphans
    from flows.fanout import parent_tag
    from tasks.storage import open_storage

    monkeypatch.setattr(orphans, "get_run_logger", lambda: logging.getLogger("test"))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = orphans.this_process(child.pid)
    child.kill()
    child.wait()
    runs = tmp_path / "_runs"
    runs.mkdir()
    with get_client(sync_client=True) as client:
        parent = client.create_flow_run(stylize_batch, name="killed", state=Running()).id
        kept, other = (client.create_flow_run(stylize_batch, name=n, tags=[parent_tag(str(parent))], state=Running()).id
                       for n in ("adopted-chunk", "other-chunk"))
        (runs / f"{parent}.json").write_bytes(report_bytes(running_report({"id": str(parent), "name": "killed"},
                                                                          process=dead)))
        marked = orphans.mark_crashed_reports(open_storage(str(tmp_path)), {"id": "new", "attempt": 1},
                                              spare={str(kept)})
        assert marked == 1 and client.read_flow_run(parent).state.is_crashed()
        assert client.read_flow_run(kept).state.is_running()
        assert client.read_flow_run(other).state.type.value in ("CANCELLING", "CANCELLED")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process identities are read from /proc")
def test_a_report_of_a_run_on_another_prefect_api_is_left_alone_unless_its_process_is_gone(tmp_path):
    """The same output used from two Prefect APIs (the nightly deployment on a server, a rerun of
    a few pairs with `nst batch` on a temporary API): this API does not know the other's flow run.
    Old: its live run's report was marked crashed ("unknown to the Prefect API"). Now a report
    records its API; one of another server's API is marked only when its process is gone from this
    machine, or when it started more than a week ago (bounded: nothing here can ask that API). One
    of another temporary API is still "unknown": such an API dies with its container."""
    import subprocess
    from datetime import datetime, timedelta, timezone

    from flows.orphans import api_identity, this_process

    runs = _one_pair_and_runs(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = this_process(child.pid)
    child.kill()
    child.wait()
    other = "https://prefect.example.com/api"
    elsewhere = {**this_process(), "pid_ns": "pid:[1]"}  # a process this machine cannot judge
    week_ago = datetime.now(timezone.utc) - timedelta(days=8)
    ids = {name: str(uuid.uuid4()) for name in ("alive", "killed", "ours", "stale", "container")}
    for name, process, api, started in (
            ("alive", elsewhere, other, None), ("killed", dead, other, None), ("ours", None, api_identity(), None),
            ("stale", elsewhere, other, week_ago),
            ("container", elsewhere, "temporary API on 4f1c2a: sqlite+aiosqlite:////root/.prefect/prefect.db", None)):
        report = running_report({"id": ids[name], "name": name}, started, process=process, api=api)
        (runs / f"{ids[name]}.json").write_bytes(report_bytes(report))

    state = _batch(tmp_path)
    assert state.is_completed(), state.message

    def report(name) -> dict:
        return json.loads((runs / f"{ids[name]}.json").read_text())

    assert report("alive")["status"] == "running"
    assert report("killed")["status"] == "crashed" and f"(pid {child.pid}) is gone" in report("killed")["error"]
    assert report("ours")["status"] == "crashed" and "unknown to the Prefect API" in report("ours")["error"]
    assert report("stale")["status"] == "crashed" and "started 8 days ago" in report("stale")["error"]
    assert report("container")["status"] == "crashed" and "unknown to the Prefect API" in report("container")["error"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process identities are read from /proc")
def test_a_run_unknown_to_this_api_whose_process_lives_on_this_machine_is_left_alone(tmp_path):
    """Two Prefect homes on one machine (two users of a GPU box, root and a user, `nst batch` beside
    `nst serve`'s server) on one output: each temporary API knows only its own runs, so the other's
    live run was "unknown to the Prefect API" and its report marked crashed while it ran, though
    its process was alive right here; and the live run's own end then left that wrong reason."""
    import subprocess

    from flows.orphans import this_process

    runs = _one_pair_and_runs(tmp_path)
    from datetime import datetime, timedelta, timezone

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        neighbour = "temporary API on this-box: sqlite+aiosqlite:////home/other/.prefect/prefect.db"
        run_id, old_id = str(uuid.uuid4()), str(uuid.uuid4())
        report = running_report({"id": run_id, "name": "neighbour"}, process=this_process(child.pid), api=neighbour)
        (runs / f"{run_id}.json").write_bytes(report_bytes(report))
        # alive, but started 8 days ago (a notebook kernel that lost its end): over by its age, and said so
        week_ago = datetime.now(timezone.utc) - timedelta(days=8)
        old = running_report({"id": old_id, "name": "old"}, week_ago, process=this_process(child.pid), api=neighbour)
        (runs / f"{old_id}.json").write_bytes(report_bytes(old))
        state = _batch(tmp_path)
        assert state.is_completed(), state.message
        assert json.loads((runs / f"{run_id}.json").read_text())["status"] == "running"
        aged = json.loads((runs / f"{old_id}.json").read_text())
        assert aged["status"] == "crashed" and "started 8 days ago" in aged["error"], aged
    finally:
        child.kill()
        child.wait()
    state = _batch(tmp_path)
    assert state.is_completed(), state.message
    marked = json.loads((runs / f"{run_id}.json").read_text())
    assert marked["status"] == "crashed" and "unknown to the Prefect API" in marked["error"]  # once it is gone


def test_the_api_a_report_names_carries_no_credentials():
    from flows.orphans import identity_of

    assert identity_of("http://admin:pa/ss@host:4200/api/?token=t#x", "") == "http://host:4200/api"
    temporary = identity_of(None, "postgresql+asyncpg://prefect:p@ss@db:5432/prefect?password=x")
    assert temporary.startswith("temporary API on ") and temporary.endswith(": postgresql+asyncpg://db:5432/prefect")
    assert identity_of(None, "sqlite+aiosqlite:////home/me/.prefect/prefect.db").endswith(
        ": sqlite+aiosqlite:////home/me/.prefect/prefect.db")


def test_a_loopback_api_is_this_machines_own_and_another_machines_runs_on_theirs_are_not_unknown(monkeypatch):
    """Two machines each running `nst serve` without PREFECT_API_URL on one S3 output: both recorded
    "http://127.0.0.1:4200/api", so each took the other's live run for one of its own API that it
    did not know, and marked its report crashed while it ran."""
    import socket

    from flows import orphans
    from flows.orphans import identity_of

    here = socket.gethostname()
    for url in ("http://127.0.0.1:4200/api", "http://localhost:4200/api/", "http://[::1]:4200/api",
                "http://0.0.0.0:4200/api", "http://[::]:4200/api"):  # copied from a server's --host
        assert identity_of(url, "") == f"{url.rstrip('/')} on {here}"
    assert identity_of("https://prefect.example.com/api", "") == "https://prefect.example.com/api"
    monkeypatch.setattr(orphans, "api_identity", lambda: identity_of("http://127.0.0.1:4200/api", ""))
    theirs = {"api": "http://127.0.0.1:4200/api on gpu-box-2", "status": "running"}
    assert orphans._judged_elsewhere(theirs) == theirs["api"]
    assert orphans._judged_elsewhere({"api": f"http://127.0.0.1:4200/api on {here}"}) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process identities are read from /proc")
def test_a_run_the_api_calls_running_whose_process_is_gone_from_this_machine_is_marked_crashed(tmp_path):
    """`nst batch` killed with kill -9 (or an OOM kill) leaves its flow run Running in the API for
    ever: no worker watched it, and the temporary API has no zombie detection. Its report records
    its process; the next run on this machine sees that process gone and marks both the report and
    the flow run crashed (old: both said running for ever), and its queued chunk runs are
    cancelled. A live process, or one of another machine or container (another pid namespace), is
    left alone: nothing here can tell."""
    import subprocess

    from prefect.client.orchestration import get_client
    from prefect.states import Pending, Running, Scheduled

    from flows.fanout import parent_tag
    from flows.orphans import this_process

    runs = _one_pair_and_runs(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = this_process(child.pid)
    child.kill()
    child.wait()
    here = this_process()
    elsewhere = {**here, "pid_ns": "pid:[1]"}
    with get_client(sync_client=True) as client:
        ids = {name: client.create_flow_run(stylize_batch, name=name, state=Running()).id
               for name in ("killed", "alive", "elsewhere", "retried")}
        for state in (Scheduled(), Pending(), Running()):  # Prefect's Retry: attempt 2 runs (elsewhere)
            client.set_flow_run_state(ids["retried"], state, force=True)
        assert client.read_flow_run(ids["retried"]).run_count == 2
        chunks = {name: client.create_flow_run(stylize_batch, name=f"{name}-chunk", tags=[parent_tag(str(ids[name]))],
                                                state=Scheduled()).id for name in ("killed", "alive")}
        for name, process in (("killed", dead), ("alive", here), ("elsewhere", elsewhere), ("retried", dead)):
            report = running_report({"id": str(ids[name]), "name": name}, process=process)
            (runs / f"{ids[name]}.json").write_bytes(report_bytes(report))

        state = _batch(tmp_path)
        assert state.is_completed(), state.message
        killed = json.loads((runs / f"{ids['killed']}.json").read_text())
        assert killed["status"] == "crashed" and f"its process (pid {child.pid}) is gone" in killed["error"], killed
        assert client.read_flow_run(ids["killed"]).state.is_crashed()
        # a fan-out parent's queued chunk runs would otherwise run for no one (and the next parent
        # adopts only those of a run it re-runs)
        assert client.read_flow_run(chunks["killed"]).state.type.value in ("CANCELLING", "CANCELLED")
        assert client.read_flow_run(chunks["alive"]).state.is_scheduled()
        for name in ("alive", "elsewhere"):
            assert json.loads((runs / f"{ids[name]}.json").read_text())["status"] == "running", name
            assert client.read_flow_run(ids[name]).state.is_running(), name
        # attempt 1's report of a flow run whose attempt 2 runs: only the report is over, not the run
        # (first version: attempt 1's dead process crashed the live attempt 2)
        retried = json.loads((runs / f"{ids['retried']}.json").read_text())
        assert (retried["status"], retried["error"]) == ("crashed", "attempt 2 of its flow run started"), retried
        assert client.read_flow_run(ids["retried"]).state.is_running()
    own = json.loads((runs / f"{state.state_details.flow_run_id}.json").read_text())
    assert own["totals"]["done"] == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process identities are read from /proc")
def test_a_recorded_process_that_cannot_be_judged_is_never_called_gone(monkeypatch):
    """Odd values (a report is anyone's JSON) and a process /proc hides (hidepid: another user's)
    leave the run alone. First version: "pid": 1e400 raised OverflowError out of the run, and
    an unreadable /proc entry counted as gone."""
    from flows import orphans

    here = orphans.this_process()
    for odd in ({**here, "pid": 1e400}, {**here, "pid": True}, {**here, "started": "x"}, {**here, "pid": -1},
                {k: v for k, v in here.items() if k != "pid"}, 5, None, {**here, "boot": "another machine"}):
        assert orphans.process_gone(odd) is None, odd
    assert orphans.process_gone({**here, "started": here["started"] + 1}) is not None  # its pid, reused

    from tasks import processes

    readable = processes._stat

    def hidden(pid):  # pid 1's /proc entry hidden from this user; this process's own readable
        if pid == 1:
            raise PermissionError(13, "hidepid")
        return readable(pid)

    monkeypatch.setattr(processes, "_stat", hidden)
    assert orphans.process_gone({**here, "pid": 1}) is None  # pid 1 exists: kill(1, 0) says so


def test_an_earlier_attempt_of_this_run_that_still_says_running_is_marked_crashed(tmp_path, monkeypatch):
    """Prefect's Retry runs a flow run again under its id: attempt 2 knows attempt 1 is over."""
    import logging

    from flows import orphans
    from tasks.storage import open_storage

    monkeypatch.setattr(orphans, "get_run_logger", lambda: logging.getLogger("test"))
    runs = tmp_path / "_runs"
    runs.mkdir()
    run = {"id": "11111111-2222-3333-4444-555555555555", "name": "nightly"}
    (runs / f"{run['id']}.json").write_bytes(report_bytes(running_report(run)))
    (runs / f"{run['id']}-attempt-2.json").write_bytes(report_bytes(running_report(run)))
    assert orphans.mark_crashed_reports(open_storage(str(tmp_path)), {**run, "attempt": 2}) == 1
    first = json.loads((runs / f"{run['id']}.json").read_text())
    assert first["status"] == "crashed" and first["error"] == "attempt 2 of its flow run started"
    assert json.loads((runs / f"{run['id']}-attempt-2.json").read_text())["status"] == "running"  # this one
