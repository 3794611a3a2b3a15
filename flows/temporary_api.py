"""Prefect's temporary API server for the CLI (no PREFECT_API_URL), started by nst itself:

- in a session of its own: a terminal's Ctrl-C and `timeout`'s SIGTERM signal the whole
  foreground process group, and Prefect starts the server in nst's. It died with nst, so the run
  could not record its end (the database kept it Running, and a UI on that Prefect home showed
  it so for ever) and nst only left through its 10 s watchdog;
- ended by the kernel when nst dies without running any code of its own (kill -9, an OOM kill;
  Linux): it served on, in its session, until someone found and killed it;
- its output kept in a temporary file: a server that cannot start is one NSTError line with its
  own reason, where its startup traceback reached the terminal three times over (Prefect starts
  another when one exits 3) under a line blaming the wait;
- started again when it dies mid-run (killed, crashed), on its port and database: Prefect's
  client retries each call for about a minute, so the run carries on and records its end. Without
  it, every API call of the run retried in vain: nst ended after 215 s, exit 1 with tracebacks,
  its run left Running (the pairs themselves were kept).

It is Prefect's own server class, so Prefect's get_client (one server per port, port None for
the temporary one) finds and uses it, and stops it at exit (SIGTERM); stop_now stops it before an
immediate exit.
"""

from __future__ import annotations

import re
import signal
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager, suppress

from prefect.logging import get_logger
from prefect.server.api import server as prefect_server

from nst_core.cli import without_userinfo
from nst_core.errors import NSTError
from tasks.processes import dies_with_this_process

__all__ = ["RESTARTS", "start", "running", "stop_now"]

#: How many times a server that died mid-run is started again.
RESTARTS = 3
#: How often the restarting thread looks at the server process.
POLL_S = 0.5


class _Server(prefect_server.SubprocessASGIServer):
    """Prefect's temporary server, started in its own session with its output to ``self.log``."""

    def __init__(self, port: int | None = None):
        if not hasattr(self, "_initialized"):
            self.log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server never blocks on it
            self.stopping = False
            self.lock = threading.Lock()  # a stop and a restart never cross
            self.watched = False
            self.answered = False  # once: a later end is a death mid-run, started again
        super().__init__(port)

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
        super().stop()

    def _run_uvicorn_command(self):
        # Prefect starts another (on another port) when one exits 3: a port taken meanwhile, which
        # another try may escape, or a failed startup, which it will not
        if self.server_process is not None and (cause := startup_failure(self.log)):
            raise _cannot_start(cause)
        # any other end before it first answered (an OOM kill, a crash in native code): another
        # start would fare no better, and Prefect's loop would poll a dead process until its timeout
        if self.server_process is not None and not self.answered and self.server_process.returncode not in (None, 3):
            raise _cannot_start(f"its process exited with code {self.server_process.returncode}"
                                f"{last_line(self.log)}")
        with _signals_noted(), _popen_in_new_session(self.log):
            # recorded before a noted Ctrl-C or SIGTERM acts: one that lost it would leave it running
            self.server_process = super()._run_uvicorn_command()
        return self.server_process


def start(wait_s: float, wait_setting: str) -> None:
    """Start the temporary server (once per process) and the thread that restarts it; NSTError
    when it cannot start or does not answer within ``wait_s``."""
    server = _Server()
    if not isinstance(server, _Server):  # Prefect started its own in this process already
        server.start()
        return
    try:
        server.start()
    except RuntimeError as err:
        server.stop()
        if not str(err).startswith("Timed out while attempting to connect to ephemeral"):
            raise
        if cause := startup_failure(server.log):
            raise _cannot_start(cause) from None
        raise NSTError(f"Prefect's temporary API did not answer within {wait_s} s; "
                       f"raise {wait_setting} or set PREFECT_API_URL to a running server") from None
    except BaseException:  # Prefect's start() cleans up after an Exception only
        server.stop()
        raise
    server.answered = True
    with server.lock:
        if server.watched:
            return
        server.watched = True
    threading.Thread(target=_restart_when_it_dies, args=(server,), name="nst-temporary-api", daemon=True).start()


