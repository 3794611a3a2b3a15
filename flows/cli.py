"""The `nst` command: stylize (engine only), batch, serve, demo.

Prefect is imported only by the subcommands that need it, so `nst stylize` starts fast.
Exit codes: 0 ok, 1 a batch whose flow run failed, 2 bad input or parameters (one line, no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from nst_core.cli import (ProgressBar, add_model_options, add_stylize_parser, args_for, one_line, pipe_safe_streams,
                          without_userinfo)
from nst_core.errors import NSTError
from nst_core.params import StyleParams
from nst_core.uris import host_problem, parse_uri

from flows.serve import SERVER_START_TIMEOUT_S
from tasks.credentials import CREDENTIALS_REFUSED
from tasks.models import ManifestSource, OutputSpec, PrefixSource, RunOptions, batch_inputs
from tasks.storage import env_seconds, weights_reader

if TYPE_CHECKING:  # httpx comes with Prefect, imported only by the subcommands that need it
    import httpx

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (subcommand parsers inherit the class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nst", description="Batch neural style transfer (Gatys, VGG16) on Prefect.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_stylize_parser(sub, opener=weights_reader())  # s3:// weights through the storage layer, retried

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
    serve.add_argument("--port", type=_port, default=4200,
                       help="port of the local Prefect server started when PREFECT_API_URL is unset (default: 4200)")
    serve.set_defaults(handler=run_serve)

    demo = sub.add_parser("demo", help="stylize the bundled sample images into ./demo-output/",
                          description="Run stylize-batch on examples/ into ./demo-output/ (CPU: a few minutes; it "
                                      "prints an estimate timed on this machine before it starts).")
    demo.add_argument("--output", default="demo-output", help="output folder (default: demo-output)")
    demo.set_defaults(handler=run_demo)
    return parser


def _prefect_defaults() -> None:
    """Prefect imported (its settings read the user's profile), then the CLI's own defaults where
    neither the environment nor the profile says otherwise. Before a subcommand's first Prefect
    call: `nst --help`, `nst stylize` and refused arguments never import Prefect."""
    import prefect.context  # noqa: F401  (the settings context: environment, then the profile)

    # The ephemeral API's telemetry heartbeat races its own SQLite setup and logs a traceback; a
    # batch tool has no use for it. Set after the import, so a profile's setting wins over it.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _run_flow(source, output, params, run):
    """Run stylize_batch in this process with a progress bar; prints and returns the final state."""
    _prefect_defaults()
    from flows.batch import in_progress, on_pair_done, stylize_batch

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
        in_progress.clear()  # the engine has recorded the run's end: nothing for an exit at once to record
        on_pair_done.reset(token)
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if (temporary := _temporary_api()) is not None and temporary.running():
            # until the atexit stop of the server: a default SIGTERM, or a KeyboardInterrupt in that
            # stop, would end nst and leave the server (a session of its own) running
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, lambda signum, frame: _exit_now(128 + signum))
    if _refusal(state) is None:  # a refusal is printed once, as the error line (run_batch)
        print(state.message or state.name)
    return state


def _port(text: str) -> int:
    """A TCP port, 1-65535 (0 waited 120 s for a server that can never answer on it)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 1-65535")
    return port


def _without_credentials(url: str | None) -> str | None:
    """``url`` without its user:password@, or None where it has none (an @ in its path stays)."""
    import urllib.parse

    if not url:
        return None
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return None
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


#: What to do about an API that cannot be used, when the user set PREFECT_API_URL.
SET_URL_ADVICE = "fix PREFECT_API_URL, or unset it to run on a temporary API"


@contextmanager
def _prefect_api(advice: str = SET_URL_ADVICE):
    """Around the CLI's Prefect calls: the temporary API (no PREFECT_API_URL) is started by
    flows.temporary_api and may take SERVER_START_TIMEOUT_S to start unless the user set its wait
    (any of Prefect's sources), and an API that cannot be used is one NSTError line, never showing
    credentials, instead of Prefect's traceback, ending in ``advice`` (nst serve's own server was
    never the user's PREFECT_API_URL).

    Prefect waits 20 s for its temporary API; a fresh home's first start (the quickstart's `make
    demo`) took longer on a 2-core machine and the run died.
    """
    import httpx
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, PREFECT_UI_URL, temporary_settings
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as wait

    url = PREFECT_API_URL.value()
    if url:
        _check_answers(url, advice)
    # Prefect builds its UI URL from the API's, user:password@ and all, and prints it: "View at"
    # for every run, `prefect serve`'s banner, the artifacts' links; the flow runs it starts inherit it
    bare_ui = {PREFECT_UI_URL: bare} if (bare := _without_credentials(PREFECT_UI_URL.value())) else {}
    try:
        with temporary_settings(updates=bare_ui, set_defaults={wait: SERVER_START_TIMEOUT_S}):
            waited = wait.value()
            if not url and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
                from flows import temporary_api

                temporary_api.start(waited, wait.name)
            yield
    except httpx.HTTPStatusError as err:
        if not url:
            raise
        raise NSTError(_answered(url, err, advice)) from None
    except (RuntimeError, httpx.ConnectError, httpx.ConnectTimeout) as err:
        text = str(err)
        if url and (not isinstance(err, RuntimeError) or text.startswith("Failed to reach API at")):
            cause = err.__cause__ or err
            if isinstance(cause, httpx.HTTPStatusError):  # Prefect's check at the start: the API answered
                raise NSTError(_answered(url, cause, advice)) from None
            unreachable = (httpx.ConnectError, httpx.ConnectTimeout)
            what = "does not answer" if isinstance(err, unreachable) or isinstance(cause, unreachable) else "cannot be used"
            raise NSTError(f"the Prefect API at {without_userinfo(url)} {what} "
                           f"({without_userinfo(one_line(cause))}); "
                           f"{'start it or ' if advice == SET_URL_ADVICE else ''}{advice}") from None
        raise


#: How long the API at PREFECT_API_URL may take to answer its health check (env NST_API_CHECK_S).
API_CHECK_S = 15.0


#: Statuses Prefect's client retries with growing waits (prefect.client.base's retry_codes, beside
#: PREFECT_CLIENT_RETRY_EXTRA_CODES).
RETRIED_STATUSES = (408, 429, 502, 503)


def _check_answers(url: str, advice: str = SET_URL_ADVICE) -> None:
    """NSTError unless the API at ``url`` replies to GET /health within API_CHECK_S: one that accepts
    connections and never replies (a hung proxy, a dead container's port forward) held nst silent
    for minutes of Prefect's retries. Any reply, or a refused connection, is left to Prefect's own
    calls and their messages (an API key's 401, a 500, "does not answer"); a status its client
    retries (a 503) is said first, on stderr, since those retries take a minute or more."""
    import httpx

    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, PREFECT_CLIENT_RETRY_EXTRA_CODES

    wait = env_seconds("NST_API_CHECK_S", API_CHECK_S)
    try:
        reply = httpx.get(f"{url.rstrip('/')}/health", timeout=wait)
    except httpx.TimeoutException:
        raise NSTError(f"the Prefect API at {without_userinfo(url)} does not answer (no reply within {wait:g} s); "
                       + (f"check the server, or {advice}" if advice == SET_URL_ADVICE else advice)) from None
    except httpx.HTTPError:
        return
    # not an error yet: a busy SQLite answers 503 for a moment
    if reply.status_code in {*RETRIED_STATUSES, *PREFECT_CLIENT_RETRY_EXTRA_CODES.value()}:
        tries = PREFECT_CLIENT_MAX_RETRIES.value()
        print(f"nst: warning: the Prefect API at {without_userinfo(url)} answers {reply.status_code} "
              f"{reply.reason_phrase}; Prefect's client retries each call up to {tries} times "
              "(PREFECT_CLIENT_MAX_RETRIES) with growing waits (2, 4, 8 ... s, unless the server sends Retry-After) "
              "before it gives up", file=sys.stderr, flush=True)


def _answered(url: str, err: httpx.HTTPStatusError, advice: str = SET_URL_ADVICE) -> str:
    """One line for an HTTP error status from the API at ``url`` (an httpx.HTTPStatusError), without credentials.

    5xx: the server itself failed (an outage, its database): advice to change the URL would mislead.
    401/403: an API behind authentication (Prefect Cloud, a proxy). Prefect's error repeats the URL."""
    status, reason = err.response.status_code, err.response.reason_phrase
    what = f"({status} {reason} for {without_userinfo(str(err.request.url))})"
    if status >= 500:
        return f"the Prefect API at {without_userinfo(url)} failed {what}; see the server's log, and run again once it answers"
    how = ("; set PREFECT_API_KEY (Prefect Cloud) or PREFECT_API_AUTH_STRING (a server's basic auth)"
           if status in (401, 403) else "")
    return f"the Prefect API at {without_userinfo(url)} cannot be used {what}{how}; {advice}"


def _temporary_api():
    """flows.temporary_api if this process started a temporary API server (it is imported for
    that only: the import costs Prefect's server app), else None."""
    return sys.modules.get("flows.temporary_api")


#: How long an exit at once waits for the API to record the runs in progress crashed.
EXIT_RECORD_S = 3.0


def _exit_now(code: int) -> None:
    """Exit at once (os._exit skips Prefect's atexit stop of a temporary API server: stop it first),
    having told the API, within EXIT_RECORD_S, that the runs in progress crashed (their flow runs
    otherwise stay Running for good: their reports already say "crashed", so no later run's sweep
    looks at them) and cancelled their unfinished chunk runs."""
    _record_crashed(f"nst exited at once (exit {code}) before the run could record its end")
    if (temporary := _temporary_api()) is not None:
        temporary.stop_now()
    os._exit(code)


def _record_crashed(message: str) -> None:
    from flows.batch import in_progress

    ids = list(in_progress)
    if not ids:
        return

    def record() -> None:
        import uuid

        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        from flows.fanout import PARENT_STOPPED, cancel_children

        with contextlib.suppress(Exception), get_client(sync_client=True) as client:
            for run_id in ids:
                with contextlib.suppress(Exception):
                    # not forced: a run the engine already ended (Completed, Crashed) keeps its state
                    client.set_flow_run_state(uuid.UUID(run_id), Crashed(message=message))
        for run_id in ids:  # a fan-out run cancels its chunk runs last, after its report: maybe not yet
            with contextlib.suppress(Exception):
                cancel_children(run_id, f"{PARENT_STOPPED} crashed")

    # in this context: the API the run uses may be set in it (temporary settings), not in the environment
    recording = threading.Thread(target=contextvars.copy_context().run, args=(record,), daemon=True)
    recording.start()
    recording.join(EXIT_RECORD_S)


def _refusal(state) -> str | None:
    """The one-line reason when the flow refused its inputs before doing any work, else None."""
    message = state.message or ""
    return message if state.is_failed() and message.startswith(REFUSALS) else None


#: How stylize_batch's Failed message starts when it refused the run before any work.
REFUSALS = ("invalid parameters:", "preflight failed:", CREDENTIALS_REFUSED)


class _LineBar(ProgressBar):
    """The progress bar, able to blank its unfinished line so a log line never shares it."""

    open_line = False

    def update(self, done: int, note: str = "") -> None:
        super().update(done, note)
        self.open_line = self.tty and done < self.total

    def clear(self) -> None:
        if self.open_line:
            self.stream.write("\r" + " " * self.shown + "\r")
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
    SIGTERM (`timeout`, `kill`) or SIGHUP: once Prefect has recorded the run crashed, the same stop,
    exit 128 + the signal.
    SIGTERM's default killed nst where it stood and left its temporary API server running.
    Returns the handlers replaced."""
    from tasks.pair import stop_requested

    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(code: int) -> None:
        stop_requested.set()
        # in the run's context (its API settings): _exit_now records the run crashed through that API
        watchdog = threading.Timer(10.0, contextvars.copy_context().run, args=(_exit_now, code))
        watchdog.daemon = True
        watchdog.start()

    def on_sigint(signum, frame):
        if stop_requested.is_set():
            os.write(2, b"\nnst: interrupted again, exiting now\n")
            _exit_now(130)
        os.write(2, b"\nnst: interrupted, stopping (Ctrl-C again to exit at once)\n")
        stop(130)
        raise KeyboardInterrupt

    terminated = []

    def on_sigterm(signum, frame):
        if terminated:
            return  # stopping already, within the watchdog's bound
        terminated.append(signum)
        with contextlib.suppress(OSError):  # after SIGHUP, no terminal to write to
            os.write(2, b"\nnst: terminated, stopping\n")
        stop(128 + signum)
        raise SystemExit(128 + signum)

    # SIGHUP (the terminal closed) as SIGTERM: its default would end nst before the atexit stop of a
    # temporary API server, which runs in a session of its own and gets no SIGHUP itself
    return {signal.SIGINT: signal.signal(signal.SIGINT, on_sigint),
            signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm),
            signal.SIGHUP: signal.signal(signal.SIGHUP, on_sigterm)}


def run_batch(args: argparse.Namespace) -> int:
    if args.contents and not args.styles:
        raise NSTError("--contents needs --styles (or use --manifest)")
    if args.manifest and args.styles:
        raise NSTError("--styles goes with --contents, not with --manifest")
    if args.manifest and hasattr(args, "pairing"):  # a manifest lists its pairs: the flag would do nothing
        raise NSTError("--pairing goes with --contents and --styles, not with --manifest")
    for flag, uri in (("--contents", args.contents), ("--styles", args.styles), ("--manifest", args.manifest)):
        if uri and (why := host_problem(uri)):
            raise NSTError(f"{flag} {why}")
        scheme, _, path = parse_uri(uri) if uri else ("", "", "")
        local = path if scheme == "file" else uri
        if local and "://" not in local and not Path(local).expanduser().exists():  # refuse before starting Prefect
            raise NSTError(f"{flag} {uri}: no such {'file' if flag == '--manifest' else 'folder'}")
    weights = getattr(args, "weights", None) or ""
    if (scheme := parse_uri(weights)[0]) not in ("", "file", "s3") and len(scheme) > 1:  # one letter: a drive (C:)
        hint = "" if "://" in weights else f" (a file name with a colon reads as a URI: write ./{weights})"
        raise NSTError(f"--weights {without_userinfo(weights)}: unsupported scheme {scheme!r}; nst batch reads a "
                       f"path, file:// or s3://bucket/key{hint}")  # before Prefect starts, not in the run's preflight
    kind = "manifest" if args.manifest else "prefixes"
    source = {**args_for(ManifestSource if args.manifest else PrefixSource, args), "kind": kind}
    output = {**args_for(OutputSpec, args), "uri": args.output}
    # checked as the flow checks them, before Prefect starts, each field named by its place in the
    # flow's parameters (InvalidInputs: "invalid parameters: output.uri: ...", "run.devices.0: ...")
    inputs = batch_inputs(source, output, args_for(StyleParams, args), args_for(RunOptions, args))
    state = _run_flow(*inputs)
    if (reason := _refusal(state)) is not None:
        raise NSTError(reason)  # one line on stderr, exit 2
    return 0 if state.is_completed() else 1


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


#: Seconds nst serve's stop may take after a SIGHUP (or a SIGTERM before serving) before it exits at
#: once (env NST_SERVE_STOP_S). Prefect's graceful stop pauses the served deployments and cancels
#: their runs through the API: with the API hung (its own server stuck, a proxy holding the
#: connection) a closed terminal left nst serve running for good, and its port taken.
SERVE_STOP_S = 60.0


#: The name of the timer _stop_bound arms (one at a time: a second stop signal arms no other).
STOP_BOUND_THREAD = "nst-serve-stop-bound"


def _stop_bound(signum: int) -> None:
    """Exit 128 + signum at once SERVE_STOP_S from now unless nst serve has ended by then. A server
    nst serve started ends with it (tasks.processes.dies_with_this_process). Armed once."""
    if any(t.name == STOP_BOUND_THREAD for t in threading.enumerate()):
        return
    wait = env_seconds("NST_SERVE_STOP_S", SERVE_STOP_S)

    def exit_now() -> None:
        with contextlib.suppress(OSError):  # after SIGHUP, no terminal to write to
            os.write(2, f"\nnst: serving did not stop within {wait:.0f} s (is the Prefect API answering?); "
                        "exiting now\n".encode())
        os._exit(128 + signum)

    timer = threading.Timer(wait, exit_now)
    timer.daemon, timer.name = True, STOP_BOUND_THREAD
    timer.start()


def _exit_on_sigterm_within_bound(signum, frame):
    _stop_bound(signum)
    _exit_on_sigterm(signum, frame)


def _stop_serving_within_bound(signum, frame):
    """SIGHUP (the terminal closed) stops nst serve as SIGTERM does, before serving and during it
    (Prefect's handler then stops the served runs as Cancelled), within SERVE_STOP_S."""
    _stop_bound(signum)
    handler = signal.getsignal(signal.SIGTERM)
    if callable(handler):
        handler(signal.SIGTERM, frame)
    else:  # not ours, not Prefect's: as SIGTERM would end it
        os.kill(os.getpid(), signal.SIGTERM)


def run_serve(args: argparse.Namespace) -> int:
    _prefect_defaults()
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_API_URL, temporary_settings

    from flows.serve import answers, check_serve_options, local_server

    check_serve_options(args.limit, args.name)  # before a server is started for nothing
    # SIGTERM before serving begins must still stop it (serve installs its own handler later). SIGHUP
    # (the terminal closed) is a SIGTERM, before serving and during it (Prefect's handler then stops the
    # served runs): its default ended nst serve where it stood, its server left running, and with
    # PREFECT_API_URL the runs it served (in its process group) died unrecorded, Running for good.
    # Both within SERVE_STOP_S: nothing else would end a stop that hangs after the terminal closed.
    signal.signal(signal.SIGTERM, _exit_on_sigterm_within_bound)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # `nohup nst serve`: serving goes on
        signal.signal(signal.SIGHUP, _stop_serving_within_bound)
    if PREFECT_API_URL.value():
        with _prefect_api():
            _serve(args.limit, args.name, PREFECT_API_URL.value(), resume=True)
        return 0
    # Prefect's ephemeral API has no UI, so a served deployment would be unreachable: start a server.
    if answers(f"http://127.0.0.1:{args.port}/api"):  # local_server uses it as is, and leaves it running
        print(f"PREFECT_API_URL is not set: using the Prefect server already answering on 127.0.0.1:{args.port} "
              "(it keeps running when nst serve stops; --port picks another)", flush=True)
    else:
        print(f"PREFECT_API_URL is not set: starting a local Prefect server on 127.0.0.1:{args.port} "
              "(stopped when nst serve stops)", flush=True)
    # the user set no URL: advice to fix one would mislead
    advice = (f"it is the server nst serve uses on 127.0.0.1:{args.port}: see why it failed or stopped, "
              "then start nst serve again (--port picks another port)")
    with local_server(args.port) as api_url:
        with temporary_settings(updates={PREFECT_API_URL: api_url, PREFECT_UI_API_URL: api_url}), _prefect_api(advice):
            # its own server died (nothing starts it again on that port): no waiting for it
            _serve(args.limit, args.name, api_url, resume=False)
    return 0


#: Statuses of an API that is away for now (a proxy before a server restarting, an overloaded one).
AWAY_STATUSES = (502, 503, 504)


def _lost_api(err: BaseException) -> bool:
    """Whether ``err`` is how Prefect's runner ends on a lost API: its poller's error threshold
    (critical_service_loop), or a connection error or AWAY_STATUSES answer of its own calls
    (registering, pausing the served deployments) while the API is away; in an ExceptionGroup,
    nothing else beside them. A 500 (a server's bug) or a 4xx is not a lost API."""
    import httpx

    if isinstance(err, BaseExceptionGroup):
        return all(_lost_api(e) for e in err.exceptions)
    return ((isinstance(err, RuntimeError) and "exceeded error threshold" in str(err))
            or isinstance(err, httpx.TransportError)
            or (isinstance(err, httpx.HTTPStatusError) and err.response.status_code in AWAY_STATUSES))


def _how_lost(err: BaseException) -> str:
    """How a lost API (``_lost_api``) showed, without its URL (it may carry credentials)."""
    import httpx

    leaves = [err]
    while any(isinstance(e, BaseExceptionGroup) for e in leaves):
        leaves = [x for e in leaves for x in (e.exceptions if isinstance(e, BaseExceptionGroup) else [e])]
    if any(isinstance(e, RuntimeError) for e in leaves):
        return "its polls for runs failed 3 times in a row"
    status = next((e.response for e in leaves if isinstance(e, httpx.HTTPStatusError)), None)
    return f"it answered {status.status_code} {status.reason_phrase}" if status is not None else \
        f"it did not answer ({type(leaves[0]).__name__})"


#: How often nst serve looks whether a lost API (PREFECT_API_URL) answers again.
RESUME_POLL_S = 5.0


def _serve(limit: int | None, name: str, api_url: str, resume: bool) -> None:
    """serve_deployments. Prefect's runner gives up on a lost API after three failed polls for runs
    (~3.5 min of an outage or restart) with a nested ExceptionGroup, which was a traceback, and
    leaving the runner stops the flow runs it serves. With ``resume`` (the API at PREFECT_API_URL,
    which its owner restarts) nst serve says so, waits until the API answers and serves again:
    an unattended nst serve ended at the server's first upgrade and served no nightly after it.
    Else it ends with one line (its own server died: nothing would start it again)."""
    from prefect.client.orchestration import get_client
    from prefect.logging import get_logger

    from flows.serve import serve_deployments

    def answers() -> bool:
        with get_client(sync_client=True) as client:  # Prefect's own auth, TLS and proxy settings
            return client.api_healthcheck() is None

    log = get_logger("nst")
    # its own server answered before serving began (local_server); PREFECT_API_URL's may never
    # have: not a lost API, but Prefect's error, one line through _prefect_api. After a loss, serving
    # again begins once it answered.
    answered = not resume or answers()
    while True:
        try:
            serve_deployments(limit=limit, name=name)
            return
        except BaseException as err:
            if not (answered and _lost_api(err)):
                raise
            how = _how_lost(err)
        lost_api = f"lost the Prefect API at {without_userinfo(api_url)}: {how}, and the runs it served stopped"
        if not resume:
            raise NSTError(f"{lost_api}; start nst serve again once the API answers")
        log.warning("%s; serving again once it answers (Ctrl-C stops)", lost_api)
        # the runner that gave up left its SIGTERM handler, on its closed event loop: a stop now
        # (systemctl stop) was a traceback
        signal.signal(signal.SIGTERM, _exit_on_sigterm)  # raised in the sleep: nothing left to hang on
        time.sleep(RESUME_POLL_S)  # at least this between two tries: an API whose health answers
        while not answers():  # while its polls fail is tried every few minutes, not in a loop
            time.sleep(RESUME_POLL_S)
        log.warning("the Prefect API at %s answers again: serving", without_userinfo(api_url))


def run_demo(args: argparse.Namespace) -> int:
    from flows.demo import demo_inputs

    started = time.monotonic()
    state = _run_flow(*demo_inputs(args.output))
    if (reason := _refusal(state)) is not None:
        raise NSTError(reason)  # one line on stderr, exit 2, as nst batch
    print(f"demo took {time.monotonic() - started:.0f} s in all")
    report = state.result(raise_on_failure=False)
    if isinstance(report, dict):
        uri = report["output"]["uri"]
        print(f"images and sidecars: {uri if '://' in uri else Path(uri).resolve()}/")  # absolute, as the two below
        print(f"run report:          {report['report']}")
        print(f"contact sheet:       {report['contact_sheet']}")
    return 0 if state.is_completed() else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit 2 with one line
    with pipe_safe_streams():  # `nst batch | head`: the run goes on when its reader goes away
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
