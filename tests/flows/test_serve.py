"""`nst serve` against a real Prefect API: its own deployment names, the prefect.yaml ones untouched."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

from flows.serve import deployments

from helpers import stop_process

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
YAML_NAMES = ("stylize-batch/nightly", "stylize-batch/on-demand", "stylize-chunk/worker")
SERVED = ("stylize-batch/served", "stylize-chunk/served")


def test_served_deployments_have_their_own_names_and_chunk_target():
    served = {d.flow_name + "/" + d.name: d for d in deployments()}
    assert set(served) == set(SERVED)
    assert all(d.enforce_parameter_schema for d in served.values())
    # the served batch deployment's chunk runs go to the served chunk deployment, not prefect.yaml's worker
    assert served["stylize-batch/served"].parameters["run"]["chunk_deployment"] == "stylize-chunk/served"
    # one chunk run at a time, which leases every device of the machine (old: unlimited, each chunk
    # run a process of its own sizing its steps from the same GPUs' free memory); batch runs, which
    # compute nothing with fan-out "workers", unlimited
    assert served["stylize-chunk/served"].concurrency_limit == 1
    assert served["stylize-batch/served"].concurrency_limit is None
    # ... and "workers" is what a run from the form does unless told otherwise: with "local" (the old
    # default) two runs started from the UI each stylized in their own process on every GPU at once
    assert served["stylize-batch/served"].parameters["run"]["fan_out"] == "workers"


def test_under_a_limit_batch_runs_leave_a_slot_for_their_chunks():
    """`nst serve --limit 2` and two batch runs started from the UI: old, both parents took the two
    slots and their chunk runs waited until the start limit cancelled them. Now the served batch
    deployment's own concurrency limit is one under --limit: a further batch run waits in
    AwaitingConcurrencySlot (the runner gives its slot back), a chunk run always finds one."""
    for limit in (2, 5):
        served = {d.flow_name: d for d in deployments(limit=limit)}
        assert served["stylize-batch"].concurrency_limit == limit - 1
        assert served["stylize-chunk"].concurrency_limit == 1
    assert {d.flow_name: d for d in deployments()}["stylize-batch"].concurrency_limit is None


@pytest.mark.usefixtures("prefect_api")
def test_the_batch_limit_reaches_the_api_and_goes_when_served_without_limit():
    from prefect.client.orchestration import get_client

    def batch_limit():
        with get_client(sync_client=True) as client:
            gcl = client.read_deployment_by_name("stylize-batch/limits").global_concurrency_limit
        return gcl and gcl.limit

    for d in deployments("limits", limit=3):
        d.apply()
    assert batch_limit() == 2
    for d in deployments("limits"):  # served again without --limit: no limit left behind
        d.apply()
    assert batch_limit() is None



def _snapshot(client, name: str) -> dict:
    d = client.read_deployment_by_name(name)
    return {"pull_steps": d.pull_steps, "paused": d.paused, "work_pool": d.work_pool_name,
            "path": d.path, "entrypoint": d.entrypoint, "parameters": d.parameters,
            "schedules": [(s.schedule.model_dump(mode="json"), s.active) for s in d.schedules]}


@pytest.mark.usefixtures("prefect_api")
def test_nst_serve_leaves_the_prefect_yaml_deployments_alone(tmp_path):
    """Old code served stylize-batch/on-demand and stylize-chunk/worker: it replaced their pull
    steps and paused them on exit. Now serve registers …/served and the pool-backed ones keep
    their pull steps, pools and paused state after serve stops."""
    from prefect.client.orchestration import get_client

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    for pool in ("nst-control", "nst-gpu"):
        subprocess.run([PREFECT, "work-pool", "create", pool, "--type", "process"], env=env, cwd=ROOT,
                       capture_output=True)  # may exist from another test of this session
    deploy = subprocess.run([PREFECT, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all"],
                            env=env, cwd=ROOT, capture_output=True, text=True)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    with get_client(sync_client=True) as client:
        before = {n: _snapshot(client, n) for n in YAML_NAMES}
    assert before["stylize-batch/nightly"]["schedules"][0][1] is False  # shipped inactive (placeholders)

    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve"], env=env, cwd=ROOT, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        found, deadline = {}, time.time() + 120
        with get_client(sync_client=True) as client:
            while time.time() < deadline and len(found) < 2:
                time.sleep(1)
                for name in SERVED:
                    try:
                        found[name] = client.read_deployment_by_name(name)
                    except Exception:
                        pass
        assert set(found) == set(SERVED), log.read_text()[-3000:]
        assert proc.poll() is None  # still serving
        assert found["stylize-batch/served"].parameters["run"]["chunk_deployment"] == "stylize-chunk/served"
    finally:
        stop_process(proc, timeout=60)
    with get_client(sync_client=True) as client:
        after = {n: _snapshot(client, n) for n in YAML_NAMES}
    assert after == before
    assert all(after[n]["pull_steps"] for n in YAML_NAMES)


@pytest.mark.usefixtures("prefect_api")
def test_nst_serve_refuses_a_name_that_a_work_pool_deployment_uses():
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    subprocess.run([PREFECT, "work-pool", "create", "nst-control", "--type", "process"], env=env, cwd=ROOT,
                   capture_output=True)
    deploy = subprocess.run([PREFECT, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml",
                             "--name", "on-demand"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    out = subprocess.run([sys.executable, "-m", "flows.cli", "serve", "--name", "on-demand"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "stylize-batch/on-demand is declared in deployments/prefect.yaml" in out.stderr
    assert "Traceback" not in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP", "SIGKILL"])
def test_nst_serve_without_api_url_starts_a_server_and_prints_its_ui_url(tmp_path, stop):
    """Stopped however it is stopped, its server stops too. Old: a closed terminal (SIGHUP) or a
    kill -9 / OOM kill left the server (in a session of its own) answering for ever, and the next
    nst serve adopted it as "a server already answering"."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_UI_API_URL")}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", str(port)], env=env, cwd=ROOT,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, text = time.time() + 150, ""
        while time.time() < deadline and "Prefect UI:" not in text:
            time.sleep(1)
            text = log.read_text()
            assert proc.poll() is None, text
        ui = re.search(r"Prefect UI: (\S+)", text)
        assert ui and ui.group(1).startswith(f"http://127.0.0.1:{port}"), text
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=10) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            assert resp.status == 200 and b"<html" in resp.read().lower()  # a UI is served there
        if stop != "SIGTERM":
            os.kill(proc.pid, getattr(signal, stop))  # nst serve alone, as a closed terminal or the OOM killer does
            proc.wait(timeout=60)
    finally:
        stop_process(proc, timeout=60)
    deadline = time.time() + 30  # SIGTERM: stopped before nst exits; kill -9: the kernel signals it then
    while time.time() < deadline and _answers(port):
        time.sleep(0.5)
    with pytest.raises(OSError):  # the server it started stopped with it
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5)


