"""`nst batch` as a process: Ctrl-C stops it within seconds (exit 130), its run recorded as crashed
and no server left behind; kill -9 mid-run, then the same command again, redoes no completed pair
and never shows a partial or temporary object."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from nst_core import StyleParams

from helpers import pattern

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
PAIRS = 4
#: After Ctrl-C, `nst batch` exits within this long whatever it is doing (flows/cli.py: "a second
#: Ctrl-C, or 10 s later, exits at once"): a promise of the product, not a benchmark.
EXIT_AFTER_CTRL_C_S = 10
#: Signal delivery, os._exit and the kernel reaping the process group; not room for a slower exit.
SLACK_S = 5


def _command(tmp_path: Path, output: str = "out", iterations: int = 30) -> list[str]:
    cmd = [sys.executable, "-m", "flows.cli", "batch", "--contents", str(tmp_path / "c"), "--styles",
           str(tmp_path / "s"), "--output", str(tmp_path / output), "--weights", "random", "--device", "cpu",
           "--image-size", "32", "--iterations", str(iterations), "--window", "2"]
    if "scales" in StyleParams.model_fields:
        cmd += ["--scales", "1"]
    return cmd


def _start(tmp_path: Path, **command) -> subprocess.Popen:
    """`nst batch` as a first run makes it: no PREFECT_API_URL, so on Prefect's temporary API, in
    one Prefect home for the whole test (its database is the home's prefect.db, which the test reads)."""
    env = {k: v for k, v in os.environ.items() if k not in (
        "PREFECT_API_URL", "PREFECT_UI_API_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL",
        "PREFECT_API_DATABASE_CONNECTION_URL")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PYTHONPATH": str(ROOT)})
    # output to a file, not a pipe: a server left running would hold a pipe open and hang its reader
    log = tmp_path / f"nst-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(_command(tmp_path, **command), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: the test can stop all of it
    proc.log = log
    return proc


def _output(proc: subprocess.Popen) -> str:
    return proc.log.read_text(errors="replace")


def _sidecars(out: Path) -> list[Path]:
    return sorted(out.glob("*.json")) if out.exists() else []


def _wait_for(predicate, deadline_s: float, proc: subprocess.Popen) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"nst batch ended early ({proc.returncode}): {_output(proc)[-2000:]}")
        if time.monotonic() > end:
            pytest.fail("timed out waiting for the batch to make progress")
        time.sleep(0.2)


def _visible_outputs_are_whole(out: Path) -> None:
    """What a reader of the output sees: whole images and sidecars at the top, reports under _runs/,
    nothing else. Temp files live only under .nst-tmp/ (outside every listing), named {pid}-{hex}.{host}."""
    from tasks.storage import TEMP_DIR, LocalStorage

    if not out.exists():
        return
    for path in out.iterdir():
        assert path.name in (TEMP_DIR, "_runs") or (path.is_file() and path.suffix in (".jpg", ".json")), path
    for info in LocalStorage(out).list():
        path = out / info.key
        assert info.key.startswith("_runs/") or "/" not in info.key, info.key
        if path.suffix == ".jpg":
            with Image.open(path) as img:
                img.load()  # a partial JPEG raises here
        elif path.suffix == ".json":
            json.loads(path.read_text())
    for path in (out / TEMP_DIR).glob("*") if (out / TEMP_DIR).exists() else []:
        assert re.fullmatch(r"\d+-[0-9a-f]{32}", path.name), path


def test_ctrl_c_then_kill_9_then_rerun(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "s").mkdir()
    for i in range(PAIRS):
        pattern((32, 24), "content", i).save(tmp_path / "c" / f"c{i}.png")
    pattern((24, 32), "style").save(tmp_path / "s" / "s.png")
    out = tmp_path / "out"
    procs = []
    try:
        # 1. Ctrl-C (the terminal sends SIGINT to the whole foreground group) once a pair is done.
        proc = _start(tmp_path)
        procs.append(proc)
        _wait_for(lambda: len(_sidecars(out)) >= 1, 300, proc)
        os.killpg(proc.pid, signal.SIGINT)
        signalled = time.monotonic()
        try:
            code = proc.wait(timeout=EXIT_AFTER_CTRL_C_S + SLACK_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"nst batch still running {time.monotonic() - signalled:.1f} s after Ctrl-C "
                        f"(it promises to exit within {EXIT_AFTER_CTRL_C_S} s)")
        output = _output(proc)
        assert code == 130, output[-2000:]
        assert "Traceback" not in output, output[-3000:]  # stopping on request is not an error
        _visible_outputs_are_whole(out)
        # The run recorded its end. Old: the Ctrl-C stopped the temporary server too (it was in nst's
        # group), the database kept the run RUNNING, and nst left through its 10 s watchdog.
        with contextlib.closing(sqlite3.connect(tmp_path / "prefect-home" / "prefect.db")) as db:
            assert db.execute("SELECT state_type FROM flow_run").fetchall() == [("CRASHED",)], output[-3000:]
        _assert_server_stopped(output)

        # 1b. The temporary server dies mid-run (killed, crashed): nst starts it again on its port.
        # Old: every API call retried in vain; nst ended 215 s later, exit 1 with tracebacks, its
        # run left Running. Then SIGTERM to nst's process group, as `timeout` sends it: the run is
        # recorded crashed (through the restarted server), nst exits 143 and stops its server.
        # Old: SIGTERM's default ended nst where it stood (-15) and left its server running.
        # Its own output, at 10x the evaluations: the run outlasts the restart by far, and the SIGTERM
        # must stop pairs mid-way (old: the task runner waited for the pairs in flight to finish,
        # 21 s here, before the run could record its end; minutes for real pairs).
        slow = tmp_path / "out-slow"
        proc = _start(tmp_path, output=slow.name, iterations=300)
        procs.append(proc)
        _wait_for(lambda: "evaluation" in _output(proc), 300, proc)
        port = _server_ports(_output(proc))[0]
        for pid in _serving(port):
            os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: "starting it again" in _output(proc) and _answers(port), 120, proc)
        assert len(_sidecars(slow)) < PAIRS
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=EXIT_AFTER_CTRL_C_S + SLACK_S)
        output = _output(proc)
        assert code == 143, output[-2000:]
        # the pairs stopped mid-way end Cancelled, one line each (old: a traceback per pair, at ERROR)
        assert "Traceback" not in output, output[-3000:]
        assert re.search(r"Task run '[^']+' - Finished in state Cancelled\('[^']+: run interrupted before the pair "
                         r"finished'\)", output), output[-3000:]
        _visible_outputs_are_whole(slow)
        assert [json.loads(p.read_text())["status"] for p in (slow / "_runs").glob("*.json")] == ["crashed"]
        _assert_server_stopped(output)
        with contextlib.closing(sqlite3.connect(tmp_path / "prefect-home" / "prefect.db")) as db:
            assert db.execute("SELECT state_type FROM flow_run").fetchall() == [("CRASHED",)] * 2, output[-3000:]

        # 2. kill -9 mid-run (an OOM kill, a crash: no handler runs), on the temporary API: the
        # kernel stops its server too. Old: the server, in a session of its own, served for ever.
        before = {p.name: p.stat().st_mtime_ns for p in _sidecars(out)}
        proc = _start(tmp_path)
        procs.append(proc)
        _wait_for(lambda: len(_sidecars(out)) > len(before), 240, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        _visible_outputs_are_whole(out)
        # nst did not stop it: the kernel's SIGTERM starts uvicorn's own graceful shutdown
        _assert_server_stopped(_output(proc), within_s=EXIT_AFTER_CTRL_C_S + SLACK_S)
        done = {p.name: p.stat().st_mtime_ns for p in _sidecars(out)}

        # 3. The same command again finishes everything and redoes nothing that was done.
        proc = _start(tmp_path)
        procs.append(proc)
        proc.wait(timeout=400)
        output = _output(proc)
        assert proc.returncode == 0, output[-3000:]
        reports = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
        # Ctrl-C's report says "crashed"; so does the killed run's (its write probe said "running"),
        # marked by this run, which also sets its flow run Crashed: the API still called it Running
        # (no worker watched it), but its process is gone from this machine. Old: both said running.
        assert sorted(r["status"] for r in reports if r["status"] != "finished") == ["crashed", "crashed"]
        # Ctrl-C's says what it made before the stop; the killed run's could not
        stopped = [r for r in reports if r["status"] == "crashed" and "totals" in r]
        # (its pair may be written but not yet collected at Ctrl-C: every pair is accounted for, not "done >= 1")
        assert len(stopped) == 1 and stopped[0]["totals"]["pairs"] == PAIRS, reports
        assert sum("is gone from this machine" in r.get("error", "") for r in reports) == 1, reports
        with contextlib.closing(sqlite3.connect(tmp_path / "prefect-home" / "prefect.db")) as db:
            states = [s for (s,) in db.execute("SELECT state_type FROM flow_run ORDER BY created")]
        assert states == ["CRASHED"] * 3 + ["COMPLETED"], states
        last = max((r for r in reports if r["status"] == "finished"), key=lambda r: r["finished"])
        assert last["totals"]["pairs"] == PAIRS and last["totals"]["failed"] == 0
        assert last["totals"]["skipped"] == len(done) and last["totals"]["done"] == PAIRS - len(done)
        assert {p.name: p.stat().st_mtime_ns for p in _sidecars(out) if p.name in done} == done
        assert len(_sidecars(out)) == PAIRS and len(list(out.glob("*.jpg"))) == PAIRS
        _visible_outputs_are_whole(out)
        assert not list((out / ".nst-tmp").iterdir())  # what the killed run left is cleaned
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for port in _server_ports(_output(proc)):  # a server a failed step left
                for pid in _serving(port):
                    os.kill(pid, signal.SIGKILL)



def test_a_second_ctrl_c_exits_at_once_and_the_run_is_still_recorded_crashed(tmp_path):
    """Ctrl-C twice: nst exits at once (os._exit). Old: the flow run stayed RUNNING in the API for
    good (the rerun's sweep reads only reports still saying "running", and this one said "crashed")."""
    (tmp_path / "c").mkdir()
    (tmp_path / "s").mkdir()
    for i in range(PAIRS):
        pattern((32, 24), "content", i).save(tmp_path / "c" / f"c{i}.png")
    pattern((24, 32), "style").save(tmp_path / "s" / "s.png")
    proc = _start(tmp_path, iterations=200)
    try:
        _wait_for(lambda: "evaluation" in _output(proc) or _sidecars(tmp_path / "out"), 300, proc)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.05)  # the first one handled (two pending SIGINTs are one), the run still unwinding
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=EXIT_AFTER_CTRL_C_S + SLACK_S)
        output = _output(proc)
        assert code == 130 and "interrupted again, exiting now" in output, output[-2000:]
        _assert_server_stopped(output)
        with contextlib.closing(sqlite3.connect(tmp_path / "prefect-home" / "prefect.db")) as db:
            assert db.execute("SELECT state_type FROM flow_run").fetchall() == [("CRASHED",)], output[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for port in _server_ports(_output(proc)):
            for pid in _serving(port):
                os.kill(pid, signal.SIGKILL)


def _assert_server_stopped(output: str, within_s: float = SLACK_S) -> None:
    """The temporary API server of an exited `nst` (in a session of its own, so not in nst's
    process group) is gone: no process serves the port nst logged, within ``within_s``."""
    ports = _server_ports(output)
    assert len(ports) == 1, output[-3000:]
    end = time.monotonic() + within_s
    while (left := _serving(ports[0])) and time.monotonic() < end:
        time.sleep(0.2)
    assert not left, left


def _server_ports(output: str) -> list[str]:
    return re.findall(r"Starting temporary server on http://127\.0\.0\.1:(\d+)", output)


def _answers(port: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _serving(port: str) -> dict[int, str]:
    """pid: command line of each running Prefect API server on ``port`` (an exited process has none)."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            args = cmdline.read_bytes().split(b"\0")
            if b"prefect.server.api.server:create_app" in args and port.encode() in args:
                found[int(cmdline.parent.name)] = b" ".join(args).decode()
    return found
