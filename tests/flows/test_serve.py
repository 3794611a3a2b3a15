import os
import signal
import subprocess
import sys
import time

import pytest
from prefect.settings import PREFECT_API_URL

from flows.serve import deployments

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]


def test_served_deployments_enforce_their_schema():
    served = {d.name: d for d in deployments()}
    assert set(served) == {"on-demand", "worker"}
    assert all(d.enforce_parameter_schema for d in served.values())


def test_nst_serve_registers_both_deployments():
    from prefect.client.orchestration import get_client

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        found, deadline = set(), time.time() + 90
        with get_client(sync_client=True) as client:
            while time.time() < deadline and found != {"stylize-batch/on-demand", "stylize-chunk/worker"}:
                time.sleep(1)
                for name in ("stylize-batch/on-demand", "stylize-chunk/worker"):
                    try:
                        client.read_deployment_by_name(name)
                        found.add(name)
                    except Exception:
                        pass
        assert found == {"stylize-batch/on-demand", "stylize-chunk/worker"}
        assert proc.poll() is None  # still serving
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