def test_a_closed_terminal_ends_nst_serve_within_its_bound_even_while_its_server_hangs(tmp_path):
    """Old: with its server hung (stopped here; a locked database or a stuck disk in life), Prefect's
    graceful stop waited on the API for ever: nst serve outlived its closed terminal (240 s and
    counting), its port taken. Now it exits 129 NST_SERVE_STOP_S after the SIGHUP, with one line,
    and its server ends with it."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_UI_API_URL")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), NST_SERVE_STOP_S="5")
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", str(port)], env=env, cwd=ROOT,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    server = None
    try:
        deadline = time.time() + 150
        while "Prefect UI:" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.5)
        time.sleep(2)  # serving
        server = next(pid for pid in _children(proc.pid) if b"server" in Path(f"/proc/{pid}/cmdline").read_bytes())
        os.kill(server, signal.SIGSTOP)
        os.kill(proc.pid, signal.SIGHUP)
        assert proc.wait(timeout=40) == 129, log.read_text()[-3000:]
        assert "nst: serving did not stop within 5 s (is the Prefect API answering?); exiting now" in log.read_text()
    finally:
        if server is not None:
            os.kill(server, signal.SIGCONT)  # its end-with-nst signal, pending while it was stopped, acts
        stop_process(proc, timeout=10)
    deadline = time.time() + 30
    while time.time() < deadline and _answers(port):
        time.sleep(0.5)
    assert not _answers(port)


def _children(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == pid]


def _parent(proc_dir: Path) -> int | None:
    try:  # "pid (comm) state ppid ...": comm may hold spaces, so read after its closing parenthesis
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _waiter(log: Path, proc: subprocess.Popen | None = None):
    """wait_for(what, predicate, deadline_s): predicate's first truthy value, polled every 0.5 s; a
    failed test, with nst serve's log, when the deadline passes (or ``proc`` exits)."""
    def wait_for(what, predicate, deadline_s):
        end = time.monotonic() + deadline_s
        while not (found := predicate()):
            if proc is not None:
                assert proc.poll() is None, f"nst serve exited ({proc.returncode}): {log.read_text()[-3000:]}"
            assert time.monotonic() < end, f"timed out waiting for {what}: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        return found

    return wait_for


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
            return True
    except OSError:
        return False


