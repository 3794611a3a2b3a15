"""Shared fixtures."""

from __future__ import annotations

import os

import pytest

from helpers import pattern

# Prefect (when a test uses it) keeps its state here, never in the user's home.
os.environ.setdefault("PREFECT_HOME", os.path.join(os.path.dirname(__file__), "..", ".prefect-home"))
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


@pytest.fixture
def fault_proxy(s3_endpoint):
    """An HTTP proxy on 127.0.0.1 in front of moto that answers about 20% of requests badly:
    503 SlowDown-style errors, a dropped connection, or a body cut short. Yields its URL and a
    counter of the faults it injected; stopped after the test."""
    import http.client
    import random
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlparse

    target = urlparse(s3_endpoint)
    rng, lock = random.Random(7), threading.Lock()
    faults = {"503": 0, "drop": 0, "cut": 0, "ok": 0}
    hop = {"connection", "keep-alive", "transfer-encoding", "proxy-connection"}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _handle(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                roll = rng.random()
            if roll < 0.08:
                faults["503"] += 1
                err = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
                self.send_response(503)
                self.send_header("Content-Length", str(len(err)))
                self.end_headers()
                self.wfile.write(err)
                return
            if roll < 0.14:
                faults["drop"] += 1
                self.close_connection = True
                return  # no answer at all
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
            if roll < 0.20 and self.command == "GET" and len(data) > 8:
                faults["cut"] += 1
                self.wfile.write(data[: len(data) // 2])  # the body cut short, then the connection closed
                self.close_connection = True
            else:
                faults["ok"] += 1
                if self.command != "HEAD":
                    self.wfile.write(data)
            upstream.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", faults
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def silent_s3(monkeypatch, s3_endpoint):
    """An S3 endpoint on 127.0.0.1 that accepts connections and never answers; 1 s timeouts and
    0.1 s retry waits. Yields the list of accepted connections (one per attempt)."""
    import socket
    import threading

    from tasks import storage

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setattr(storage, "S3_TIMEOUTS", (1.0, 1.0))
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.1, 0.1))
    storage.clear_clients()
    yield held
    stop.set()
    thread.join()
    listener.close()
    for conn in held:
        conn.close()
    storage.clear_clients()