def running() -> bool:
    """Whether this process started a temporary server that has not been stopped."""
    server = prefect_server.SubprocessASGIServer._instances.get(None)
    return isinstance(server, _Server) and not server.stopping


def stop_now() -> None:
    """Before an immediate exit (os._exit skips Prefect's atexit stop): SIGTERM the server, and
    never start it again. Safe in a signal handler: waits at most 1 s for the lock."""
    server = prefect_server.SubprocessASGIServer._instances.get(None)
    if not isinstance(server, _Server):
        return
    if server.lock.acquire(timeout=1):
        server.stopping = True  # the lock stays held: nothing follows but the exit
    process = server.server_process
    if process is not None:
        with suppress(OSError):
            process.terminate()


def _restart_when_it_dies(server: _Server) -> None:
    """Start ``server`` again, on its port, whenever it exits without being stopped, up to RESTARTS times."""
    log = get_logger("nst")
    for restart in range(RESTARTS + 1):
        while (process := server.server_process) is not None and process.poll() is None:
            time.sleep(POLL_S)
        with server.lock:
            if server.stopping or process is None or server.server_process is not process:
                return
            if restart == RESTARTS:
                log.error("Prefect's temporary API server exited again (code %s); not restarted", process.returncode)
                return
            log.warning("Prefect's temporary API server exited (code %s); starting it again on %s",
                        process.returncode, server.address)
            try:
                server._run_uvicorn_command()
            except NSTError as err:
                log.error("%s", err)
                return


def _cannot_start(cause: str) -> NSTError:
    return NSTError(f"Prefect's temporary API could not start ({cause}); fix that, "
                    "or set PREFECT_API_URL to a running server")


def last_line(log) -> str:
    """": " and the last line the server logged (credentials removed), or "" when it logged nothing."""
    log.seek(0)
    lines = log.read().decode(errors="replace").strip().splitlines()
    return f": {without_userinfo(lines[-1].strip())}" if lines else ""


def startup_failure(log) -> str | None:
    """The exception a failed server startup logged last (credentials removed), else None."""
    log.seek(0)
    text = log.read().decode(errors="replace")
    if "Application startup failed" not in text:
        return None
    errors = re.findall(r"^\w[\w.]*(?:Error|Exception)\b.*$", text, re.M)
    return without_userinfo(errors[-1].strip()) if errors else "its startup failed"


@contextmanager
def _signals_noted():
    """In the main thread, SIGINT, SIGTERM and SIGHUP (all three stop nst) only noted while the
    block runs (the block gets the list of those noted), then raised again:
    Python runs its handlers in the main thread whichever thread the kernel picked, so blocking
    them there (pthread_sigmask) would not hold them back. Elsewhere, nothing to do."""
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return
    previous = {signum: signal.signal(signum, lambda signum, frame: noted.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield noted
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in noted:
            signal.raise_signal(signum)


@contextmanager
def _popen_in_new_session(log):
    """Prefect's server module starts its processes in a session of their own, output to ``log``,
    ending with this process, while the block runs (its own reference to subprocess only: no
    other code is affected)."""

    class InNewSession(subprocess.Popen):
        def __init__(self, args, *rest, **kwargs):
            super().__init__(dies_with_this_process(list(args)), *rest,
                             **{**kwargs, "start_new_session": True, "stdout": log, "stderr": subprocess.STDOUT})

        def poll(self):
            # Prefect's start loop acts on exit code 3 alone (it starts another server); any end
            # reads as 3 there, so _run_uvicorn_command sees it at once (``returncode`` stays true)
            code = super().poll()
            return code if code is None else 3

    class Subprocess:  # the subprocess module, but for Popen
        Popen = InNewSession

        def __getattr__(self, name):
            return getattr(subprocess, name)

    prefect_server.subprocess = Subprocess()
    try:
        yield
    finally:
        prefect_server.subprocess = subprocess