def test_serve_refuses_the_prefect_yaml_names_even_before_they_are_deployed():
    """Old code checked only deployments already on the server: `nst serve --name nightly` before
    `prefect deploy` registered stylize-batch/nightly as a served deployment (paused on exit), and
    the later deploy and this serve took turns rewriting it."""
    from flows.serve import check_names_are_free, prefect_yaml_names
    from nst_core.errors import NSTError

    assert prefect_yaml_names() == {"nightly", "on-demand", "worker"}
    for name in ("stylize-batch/nightly", "stylize-chunk/worker"):
        with pytest.raises(NSTError, match="declared in deployments/prefect.yaml"):
            check_names_are_free([name])


@pytest.mark.usefixtures("prefect_api")
def test_serve_refuses_an_existing_deployment_it_did_not_make():
    """Old code refused only pool-backed ones: another script's served deployment of the same name
    was rewritten and paused when nst serve stopped."""
    from flows.batch import stylize_batch
    from flows.serve import check_names_are_free, serve_deployments
    from nst_core.errors import NSTError

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name="other-pool", type="process"))
        except ObjectAlreadyExists:
            pass
    stylize_batch.to_deployment(name="pooled", work_pool_name="other-pool").apply()
    with pytest.raises(NSTError, match="already exists on work pool 'other-pool'"):
        check_names_are_free(["stylize-batch/pooled"])
    stylize_batch.to_deployment(name="someone-elses").apply()
    with pytest.raises(NSTError, match="nst serve did not create it"):
        check_names_are_free(["stylize-batch/someone-elses"])
    deployments("ours")[0].apply()  # one nst serve registered earlier: served again
    check_names_are_free(["stylize-batch/ours"])
    for bad in ("", "a/b", " x"):
        with pytest.raises(NSTError, match="--name"):
            serve_deployments(name=bad)


class _Forwarder:
    """A TCP forwarder on 127.0.0.1 in front of an API, which can go away (connections refused, the
    open ones cut, as when a server restarts) and come back on the same port."""

    def __init__(self, target_port: int):
        self.target, self.port, self.listener, self.conns = target_port, _free_port(), None, []

    def up(self) -> None:
        import threading

        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        with contextlib.suppress(OSError):  # close alone leaves a socket in accept() listening (Linux)
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self.conns = []

    def _accept(self, listener) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # down
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)


