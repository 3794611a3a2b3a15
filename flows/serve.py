"""`nst serve`: the batch and chunk flows served in this process, under their own names.

The embedded way to get a UI-triggerable setup on one machine, no work pool needed. It
registers ``stylize-batch/served`` and ``stylize-chunk/served`` — never the names of
deployments/prefect.yaml (``nightly``, ``on-demand``, ``worker``), so serving can neither
rewrite those deployments (their pull steps, pools, schedules) nor pause them when it stops.
Runs of the served batch deployment send their chunks (fan-out "workers") to the served chunk
deployment: that is the ``run.chunk_deployment`` default of the served batch deployment.

Without PREFECT_API_URL there is no UI to start runs from (Prefect's ephemeral API serves
none), so ``nst serve`` then starts a local ``prefect server`` on 127.0.0.1, prints its UI
URL, and stops it when serving stops.
"""

from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nst_core.cli import without_userinfo
from nst_core.errors import NSTError
from tasks.processes import dies_with_this_process

__all__ = ["SERVED_NAME", "SERVER_START_TIMEOUT_S", "deployments", "serve_deployments", "check_serve_options",
           "check_names_are_free",
           "prefect_yaml_names", "local_server", "answers"]

#: How long a Prefect server the CLI starts may take to answer, ours or Prefect's temporary API. A
#: fresh Prefect home first migrates its SQLite database: 12 s, then 8 s to serve, on a 2-core EPYC,
#: past Prefect's own 20 s default for its temporary API.
SERVER_START_TIMEOUT_S = 120
#: Deployment name both served flows use; prefect.yaml never uses it.
SERVED_NAME = "served"
#: Tag of the deployments nst serve registers (a name it may serve again).
_SERVE_TAG = "nst-serve"


def deployments(name: str = SERVED_NAME, limit: int | None = None):
    """The served deployments; the API enforces their parameter schemas. Under a runner ``limit``
    the batch deployment may run one fewer at once: a slot is always left for a chunk run."""
    from flows.batch import stylize_batch
    from flows.chunk import stylize_chunk
    from tasks.models import RunOptions

    chunk = f"stylize-chunk/{name}"
    # unset values left out: the form shows no "None" toggle, so the schema types them without null,
    # and Prefect checks a new deployment's parameters without the null allowance its runs get
    # fan-out "workers": the stylizing happens in the chunk runs, one at a time (below). A "local" run
    # stylizes in its own process, beside any other run's, each leasing every GPU of the machine.
    run_defaults = RunOptions(fan_out="workers", chunk_deployment=chunk).model_dump(mode="json", exclude_none=True)
    return [
        stylize_batch.to_deployment(
            name=name, enforce_parameter_schema=True, parameters={"run": run_defaults},
            tags=[_SERVE_TAG],
            # a parent holds its slot while its chunks wait for one: under --limit L, L parents would
            # hold them all; a further one waits in AwaitingConcurrencySlot and the runner frees its slot
            concurrency_limit=None if limit is None else limit - 1,
            description=(f"Served by `nst serve` on {_host()}: runs started from the UI's run form. "
                         f"Fan-out 'workers' sends chunks to {chunk}."),
        ),
        # one chunk run at a time: each is a process of its own leasing every device of the machine
        # (devices ["auto"]), and leases are per process, so two would share each GPU, each sizing its
        # steps from the same free memory
        stylize_chunk.to_deployment(
            name=name, enforce_parameter_schema=True, tags=[_SERVE_TAG], concurrency_limit=1,
            description=f"Served by `nst serve` on {_host()}: one chunk of pairs of a stylize-batch/{name} run.",
        ),
    ]


def _host() -> str:
    import socket

    return socket.gethostname()


PREFECT_YAML = Path(__file__).resolve().parent.parent / "deployments" / "prefect.yaml"
def prefect_yaml_names(path: Path = PREFECT_YAML) -> set[str]:
    """Deployment names deployments/prefect.yaml declares (``nightly``, ``on-demand``, ``worker``)."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except OSError:
        return set()
    return {d["name"] for d in doc.get("deployments") or [] if isinstance(d, dict) and d.get("name")}


def check_names_are_free(names: list[str]) -> None:
    """Refuse a name prefect.yaml declares (deployed yet or not: a later `prefect deploy` and this
    serve would take turns rewriting it), and any existing deployment nst serve did not make:
    one a work pool runs, or another script's served deployment (serve rewrites and, on exit,
    pauses what it serves)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    reserved = prefect_yaml_names()
    for full in names:
        if full.rsplit("/", 1)[-1] in reserved:
            raise NSTError(f"deployment {full} is declared in deployments/prefect.yaml (work-pool deployments); "
                           "nst serve never takes those names: choose another name with --name")
    with get_client(sync_client=True) as client:
        for full in names:
            try:
                existing = client.read_deployment_by_name(full)
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                raise NSTError(
                    f"deployment {full} already exists on work pool {existing.work_pool_name!r}; nst serve never "
                    "modifies pool-backed deployments: choose another name with --name"
                )
            if _SERVE_TAG not in (existing.tags or []):
                raise NSTError(
                    f"deployment {full} already exists and nst serve did not create it (no {_SERVE_TAG!r} tag); "
                    "serving would rewrite it and pause it on exit: choose another name with --name"
                )


