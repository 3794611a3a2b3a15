"""Shared fixtures."""

from __future__ import annotations

import contextlib
import os

# `make test` runs the suite in two pytest-xdist processes: each takes one core for torch (and
# numpy, which helpers imports: set before it), so their threads never contend for the two
# cores, and keeps its own Prefect home. The controller loads this file too and its environment
# is the workers', so a worker's home is derived, not defaulted.
_HOME = os.environ.get("PREFECT_HOME", os.path.join(os.path.dirname(__file__), "..", ".prefect-home"))
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # read when torch loads, here and in subprocesses
    os.environ["PREFECT_HOME"] = os.path.join(_HOME, _WORKER)
    os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)
else:
    # Prefect (when a test uses it) keeps its state here, never in the user's home.
    os.environ.setdefault("PREFECT_HOME", _HOME)

import pytest  # noqa: E402

from helpers import pattern  # noqa: E402

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # tasks called outside a flow in tests


@pytest.fixture
def images():
    """(content, style) PIL images, 64x48 and 48x64."""
    return pattern((64, 48), "content"), pattern((48, 64), "style")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real HTTP S3 endpoint: moto in server mode on 127.0.0.1, stopped after the session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN")}
    os.environ.update({"AWS_ENDPOINT_URL_S3": url, "AWS_ACCESS_KEY_ID": "testing-key-id",
                       "AWS_SECRET_ACCESS_KEY": "testing-secret-key-do-not-log", "AWS_DEFAULT_REGION": "us-east-1"})
    os.environ.pop("AWS_SESSION_TOKEN", None)
    from tasks import storage

    storage.clear_clients()
    yield url
    server.stop()
    storage.clear_clients()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def bucket(s3_endpoint, request):
    """A fresh bucket per test; returns (name, boto3 client)."""
    import uuid

    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    name = f"nst-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name, client