@pytest.mark.usefixtures("prefect_api")
def test_nst_serve_serves_again_when_its_lost_api_answers_again(tmp_path):
    """Old: the runner gave up on a lost API after three failed polls (a server restart, an
    upgrade) and nst serve exited: an unattended nst serve served no nightly after the server's
    first restart unless a supervisor started it again. Now it waits for the API and serves again:
    a run started from the UI after the outage is picked up and finishes."""
    import uuid
    from urllib.parse import urlparse

    from prefect.client.orchestration import get_client

    from tasks.models import BatchSource, OutputSpec, RunOptions

    from helpers import pattern, tiny_params

    api = PREFECT_API_URL.value()
    forwarder = _Forwarder(urlparse(api).port)
    forwarder.up()
    url = api.replace(f":{urlparse(api).port}", f":{forwarder.port}")
    name = f"resume-{uuid.uuid4().hex[:8]}"
    # one retry per call: the runner gives up in seconds, not minutes, and the run it serves still
    # rides out a busy server's 503 (with none, the session's API under the suite's load failed one)
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PREFECT_CLIENT_MAX_RETRIES": "1", "PYTHONPATH": str(ROOT)}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--name", name], cwd=ROOT, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)

    wait_for = _waiter(log, proc)

    try:
        wait_for("serving", lambda: "Prefect UI:" in log.read_text(), 120)
        time.sleep(2)  # the runner's first polls
        forwarder.down()
        wait_for("the lost API to be said", lambda: "serving again once it answers" in log.read_text(), 120)
        forwarder.up()
        wait_for("serving again", lambda: "answers again: serving" in log.read_text(), 60)
        assert "nst: error" not in log.read_text()

        (tmp_path / "c").mkdir()
        (tmp_path / "s").mkdir()
        pattern((24, 24), "content").save(tmp_path / "c" / "c.png")
        pattern((24, 24), "style").save(tmp_path / "s" / "s.png")
        parameters = {"source": BatchSource(contents=str(tmp_path / "c"), styles=str(tmp_path / "s")),
                      "output": OutputSpec(uri=str(tmp_path / "out")), "params": tiny_params(),
                      "run": RunOptions(fan_out="local", devices=["cpu"])}
        with get_client(sync_client=True) as client:  # the UI's Run button, after the outage
            deployment = wait_for("the deployment served again", lambda: (
                d := client.read_deployment_by_name(f"stylize-batch/{name}")).status.value == "READY" and d, 60)
            assert not deployment.paused  # the runner paused it when it gave up, if the API let it
            run = client.create_flow_run_from_deployment(
                deployment.id, parameters={k: v.model_dump(mode="json") for k, v in parameters.items()})
            state = wait_for("the run to end", lambda: (s := client.read_flow_run(run.id).state).is_final() and s, 180)
        assert state.is_completed(), f"{state.name}: {state.message}\n{log.read_text()[-3000:]}"
        assert len(list((tmp_path / "out").glob("*.json"))) == 1
    finally:
        stop_process(proc, timeout=60)
        forwarder.down()


@pytest.mark.usefixtures("prefect_api")
def test_a_closed_terminal_stops_nst_serve_on_an_api_and_the_run_it_served_is_recorded_ended(tmp_path):
    """PREFECT_API_URL set; the terminal closes (SIGHUP to the whole group, the served run's process
    in it) while a run is mid-pair. Old: SIGHUP's default ended nst serve at once, the run died with
    it unrecorded: Running for good in the UI, and the next run adopted its chunks. Now nst serve
    stops as on SIGTERM and the run ends in a final state."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from tasks.models import BatchSource, OutputSpec, RunOptions

    from helpers import pattern, tiny_params

    name = f"hup-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PYTHONPATH": str(ROOT)}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--name", name], cwd=ROOT, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)

    wait_for = _waiter(log)

    try:
        wait_for("serving", lambda: "Prefect UI:" in log.read_text(), 120)
        (tmp_path / "c").mkdir()
        (tmp_path / "s").mkdir()
        for i in range(3):
            pattern((48, 48), "content", i).save(tmp_path / "c" / f"c{i}.png")
        pattern((48, 48), "style").save(tmp_path / "s" / "s.png")
        parameters = {"source": BatchSource(contents=str(tmp_path / "c"), styles=str(tmp_path / "s")),
                      "output": OutputSpec(uri=str(tmp_path / "out")),
                      "params": tiny_params(image_size=48, iterations=100000),  # still running when stopped
                      "run": RunOptions(fan_out="local", devices=["cpu"])}
        with get_client(sync_client=True) as client:
            def served():
                try:  # registered once serving began, after the UI line
                    d = client.read_deployment_by_name(f"stylize-batch/{name}")
                except ObjectNotFound:
                    return None
                return d.status.value == "READY" and d

            deployment = wait_for("the deployment", served, 60)
            run = client.create_flow_run_from_deployment(
                deployment.id, parameters={k: v.model_dump(mode="json") for k, v in parameters.items()})
            wait_for("the run to start", lambda: client.read_flow_run(run.id).state.is_running(), 120)
            time.sleep(3)  # mid-pair
            os.killpg(proc.pid, signal.SIGHUP)  # the terminal closed: its whole process group
            assert proc.wait(timeout=90) >= 0, log.read_text()[-3000:]  # not killed by the signal
            state = wait_for("the run to be recorded ended",
                             lambda: (s := client.read_flow_run(run.id).state).is_final() and s, 60)
        assert state.name in ("Cancelled", "Crashed"), f"{state.name}: {state.message}"
    finally:
        stop_process(proc, timeout=60)


@pytest.mark.usefixtures("prefect_api")
def test_nohup_nst_serve_goes_on_serving_when_its_terminal_closes(tmp_path):
    """`nohup nst serve` (SIGHUP ignored, inherited): the closed terminal's SIGHUP must not stop it.
    Old (this session's first version of the SIGHUP stop): its handler replaced the ignore."""
    import uuid

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(ROOT)}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--name", f"nohup-{uuid.uuid4().hex[:8]}"],
                            cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        deadline = time.time() + 120
        while "Prefect UI:" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.5)
        time.sleep(2)  # serving
        os.kill(proc.pid, signal.SIGHUP)
        time.sleep(3)
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        stop_process(proc, timeout=60)


