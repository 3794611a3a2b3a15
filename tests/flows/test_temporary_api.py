"""flows/temporary_api.py's parts; the server itself is exercised through `nst batch` in
test_batch_process.py (Ctrl-C, SIGTERM, a server killed mid-run) and test_cli.py (one that cannot start)."""

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from flows import temporary_api
from prefect.server.api import server as prefect_server

STARTUP_FAILED = b"""ERROR:    Traceback (most recent call last):
  File "starlette/routing.py", line 694, in lifespan
sqlalchemy.exc.OperationalError: (psycopg.OperationalError) connection to postgresql+psycopg://nst:hunter2@db:5432/prefect failed
  File "uvicorn/lifespan/on.py", line 86, in main
asyncpg.exceptions.InvalidPasswordError: password authentication failed for postgresql://nst:hunter2@db:5432/prefect
ERROR:    Application startup failed. Exiting.
"""


def test_a_failed_startup_is_its_last_exception_line_without_credentials():
    with tempfile.TemporaryFile() as log:
        log.write(STARTUP_FAILED)
        cause = temporary_api.startup_failure(log)
    assert cause == "asyncpg.exceptions.InvalidPasswordError: password authentication failed for postgresql://db:5432/prefect"
    with tempfile.TemporaryFile() as log:  # a bind failure, or a server still starting: not a failed startup
        log.write(b"ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', 8000)\n")
        assert temporary_api.startup_failure(log) is None


def test_ctrl_c_while_the_server_process_starts_acts_once_it_is_recorded():
    """A KeyboardInterrupt inside Popen would lose the process it started (in a session of its own,
    nothing would ever stop it); the signal acts once the block is left. The kernel may hand a
    process's signal to any thread that does not block it, and Python then runs the handler in
    the main thread: blocking it in the main thread alone (the first version) held nothing back."""
    other = threading.Thread(target=time.sleep, args=(2,), daemon=True)  # a thread not blocking SIGINT
    other.start()
    recorded = False
    with pytest.raises(KeyboardInterrupt):
        with temporary_api._signals_noted() as noted:
            os.kill(os.getpid(), signal.SIGINT)
            give_up = time.monotonic() + 10
            while not noted and time.monotonic() < give_up:  # its handler runs in this thread, soon
                time.sleep(0.01)
            assert noted == [signal.SIGINT]
            recorded = True
    assert recorded
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_only_prefects_server_module_starts_its_processes_in_a_new_session():
    with tempfile.TemporaryFile() as log:
        with temporary_api._popen_in_new_session(log):
            inside = prefect_server.subprocess.Popen([sys.executable, "-c", "import os; print(os.getsid(0))"])
            elsewhere = subprocess.run([sys.executable, "-c", "import os; print(os.getsid(0))"],
                                       capture_output=True, text=True, timeout=30)
        inside.wait(timeout=30)
        log.seek(0)
        assert int(log.read()) == inside.pid  # its own session, its output in the log
        assert int(elsewhere.stdout) == os.getsid(0)  # any other process: this session, its own pipes
    assert prefect_server.subprocess is subprocess


def test_a_server_killed_while_it_starts_is_said_at_once_with_its_exit_code(monkeypatch):
    """Prefect's start loop acts on exit code 3 alone: a server killed while starting (the OOM
    killer, a container's memory limit, a crash in native code) was polled until the wait ran out,
    120 s by default, and nst then said "did not answer; raise the wait", the one thing that does
    not help. Now it ends at once, saying how the process ended."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as WAIT
    from prefect.settings import temporary_settings

    from nst_core.errors import NSTError

    # the session's test harness keeps its own temporary server under the same key: set aside
    # while this one starts (and dies), put back after
    monkeypatch.delitem(prefect_server.SubprocessASGIServer._instances, None, raising=False)

    def oom_kill():
        give_up = time.monotonic() + 60  # the thread never outlives the test by long
        # registered by __new__, its attributes set by __init__ after: looked at in between, it had none
        while not isinstance(server := prefect_server.SubprocessASGIServer._instances.get(None), temporary_api._Server) \
                or getattr(server, "server_process", None) is None:
            if time.monotonic() > give_up:
                return
            time.sleep(0.02)
        os.kill(server.server_process.pid, signal.SIGKILL)

    killer = threading.Thread(target=oom_kill, daemon=True)
    killer.start()
    started = time.monotonic()
    with temporary_settings(updates={WAIT: 60}), pytest.raises(NSTError) as err:
        temporary_api.start(60, WAIT.name)
    waited = time.monotonic() - started
    assert "could not start (its process exited with code -9" in str(err.value), err.value
    assert waited < 30, waited  # about 1 s; the old loop waited all 60
