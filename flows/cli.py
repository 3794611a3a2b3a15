"""The `nst` command: stylize (engine only), batch, serve, demo.

Prefect is imported only by the subcommands that need it, so `nst stylize` starts fast.
Exit codes: 0 ok, 1 a batch whose flow run failed, 2 bad input or parameters (one line, no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from nst_core.cli import ProgressBar, add_model_options, add_stylize_parser, model_from_args, one_line
from nst_core.errors import NSTError
from nst_core.params import StyleParams

from flows.serve import SERVER_START_TIMEOUT_S
from tasks.models import ManifestSource, OutputSpec, PrefixSource, RunOptions
from tasks.storage import read_uri

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (subcommand parsers inherit the class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nst", description="Batch neural style transfer (Gatys, VGG16) on Prefect.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_stylize_parser(sub, opener=read_uri)  # s3:// weights through the storage layer

    batch = sub.add_parser("batch", help="run the stylize-batch flow locally over a manifest or two prefixes",
                           description="Run the stylize-batch flow (ephemeral Prefect API unless PREFECT_API_URL is set).")
    src = batch.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="JSONL or CSV manifest URI")
    src.add_argument("--contents", help="prefix/folder of content images (with --styles)")
    batch.add_argument("--styles", help="prefix/folder of style images (with --contents)")
    batch.add_argument("--pairing", choices=["cross", "zip"], default=argparse.SUPPRESS,
                       help=PrefixSource.model_fields["pairing"].description)
    batch.add_argument("--output", required=True, help=OutputSpec.model_fields["uri"].description)
    add_model_options(batch, OutputSpec, skip=("uri",))
    add_model_options(batch, RunOptions, skip=("labels", "skip_existing"))
    batch.add_argument("--no-skip-existing", dest="skip_existing", action="store_false", default=argparse.SUPPRESS,
                       help="redo pairs even when their sidecar exists")
    add_model_options(batch, StyleParams)
    batch.set_defaults(handler=run_batch)

    serve = sub.add_parser("serve", help="serve stylize-batch/served and stylize-chunk/served in this process",
                           description="Serve stylize-batch/NAME and stylize-chunk/NAME (default NAME: served) in-process "
                                       "(no work pool); start runs from the UI. Never touches the prefect.yaml "
                                       "deployments. Without PREFECT_API_URL it starts a local Prefect server "
                                       "and prints its UI URL.")
    serve.add_argument("--limit", type=int, default=None, help="max concurrent flow runs (default: unlimited)")
    serve.add_argument("--name", default="served", help="deployment name of both served flows (default: served)")
    serve.add_argument("--port", type=int, default=4200,
                       help="port of the local Prefect server started when PREFECT_API_URL is unset (default: 4200)")
    serve.set_defaults(handler=run_serve)

    demo = sub.add_parser("demo", help="stylize the bundled sample images into ./demo-output/",
                          description="Run stylize-batch on examples/ into ./demo-output/ (CPU: a few minutes; it "
                                      "prints an estimate timed on this machine before it starts).")
    demo.add_argument("--output", default="demo-output", help="output folder (default: demo-output)")
    demo.set_defaults(handler=run_demo)
    return parser


def _run_flow(source, output, params, run):
    """Run stylize_batch in this process with a progress bar; prints and returns the final state."""
    from flows.batch import on_pair_done, stylize_batch

    bar: _LineBar | None = None

    def hook(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or _LineBar(total, "pairs ")
        bar.update(done)

    token = on_pair_done.set(hook)
    previous = _install_interrupt_handlers()
    try:
        with _logs_start_on_their_own_line(lambda: bar), _prefect_api():
            state = stylize_batch(source, output, params, run, return_state=True)
    finally:
        on_pair_done.reset(token)
        for signum, handler in previous.items():
            # SIGTERM's stays while a temporary API server runs: its default would end nst before
            # the atexit stop of the server and leave it running
            if handler is not None and not (signum == signal.SIGTERM and _temporary_api is not None):
                signal.signal(signum, handler)
    if _refusal(state) is None:  # a refusal is printed once, as the error line (run_batch)
        print(state.message or state.name)
    return state


@contextmanager
def _prefect_api():
    """Around the CLI's Prefect calls: the temporary API (no PREFECT_API_URL) may take
    SERVER_START_TIMEOUT_S to start unless the user set its wait (any of Prefect's sources), and an
    API that cannot be used is one NSTError line, never showing credentials, instead of Prefect's
    traceback.

    Prefect waits 20 s for its temporary API; a fresh home's first start (the quickstart's `make
    demo`) took longer on a 2-core machine and the run died.
    """
    import httpx
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as wait

    url = PREFECT_API_URL.value()
    try:
        with temporary_settings(set_defaults={wait: SERVER_START_TIMEOUT_S}):
            waited = wait.value()
            if not url and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
                _start_temporary_api(waited, wait.name)
            yield
    except (RuntimeError, httpx.ConnectError, httpx.ConnectTimeout) as err:
        text = str(err)
        if url and (not isinstance(err, RuntimeError) or text.startswith("Failed to reach API at")):
            cause = err.__cause__ or err
            unreachable = (httpx.ConnectError, httpx.ConnectTimeout)
            what = "does not answer" if isinstance(err, unreachable) or isinstance(cause, unreachable) else "cannot be used"
            raise NSTError(f"the Prefect API at {_without_userinfo(url)} {what} "
                           f"({_without_userinfo(one_line(cause))}); "
                           "start it or fix PREFECT_API_URL, or unset it to run on a temporary API") from None
        raise


#: The temporary API server _start_temporary_api started, if any (stopped before an immediate exit).
_temporary_api = None


def _start_temporary_api(wait_s: float, wait_setting: str) -> None:
    """Start Prefect's temporary API server now, as Prefect would on the run's first API call, but
    in a session of its own and with its output kept; Prefect stops it at exit (SIGTERM), _exit_now
    before an immediate one. A server that cannot start is one NSTError line with its own reason.

    Prefect starts it in nst's process group, and a terminal's Ctrl-C (or `timeout`'s SIGTERM)
    signals the whole group: the server died with nst, so the run could not record its end (the
    database kept it Running, and a UI on that Prefect home showed it so for ever) and nst only
    left through its 10 s watchdog. Its startup tracebacks went to the terminal, three times over
    (Prefect restarts a server whose startup failed), under a line blaming the wait.
    """
    global _temporary_api
    import tempfile

    from prefect.server.api.server import SubprocessASGIServer

    log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server never blocks on it

    class OwnSession(SubprocessASGIServer):  # one per port: Prefect's get_client finds this one
        stopping = False
        lock = threading.Lock()  # a stop and a restart (_restart_when_it_dies) never cross

        def stop(self):
            with self.lock:
                self.stopping = True
            super().stop()

        def _run_uvicorn_command(self):
            # Prefect starts another (on another port) when one exits 3: a port taken meanwhile,
            # which another try may escape, or a failed startup, which it will not
            if self.server_process is not None and (cause := _startup_failure(log)):
                raise NSTError(f"Prefect's temporary API could not start ({cause}); fix that, "
                               "or set PREFECT_API_URL to a running server")
            # SIGINT held back until the process is recorded (a Ctrl-C that lost it would leave it
            # running); it is delivered the moment the mask is restored
            held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                with _popen_in_new_session(log):
                    self.server_process = super()._run_uvicorn_command()
                return self.server_process
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)

    server = _temporary_api = OwnSession()
    try:
        server.start()
    except RuntimeError as err:
        server.stop()
        if not str(err).startswith("Timed out while attempting to connect to ephemeral"):
            raise
        if cause := _startup_failure(log):
            raise NSTError(f"Prefect's temporary API could not start ({cause}); fix that, "
                           "or set PREFECT_API_URL to a running server") from None
        raise NSTError(f"Prefect's temporary API did not answer within {wait_s} s; "
                       f"raise {wait_setting} or set PREFECT_API_URL to a running server") from None
    except BaseException:  # Prefect's start() cleans up after an Exception only
        server.stop()
        raise
    threading.Thread(target=_restart_when_it_dies, args=(server,), name="nst-temporary-api", daemon=True).start()


#: How many times a temporary API server that died mid-run is started again.
SERVER_RESTARTS = 3


def _restart_when_it_dies(server) -> None:
    """Start the temporary API server again, on its port and database, whenever it exits without
    being stopped (killed, crashed), up to SERVER_RESTARTS times. Prefect's client retries a call
    for about a minute, so the run carries on and still records its end. Without it, every API
    call of the run retried in vain: nst took 215 s to end, exit 1 with tracebacks, its run left
    Running in the database (the pairs themselves were kept)."""
    from prefect.logging import get_logger

    for restart in range(SERVER_RESTARTS + 1):
        while (process := server.server_process) is not None and process.poll() is None:
            time.sleep(0.5)
        with server.lock:
            if server.stopping or process is None:
                return
            if restart == SERVER_RESTARTS:
                get_logger("nst").error("Prefect's temporary API server exited again (code %s); not restarted",
                                        process.returncode)
                return
            get_logger("nst").warning("Prefect's temporary API server exited (code %s); starting it again on %s",
                                      process.returncode, server.address)
            try:
                server.server_process = server._run_uvicorn_command()
            except NSTError as err:
                get_logger("nst").error("%s", err)
                return


def _startup_failure(log) -> str | None:
    """The exception a failed server startup logged last (credentials removed), else None."""
    log.seek(0)
    text = log.read().decode(errors="replace")
    if "Application startup failed" not in text:
        return None
    errors = re.findall(r"^\w[\w.]*(?:Error|Exception)\b.*$", text, re.M)
    return _without_userinfo(errors[-1].strip()) if errors else "its startup failed"


@contextmanager
def _popen_in_new_session(log):
    """subprocess.Popen starts its process in a session of its own, its output to ``log``, while the
    block runs (the main thread only, before any worker thread starts a process)."""
    import subprocess

    popen = subprocess.Popen

    class InNewSession(popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "start_new_session": True, "stdout": log,
                                       "stderr": subprocess.STDOUT})

    subprocess.Popen = InNewSession
    try:
        yield
    finally:
        subprocess.Popen = popen


def _exit_now(code: int) -> None:
    """Exit at once (os._exit skips Prefect's atexit stop of its temporary server: stop it first)."""
    if _temporary_api is not None and _temporary_api.lock.acquire(timeout=1):
        _temporary_api.stopping = True  # not restarted; the lock is left held: nothing follows
    process = getattr(_temporary_api, "server_process", None)
    if process is not None:
        with contextlib.suppress(OSError):
            process.terminate()
    os._exit(code)


def _without_userinfo(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it removed: an error line never shows credentials."""
    return re.sub(r"(//)[^/\s@]*@", r"\1", text)


def _refusal(state) -> str | None:
    """The one-line reason when the flow refused its inputs before doing any work, else None."""
    message = state.message or ""
    return message if state.is_failed() and message.startswith(REFUSALS) else None


#: How stylize_batch's Failed message starts when it refused the run before any work.
REFUSALS = ("invalid parameters:", "preflight failed:")


class _LineBar(ProgressBar):
    """The progress bar, able to blank its unfinished line so a log line never shares it."""

    open_line = False

    def update(self, done: int, note: str = "") -> None:
        super().update(done, note)
        self.open_line = done < self.total

    def clear(self) -> None:
        if self.open_line:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()
            self.open_line = False
            self._last = 0.0  # the next update redraws it under the log line


class _ClearBar(logging.Filter):
    def __init__(self, get_bar):
        super().__init__()
        self.get_bar = get_bar

    def filter(self, record: logging.LogRecord) -> bool:
        bar = self.get_bar()
        if bar is not None:
            bar.clear()
        return True


@contextmanager
def _logs_start_on_their_own_line(get_bar):
    """Every stream handler (Prefect's console one included) blanks the bar's line before it writes."""
    handlers = {h for logger in [logging.getLogger(), *[logging.getLogger(n) for n in
                                                           list(logging.root.manager.loggerDict)]]
                for h in getattr(logger, "handlers", []) if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)}
    guard = _ClearBar(get_bar)
    for h in handlers:
        h.addFilter(guard)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(guard)


def _install_interrupt_handlers() -> dict:
    """Ctrl-C: stop every pair at its next evaluation and unwind (exit 130 within seconds; what
    was written stays: writes are atomic). A second Ctrl-C, or 10 s later, exits at once.
    SIGTERM (`timeout`, `kill`): once Prefect has recorded the run crashed, the same stop, exit 143.
    SIGTERM's default killed nst where it stood and left its temporary API server running.
    Returns the handlers replaced."""
    from tasks.pair import stop_requested

    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(code: int) -> None:
        stop_requested.set()
        watchdog = threading.Timer(10.0, _exit_now, args=(code,))
        watchdog.daemon = True
        watchdog.start()

    def on_sigint(signum, frame):
        if stop_requested.is_set():
            os.write(2, b"\nnst: interrupted again, exiting now\n")
            _exit_now(130)
        os.write(2, b"\nnst: interrupted, stopping (Ctrl-C again to exit at once)\n")
        stop(130)
        raise KeyboardInterrupt

    def on_sigterm(signum, frame):
        if stop_requested.is_set():
            return  # stopping already, within the watchdog's bound
        os.write(2, b"\nnst: terminated, stopping\n")
        stop(128 + signum)
        raise SystemExit(128 + signum)

    return {signal.SIGINT: signal.signal(signal.SIGINT, on_sigint),
            signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm)}


def run_batch(args: argparse.Namespace) -> int:
    if args.contents and not args.styles:
        raise NSTError("--contents needs --styles (or use --manifest)")
    if args.manifest and args.styles:
        raise NSTError("--styles goes with --contents, not with --manifest")
    for flag, uri in (("--contents", args.contents), ("--styles", args.styles), ("--manifest", args.manifest)):
        local = uri[len("file://"):] if uri and uri.startswith("file://") else uri
        if local and "://" not in local and not Path(local).exists():  # refuse before starting Prefect
            raise NSTError(f"{flag} {uri}: no such {'file' if flag == '--manifest' else 'folder'}")
    source = model_from_args(ManifestSource if args.manifest else PrefixSource, args)
    output = OutputSpec(**{**{k: v for k, v in vars(args).items() if k in OutputSpec.model_fields}, "uri": args.output})
    state = _run_flow(source, output, model_from_args(StyleParams, args), model_from_args(RunOptions, args))
    if (reason := _refusal(state)) is not None:
        raise NSTError(reason)  # one line on stderr, exit 2
    return 0 if state.is_completed() else 1


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def run_serve(args: argparse.Namespace) -> int:
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_API_URL, temporary_settings

    from flows.serve import local_server, serve_deployments

    if PREFECT_API_URL.value():
        with _prefect_api():
            serve_deployments(limit=args.limit, name=args.name)
        return 0
    # Prefect's ephemeral API has no UI, so a served deployment would be unreachable: start a server.
    # SIGTERM before serving begins must still stop it (serve installs its own handler later).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    print(f"PREFECT_API_URL is not set: starting a local Prefect server on 127.0.0.1:{args.port} "
          "(stopped when nst serve stops)", flush=True)
    with local_server(args.port) as api_url:
        with temporary_settings(updates={PREFECT_API_URL: api_url, PREFECT_UI_API_URL: api_url}):
            serve_deployments(limit=args.limit, name=args.name)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from flows.demo import demo_inputs

    started = time.monotonic()
    state = _run_flow(*demo_inputs(args.output))
    print(f"demo took {time.monotonic() - started:.0f} s in all")
    report = state.result(raise_on_failure=False)
    if isinstance(report, dict):
        print(f"images and sidecars: {report['output']['uri']}/")
        print(f"run report:          {report['report']}")
        print(f"contact sheet:       {report['contact_sheet']}")
    return 0 if state.is_completed() else 1


def main(argv: list[str] | None = None) -> int:
    # The ephemeral API's telemetry heartbeat races its own SQLite setup and logs a traceback;
    # a batch tool has no use for it. A user's explicit setting wins.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit 2 with one line
    try:
        return args.handler(args)
    except (NSTError, ValidationError, ValueError) as err:
        print(f"nst: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nst: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