@pytest.fixture(scope="session")
def prefect_api():
    """A real (temporary) Prefect API for the whole session, for flow and task tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@contextlib.contextmanager
def _proxy_to(s3_endpoint: str, intercept, answer):
    """An HTTP proxy on 127.0.0.1 in front of moto, stopped on exit; yields its URL.
    ``intercept(handler)`` may deal with a request itself (return True) instead of forwarding it;
    ``answer(handler, status, data)`` writes a forwarded answer's body (the status line and the
    headers are sent already)."""
    import http.client
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlparse

    target = urlparse(s3_endpoint)
    hop = {"connection", "keep-alive", "transfer-encoding", "proxy-connection"}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _handle(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if intercept(self):
                return
            upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
            upstream.request(self.command, self.path, body=body or None,
                             headers={k: v for k, v in self.headers.items() if k.lower() not in hop})
            resp = upstream.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in hop | {"content-length"}:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            answer(self, resp.status, data)
            upstream.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _write_body(handler, status: int, data: bytes) -> None:
    if handler.command != "HEAD":
        handler.wfile.write(data)


@pytest.fixture
def fault_proxy(s3_endpoint):
    """An HTTP proxy on 127.0.0.1 in front of moto that answers about 20% of requests badly:
    503 SlowDown-style errors, a dropped connection, or a body cut short. Yields its URL and a
    counter of the faults it injected; stopped after the test."""
    import random
    import threading

    rng, lock = random.Random(7), threading.Lock()
    faults = {"503": 0, "drop": 0, "cut": 0, "ok": 0}

    def intercept(handler) -> bool:
        with lock:
            handler.roll = rng.random()
        if handler.roll < 0.08:
            faults["503"] += 1
            err = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
            handler.send_response(503)
            handler.send_header("Content-Length", str(len(err)))
            handler.end_headers()
            handler.wfile.write(err)
            return True
        if handler.roll < 0.14:
            faults["drop"] += 1
            handler.close_connection = True
            return True  # no answer at all
        return False

    def answer(handler, status: int, data: bytes) -> None:
        if handler.roll < 0.20 and handler.command == "GET" and len(data) > 8:
            faults["cut"] += 1
            handler.wfile.write(data[: len(data) // 2])  # the body cut short, then the connection closed
            handler.close_connection = True
        else:
            faults["ok"] += 1
            _write_body(handler, status, data)

    with _proxy_to(s3_endpoint, intercept, answer) as url:
        yield url, faults


def _short_s3_timeouts(monkeypatch, endpoint: str) -> None:
    """S3 requests go to ``endpoint`` with 1 s timeouts and 0.1 s retry waits (2 retries)."""
    from tasks import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setattr(storage, "S3_TIMEOUTS", (1.0, 1.0))
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.1, 0.1))
    storage.clear_clients()


def _raw_s3_endpoint(monkeypatch, on_connection):
    """A socket on 127.0.0.1 that S3 requests go to (``_short_s3_timeouts``), handing each accepted
    connection to ``on_connection`` on a thread; a generator for fixtures: yields, then stops it."""
    import socket
    import threading

    from tasks import storage

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn = listener.accept()[0]
            except OSError:
                continue
            on_connection(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    _short_s3_timeouts(monkeypatch, f"http://127.0.0.1:{listener.getsockname()[1]}")
    yield
    stop.set()
    thread.join()
    listener.close()
    storage.clear_clients()


@pytest.fixture
def silent_s3(monkeypatch, s3_endpoint):
    """An S3 endpoint on 127.0.0.1 that accepts connections and never answers; 1 s timeouts and
    0.1 s retry waits. Yields the list of accepted connections (one per attempt)."""
    held = []
    endpoint = _raw_s3_endpoint(monkeypatch, held.append)
    next(endpoint)
    yield held
    next(endpoint, None)
    for conn in held:
        conn.close()


@pytest.fixture
def cut_short_s3(monkeypatch, s3_endpoint):
    """An S3 endpoint on 127.0.0.1 whose GET announces 100,000 bytes, sends 40,000 and closes (a
    connection dropped mid-body). Yields the number of requests it answered."""
    answered = []

    def answer(conn):
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nETag: "abc"\r\n\r\n' + b"A" * 40000)
            answered.append(1)

    endpoint = _raw_s3_endpoint(monkeypatch, answer)
    next(endpoint)
    yield answered
    next(endpoint, None)

@pytest.fixture
def s3_that_goes_silent(monkeypatch, s3_endpoint):
    """A proxy on 127.0.0.1 in front of moto that forwards every request until ``silent_after``
    pair sidecars (``….json`` outside ``_runs/``) were written, then accepts and never answers
    (until ``restore()``); 1 s timeouts and 0.1 s retry waits. Yields a namespace: ``silent_after``
    (set it before the run), ``silenced_at`` (time.monotonic() when it went silent), ``restore()``."""
    import threading
    import time
    import types
    from urllib.parse import urlparse

    from tasks import storage

    lock, ended = threading.Lock(), threading.Event()
    state = types.SimpleNamespace(silent_after=3, sidecars=0, silenced_at=None)

    def restore():
        with lock:
            state.silent_after, state.silenced_at = 10**9, None

    def intercept(handler) -> bool:
        with lock:
            silent = state.silenced_at is not None
        if silent:  # accepted, never answered: the client's read timeout ends it
            ended.wait(30)
            handler.close_connection = True
        return silent

    def answer(handler, status: int, data: bytes) -> None:
        _write_body(handler, status, data)
        path = urlparse(handler.path).path
        if handler.command == "PUT" and path.endswith(".json") and "/_runs/" not in path and status == 200:
            with lock:
                state.sidecars += 1
                if state.sidecars >= state.silent_after and state.silenced_at is None:
                    state.silenced_at = time.monotonic()

    state.restore = restore
    with _proxy_to(s3_endpoint, intercept, answer) as url:
        _short_s3_timeouts(monkeypatch, url)
        try:
            yield state
        finally:
            ended.set()
    storage.clear_clients()


@pytest.fixture
def temporary_credentials(monkeypatch, s3_endpoint):
    """boto3's default chain signing with temporary credentials that expire in 2 h, served as ECS
    and EKS serve them (``AWS_CONTAINER_CREDENTIALS_FULL_URI``, an HTTP endpoint on 127.0.0.1):
    what a nightly worker with an IAM role signs with. Yields their expiry (UTC)."""
    import json
    import threading
    from datetime import datetime, timedelta, timezone
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tasks import storage

    expiry = (datetime.now(timezone.utc) + timedelta(hours=2)).replace(microsecond=0)
    body = json.dumps({"AccessKeyId": "ASIATEMPORARY", "SecretAccessKey": "temporary-secret-do-not-log",
                       "Token": "temporary-session-token", "Expiration": expiry.strftime("%Y-%m-%dT%H:%M:%SZ")}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ROLE_ARN",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        monkeypatch.delenv(name, raising=False)  # every source boto's chain reads before this one
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, os.path.join(os.path.dirname(__file__), "no-such-aws-file"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"http://127.0.0.1:{server.server_port}/credentials")
    storage.clear_clients()
    try:
        yield expiry
    finally:
        server.shutdown()
        server.server_close()
        storage.clear_clients()