def test_the_ui_url_nst_serve_prints_carries_no_credentials(monkeypatch, capsys):
    """Prefect builds its UI URL from PREFECT_API_URL, user:password@ and all; nst serve printed it
    as is (under systemd, into the journal) where every other line of nst drops them."""
    import prefect
    from prefect.settings import temporary_settings

    from flows import serve

    monkeypatch.setattr(serve, "check_names_are_free", lambda names: None)
    monkeypatch.setattr(prefect, "serve", lambda *deployments, limit=None: None)
    with temporary_settings(updates={PREFECT_API_URL: "https://admin:s3cret@prefect.example.com/api"}):
        serve.serve_deployments()
    out = capsys.readouterr().out
    assert "Prefect UI: https://prefect.example.com" in out
    assert "s3cret" not in out and "admin" not in out


@contextlib.contextmanager
def _http_server(status: int, body: bytes):
    """A plain HTTP server on 127.0.0.1 answering every GET with ``status`` and ``body``; yields its port."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_only_a_prefect_api_counts_as_one_answering():
    """Any 200 on /api/health (a web app's health check; 4200 is Angular's port too) counted as a
    Prefect server already answering: nst serve used it and failed with "Expecting value: line 1
    column 1". Prefect's health check says ``true``."""
    from flows.serve import answers

    with _http_server(200, b"<html>ok</html>") as port:
        assert not answers(f"http://127.0.0.1:{port}/api")
    with _http_server(200, b"true") as port:
        assert answers(f"http://127.0.0.1:{port}/api")
    with socket.socket() as ssh:  # not HTTP at all: a banner, no status line (http.client's BadStatusLine)
        ssh.bind(("127.0.0.1", 0))
        ssh.listen()
        import threading

        def banner():
            conn, _ = ssh.accept()
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
                time.sleep(0.5)

        threading.Thread(target=banner, daemon=True).start()
        assert not answers(f"http://127.0.0.1:{ssh.getsockname()[1]}/api")


def test_a_local_server_on_a_taken_port_says_so_in_one_whole_line():
    """Prefect's console wraps at 80 columns off a terminal: the message was the wrapped line's tail
    ("exited (flag.); is the port in use?"); and every other failure was blamed on the port too."""
    from flows.serve import _exit_message, local_server
    from nst_core.errors import NSTError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(NSTError) as err:
            with local_server(port, timeout=120):
                pass
    assert str(err.value) == f"prefect server on port {port} exited: the port is in use; choose another with --port"
    other = _exit_message(4200, "Traceback ...\nsqlite3.OperationalError: unable to open database file\n", 3)
    assert other == "prefect server on port 4200 exited (sqlite3.OperationalError: unable to open database file)"


@pytest.mark.parametrize("port", ["0", "-1", "70000", "http"])
def test_a_port_no_server_can_listen_on_is_refused_at_once(port, capsys):
    """--port 0 waited 120 s for a server that could not answer there, -1 blamed the host, 70000
    was an OverflowError's traceback."""
    from flows.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--port", port])
    assert exit_.value.code == 2
    assert "--port" in capsys.readouterr().err