def check_serve_options(limit: int | None, name: str) -> None:
    """NSTError for a ``--limit`` or ``--name`` that serve_deployments would refuse."""
    if limit is not None and limit < 2:  # a batch run holds a slot while its chunk runs wait for one
        raise NSTError(f"--limit must be at least 2 (got {limit}): a stylize-batch run takes one slot and, "
                       "with fan-out 'workers', its chunk runs need another")
    if not name or name != name.strip() or "/" in name:
        raise NSTError(f"--name {name!r}: give a deployment name without '/' or surrounding spaces")


def serve_deployments(limit: int | None = None, name: str = SERVED_NAME) -> None:
    """Serve both flows until interrupted. Pausing on shutdown touches only the served names."""
    from prefect import serve
    from prefect.settings import get_current_settings

    check_serve_options(limit, name)
    served = deployments(name, limit)
    check_names_are_free([f"stylize-batch/{name}", f"stylize-chunk/{name}"])
    ui = get_current_settings().ui_url
    if ui:  # Prefect builds it from PREFECT_API_URL, user:password@ and all
        print(f"Prefect UI: {without_userinfo(ui)}/deployments  (start runs of stylize-batch/{name} from its Run button)", flush=True)
    serve(*served, limit=limit)


def answers(api_url: str) -> bool:
    """Whether a Prefect API answers its health check at ``api_url`` (within 2 s): ``true``, as
    Prefect's does, not just any 200 (``/api/health`` is a common path, and 4200 a common port)."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
            return resp.status == 200 and resp.read(16).strip() == b"true"
    except (OSError, urllib.error.URLError, http.client.HTTPException):  # HTTPException: not HTTP at all (ssh)
        return False


def _exit_message(port: int, log: str, code: int) -> str:
    """One line for a `prefect server start` that exited before it answered: its own reason (the
    last exception it logged, else its last line), and the port advice only where the port was taken."""
    lines = [line.strip() for line in log.strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"\w[\w.]*(?:Error|Exception)\b", line)]
    reason = without_userinfo((errors or lines or [f"exit code {code}"])[-1])
    if "already in use" in log:
        return f"prefect server on port {port} exited: the port is in use; choose another with --port"
    return f"prefect server on port {port} exited ({reason})"


@contextmanager
def local_server(port: int, timeout: float = SERVER_START_TIMEOUT_S) -> Iterator[str]:
    """A `prefect server start` on 127.0.0.1:port for as long as the block runs; yields its API URL.

    A server already answering on that port is used as is (and left running).
    """
    api_url = f"http://127.0.0.1:{port}/api"
    if answers(api_url):
        yield api_url
        return
    # -m, not the `prefect` script beside the interpreter: a `pip install --user` puts that elsewhere
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    # as Prefect starts its own servers: the settings the user set (a profile's too) over the
    # environment, where nst's defaults are (flows.cli._prefect_defaults)
    from prefect.settings import get_current_settings

    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_API_URL": api_url, "PREFECT_UI_API_URL": api_url,
           "COLUMNS": "1000"}  # Prefect's console wraps its messages at 80 columns off a terminal
    log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server never blocks on it
    # its own session (a Ctrl-C to nst serve's group is nst's to handle), ending with nst serve however
    # it ends (a kill -9, an OOM kill: the kernel signals it)
    proc = subprocess.Popen(dies_with_this_process(cmd), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not answers(api_url):
            if proc.poll() is not None:
                log.seek(0)
                raise NSTError(_exit_message(port, log.read().decode(errors="replace"), proc.returncode))
            if time.monotonic() > deadline:
                raise NSTError(f"prefect server on port {port} did not answer within {timeout:.0f} s")
            time.sleep(0.5)
        yield api_url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
