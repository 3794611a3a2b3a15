"""`nst serve` against a real Prefect API: its own deployment names, the prefect.yaml ones untouched."""

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
