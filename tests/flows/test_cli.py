import contextlib
import json
import os
import re
import subprocess
import sys
import threading

import pytest
from prefect.settings import PREFECT_API_URL

from helpers import pattern

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]


def nst(*args, cwd, env=None):
    env = env or {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the session's real API
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def first_start(home, **settings):
    """The environment of a first `make demo` or `nst batch`: no PREFECT_API_URL (Prefect starts
    its temporary API) and a Prefect home that does not exist yet (a database to create)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_UI_API_URL", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")}
    return {**env, "PREFECT_HOME": str(home), **settings}


@pytest.fixture
def data(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "s").mkdir()
    pattern((32, 24)).save(tmp_path / "c" / "one.png")
    pattern((32, 24), "rings").save(tmp_path / "c" / "two.png")
    pattern((24, 24), "style").save(tmp_path / "s" / "st.png")
    return tmp_path


FAST = ["--weights", "random", "--image-size", "32", "--iterations", "2", "--device", "cpu"]


def test_credentials_in_prefect_api_url_are_not_printed_with_its_ui_links(data):
    """Prefect builds its UI URL from PREFECT_API_URL, user:password@ and all, and its "View at"
    line printed it for every run (cron mail, the journal); nst's own lines dropped them already."""
    url = PREFECT_API_URL.value().replace("http://", "http://alice:s3cret@", 1)
    proc = nst("batch", "--contents", "c", "--styles", "s", "--output", "out", *FAST, cwd=data,
               env={**os.environ, "PREFECT_API_URL": url})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "View at http://127.0.0.1:" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert "s3cret" not in proc.stdout + proc.stderr and "alice" not in proc.stdout + proc.stderr


def test_a_batch_whose_output_reader_goes_away_still_finishes_and_exits_0(data):
    """`nst batch ... 2>&1 | head -3`: once head had its lines, the next log record hit a broken pipe,
    Prefect's console handler (rich) raised SystemExit(1) inside the flow: the run Crashed with no
    image written, exit 1. With only stdout gone, the run finished but its last print exited 1."""
    import json as json_

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line: every write breaks
    # stdout buffered, as on a user's machine: the last line met the pipe at exit (rc 120)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    try:
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "batch", "--contents", "c", "--styles", "s",
                               "--output", "out", *FAST], cwd=data, stdout=write, stderr=write, timeout=300,
                              env={**env, "PREFECT_API_URL": PREFECT_API_URL.value()})
    finally:
        os.close(write)
    reports = [json_.loads(p.read_text()) for p in (data / "out" / "_runs").glob("*.json")]
    assert proc.returncode == 0 and [r["status"] for r in reports] == ["finished"], reports
    assert len(list((data / "out").glob("*.jpg"))) == 2


def test_only_credentials_leave_a_ui_url():
    from flows.cli import _without_credentials

    assert _without_credentials("http://alice:s3cret@127.0.0.1:4200") == "http://127.0.0.1:4200"
    assert _without_credentials("https://ui.example.com/prefect/@team") is None  # an @ in the path is no user
    assert _without_credentials("https://ui.example.com") is None and _without_credentials(None) is None


def test_batch_exit_codes(data):
    # The first run as the quickstart makes it: Prefect's temporary API on a fresh home. Old: its
    # database migrations outlasted Prefect's 20 s wait on a 2-core machine and the run died there.
    ok = nst("batch", "--contents", "c", "--styles", "s", "--output", "out", *FAST, cwd=data,
             env=first_start(data / "fresh-prefect-home"))
    assert ok.returncode == 0, ok.stderr
    assert "2 done, 0 skipped, 0 failed of 2 pairs (report: " in ok.stdout
    assert "2/2" in ok.stderr and "[#" not in ok.stderr  # the progress, in whole lines: stderr is no terminal here
    assert len(list((data / "out").glob("*.json"))) == 2

    (data / "c" / "three.png").write_bytes(b"garbage")
    failed = nst("batch", "--contents", "c", "--styles", "s", "--output", "out", "--max-failures", "0", *FAST, cwd=data)
    assert failed.returncode == 1
    assert "1 of 3 pairs failed (report: " in failed.stdout
    # a bad input is one line naming it, not a traceback per pair in the nightly log (old: ~20 lines each)
    logged = failed.stdout + failed.stderr
    assert "three.png: not a recognized image format" in logged and "Traceback" not in logged, logged[-3000:]

    (data / "m.csv").write_text("content,style\nc/one.png,s/st.png\nc/three.png,s/st.png\n")
    tolerated = nst("batch", "--manifest", "m.csv", "--output", "out2", "--max-failures", "1", *FAST, cwd=data)
    assert tolerated.returncode == 0, tolerated.stdout + tolerated.stderr
    assert "1 done, 0 skipped, 1 failed of 2 pairs" in tolerated.stdout


@pytest.mark.parametrize("args,message", [
    (["--contents", "c", "--output", "o"], "--contents needs --styles"),
    (["--contents", "c", "--styles", "s", "--output", "o", "--iterations", "0"], "iterations"),
    (["--contents", "c", "--styles", "s", "--output", "o", "--format", "gif"], "invalid choice: 'gif'"),
    (["--output", "o"], "one of the arguments --manifest --contents is required"),
    (["--contents", "file://c", "--styles", "s", "--output", "o"], "--contents file://c: a file URI with a host ('c')"),
    # old: Prefect's traceback of StorageError from inside the flow, exit 1
    (["--contents", "c", "--styles", "s", "--output", "file://out/x"], "invalid parameters: output.uri: file://out/x: a file URI with a host"),
    (["--contents", "c", "--styles", "s", "--output", "s3://"], "invalid parameters: output.uri: s3:// names no bucket"),
    (["--contents", "s3://", "--styles", "s", "--output", "o"], "invalid parameters: source.contents: s3:// names no bucket"),
    (["--contents", "c", "--styles", "s", "--output", "gs://b/out"], "invalid parameters: output.uri: gs://b/out: unsupported scheme 'gs'"),
    # old: boto's ParamValidationError over two lines, its regexes included, after Prefect started
    (["--contents", "s3://Bad_Bucket!/x", "--styles", "s", "--output", "o"],
     "invalid parameters: source.contents: s3://Bad_Bucket!/x: 'Bad_Bucket!' is not an S3 bucket name"),
    # old: ignored without a word; a manifest lists its pairs itself
    (["--manifest", "m.csv", "--pairing", "zip", "--output", "o"], "--pairing goes with --contents and --styles"),
    # old: "link_expiry_hours: ..." where the run's other fields say "run.devices", "params.tile_size"
    (["--contents", "c", "--styles", "s", "--output", "o", "--link-expiry-hours", "200"],
     "invalid parameters: output.link_expiry_hours:"),
])
def test_batch_bad_arguments_exit_2(data, args, message):
    proc = nst("batch", *args, cwd=data)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


#: Runs nst as its console script does, then prints which heavy packages the process imported.
_IMPORTS_AT_EXIT = ("import atexit, sys\n"
                    "atexit.register(lambda: print('heavy:', sorted(m for m in ('prefect', 'torch') if m in sys.modules),"
                    " file=sys.stderr))\n"
                    "from flows.cli import main\n"
                    "sys.exit(main(sys.argv[1:]))\n")


@pytest.mark.parametrize("args", [
    ["--help"], ["batch", "--help"], ["batch", "--contents", "c"],
    ["batch", "--contents", "c", "--styles", "s", "--output", "o", "--iterations", "0"],
    ["batch", "--contents", "nope", "--styles", "s", "--output", "o"],
])
def test_help_and_refused_arguments_answer_without_importing_prefect_or_torch(data, args):
    """Old: flows.cli imported flows.serve, which imported Prefect's server app (3 s of imports
    here), so `nst --help` took 4.8 s and every typo 4-5 s, against the module's own promise."""
    proc = subprocess.run([sys.executable, "-c", _IMPORTS_AT_EXIT, *args], cwd=data, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode in (0, 2), proc.stderr
    assert "heavy: []" in proc.stderr, proc.stderr


@pytest.mark.parametrize("args,message", [
    # old: torch's "Expected one of cpu, cuda, ..." traceback from inside the flow, exit 1
    (["--devices", "foo"], "run.devices.0: device 'foo' is not one of auto, cpu"),
    # old: "auto" ran as one more device name
    (["--devices", "auto", "cpu"], "run.devices: 'auto' means every device; give it alone or name the devices"),
    # old: every pair on cuda:7 failed alone ("Invalid device argument"), exit 1
    (["--devices", "cpu", "cuda:7"], "preflight failed: device 'cuda:7' requested but"),
    # old: an empty entry allowed the worker's working folder, and refusals said "none given"
    (["--allowed-sources", ""], "run.allowed_sources.0: must not be empty"),
    # old: every pair failed alone ("style_blend_weights has 2 values for 1 style image(s)"), exit 1
    (["--style-blend-weights", "1", "2"], "params.style_blend_weights: a batch pair has one style image"),
    # old: accepted; with Adam its first step overflowed
    (["--learning-rate", "1e39", "--optimizer", "adam"], "params.learning_rate: Input should be less than or equal"),
    # old: exit 1 and the bare line, as if pairs had failed
    (["--storage-credentials", "no-such-block"],
     "storage credentials: storage_credentials: no aws-credentials block named 'no-such-block'"),
])
def test_batch_refusals_of_run_settings_exit_2_with_one_line(data, args, message):
    proc = nst("batch", "--contents", "c", "--styles", "s", "--output", "out", *FAST, *args, cwd=data)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not list((data / "out").glob("*.png"))  # refused before any pair ran


@pytest.mark.parametrize("weights, message", [
    ("https://example.com/vgg16.pth", "unsupported scheme 'https'"), ("s3://", "names its bucket"),
    ("file://host/vgg16.pth", "a file URI with a host ('host')"), ("my:vgg16.pth", "write ./my:vgg16.pth")])
def test_batch_refuses_a_weights_uri_it_cannot_read_before_any_flow_run(data, weights, message):
    """The README says so; old: nst batch created a flow run, and its preflight refused the URI."""
    proc = nst("batch", "--contents", "c", "--styles", "s", "--output", "out", *FAST, "--weights", weights, cwd=data)
    assert proc.returncode == 2 and message in proc.stderr, proc.stdout + proc.stderr
    assert "flow run" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr


def test_batch_takes_folders_under_the_home_folder_as_the_shell_leaves_them(data):
    """`--contents '~/c'` (quoted, or from a config file): old: refused, "no such folder"."""
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "HOME": str(data)}
    proc = nst("batch", "--contents", "~/c", "--styles", "~/s", "--output", "~/out", *FAST, cwd=data / "s", env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(list((data / "out").glob("*.json"))) == 2


def test_stylize_loads_weights_from_s3(data, bucket):
    import hashlib
    import io

    import torch

    from nst_core.vgg import load_extractor

    name, client = bucket
    buf = io.BytesIO()
    torch.save(load_extractor("random", layers=["relu5_1"], seed=5).layers.state_dict(), buf)
    client.put_object(Bucket=name, Key="models/vgg16.pth", Body=buf.getvalue())
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    proc = nst("stylize", "c/one.png", "s/st.png", "-o", "w.png", "--weights", f"s3://{name}/models/vgg16.pth",
               "--weights-sha256", digest, "--image-size", "32", "--iterations", "2", "--device", "cpu", cwd=data)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((data / "w.png.json").read_text())["weights_id"] == f"sha256:{digest}"
    missing = nst("stylize", "c/one.png", "s/st.png", "-o", "x.png", "--weights", f"s3://{name}/models/nope.pth",
                  cwd=data)
    assert missing.returncode == 2 and "no such object" in missing.stderr and "Traceback" not in missing.stderr


def test_batch_missing_folder_is_one_line_before_prefect_starts(data):
    """Old: the flow started, preflight raised inside it and Prefect printed its traceback."""
    proc = nst("batch", "--contents", "nope", "--styles", "s", "--output", "out", *FAST, cwd=data)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "nst: error: --contents nope: no such folder", proc.stderr


def test_batch_preflight_failure_in_the_flow_is_one_line_no_traceback(data):
    """A refusal the flow finds (an empty folder here) ends the run Failed with one message; the
    CLI prints it once, as its error line, and exits 2. Old: a Prefect traceback on stderr."""
    (data / "empty").mkdir()
    proc = nst("batch", "--contents", "empty", "--styles", "s", "--output", "out", *FAST, cwd=data)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nst: error:")]
    assert len(errors) == 1 and "preflight failed: no image files" in errors[0] and "empty" in errors[0]
    assert "preflight failed" not in proc.stdout


def test_a_temporary_api_that_never_answers_is_one_line_and_the_users_profile_sets_the_wait(data):
    """Old: Prefect's RuntimeError and its traceback; and the CLI's own 120 s replaced the wait a
    user set with `prefect config set` (an environment variable beats a profile)."""
    home = data / "fresh-prefect-home"
    home.mkdir()
    # what `prefect config set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=1` writes to a fresh home
    (home / "profiles.toml").write_text('active = "ephemeral"\n\n[profiles.ephemeral]\n'
                                        'PREFECT_SERVER_EPHEMERAL_ENABLED = "true"\n'
                                        'PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS = "1"\n')
    proc = nst("batch", "--contents", "c", "--styles", "s", "--output", "out", *FAST, cwd=data, env=first_start(home))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nst: error:")]
    assert len(errors) == 1, proc.stderr
    assert "within 1 s" in errors[0] and "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in errors[0]
    assert "PREFECT_API_URL" in errors[0]
    assert not (data / "out").exists()


def test_a_temporary_api_that_cannot_start_is_one_line_with_its_own_reason(data):
    """Old: uvicorn's startup traceback three times over (Prefect restarts a server whose startup
    failed) on the terminal, then a line blaming the wait."""
    home = data / "fresh-prefect-home"
    env = first_start(home, PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{data}/no/such/dir/x.db")
    proc = nst("batch", "--contents", "c", "--styles", "s", "--output", "out", *FAST, cwd=data, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nst: error:")]
    assert len(errors) == 1, proc.stderr
    assert "temporary API could not start" in errors[0] and "unable to open database file" in errors[0]
    assert not (data / "out").exists()


def test_the_temporary_apis_wait_is_generous_unless_the_user_set_it():
    """A fresh home's migrations (12 s on a 2-core EPYC) plus the server's start (8 s) passed Prefect's
    20 s default."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as wait
    from prefect.settings import temporary_settings

    from flows.cli import _prefect_api
    from flows.serve import SERVER_START_TIMEOUT_S

    assert wait.name not in os.environ
    with _prefect_api():
        assert wait.value() == SERVER_START_TIMEOUT_S >= 120
    with temporary_settings(updates={wait: 7}):  # set by the user (a profile: the test above)
        with _prefect_api():
            assert wait.value() == 7


@pytest.mark.parametrize("profile", [None, "true", "false"])
def test_telemetry_is_off_by_default_and_a_profiles_setting_wins(tmp_path, profile):
    """In the temporary API server (whose heartbeat it is), off unless the user's environment or
    profile says otherwise. Old, once Prefect was no longer imported at startup: the default went
    into the environment before Prefect read the profile, and beat a profile's "true"."""
    if profile is not None:
        (tmp_path / "profiles.toml").write_text(
            f'active = "mine"\n[profiles.mine]\nPREFECT_SERVER_ANALYTICS_ENABLED = "{profile}"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_PROFILE")}
    # the temporary API's environment as Prefect's SubprocessASGIServer builds it, then the one
    # nst serve's local_server starts `prefect server start` with (its Popen stopped there)
    code = ("import os\nfrom flows.cli import _prefect_defaults\n_prefect_defaults()\n"
            "from prefect.settings import get_current_settings\n"
            "env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True)}\n"
            "print(env['PREFECT_SERVER_ANALYTICS_ENABLED'].capitalize())\n"
            "from flows import serve\n"
            "class Seen(Exception): pass\n"
            "def popen(cmd, env, **kw): raise Seen(env['PREFECT_SERVER_ANALYTICS_ENABLED'].capitalize())\n"
            "serve.subprocess.Popen = popen\n"
            "try:\n    serve.local_server(1).__enter__()\nexcept Seen as seen:\n    print(seen)\n")
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "PREFECT_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["True" if profile == "true" else "False"] * 2, proc.stdout + proc.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _answers(status: int, health: int | None = None):
    """An HTTP server on 127.0.0.1 that answers every request ``status`` (404: an API URL missing its
    /api, a proxy's error page; 401/403: an API behind authentication), and /api/health ``health``
    where given (a server that looks up but fails its calls); stopped on exit. Yields its port."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            healthy = health is not None and self.path.rstrip("/") == "/api/health"
            self.send_response(health if healthy else status)
            self.send_header("Content-Length", "4" if healthy else "0")
            self.end_headers()
            if healthy:
                self.wfile.write(b"true")

        do_POST = do_PATCH = do_PUT = do_DELETE = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("command,api", [("batch", "refused"), ("serve", "refused"), ("batch", "404"),
                                         ("batch", "401"), ("serve", "403"), ("batch", "500")])
def test_an_api_url_that_cannot_be_used_is_one_line_without_its_credentials(data, command, api):
    """Old: httpx's ConnectError, or Prefect's RuntimeError, under a traceback (exit 1, the code of a
    failed run); a 404's message carried the URL with its password; a 401/403 (an API behind
    authentication) was Prefect's HTTPStatusError under a traceback that carried it too."""
    args = ["--contents", "c", "--styles", "s", "--output", "out", *FAST] if command == "batch" else []
    with _answers(int(api)) if api != "refused" else contextlib.nullcontext(_free_port()) as port:
        url = f"http://user:hunter2@127.0.0.1:{port}/api"
        proc = nst(command, *args, cwd=data, env={**os.environ, "PREFECT_API_URL": url})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and "hunter2" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nst: error:")]
    assert len(errors) == 1, proc.stderr
    if api == "500":  # old: "cannot be used ...; fix PREFECT_API_URL", advice for a wrong URL, not a failing server
        assert f"the Prefect API at http://127.0.0.1:{port}/api failed (500 Internal Server Error" in errors[0]
        assert "the server's log" in errors[0] and "fix PREFECT_API_URL" not in errors[0], errors[0]
        return
    what = "does not answer" if api == "refused" else "cannot be used"
    assert f"the Prefect API at http://127.0.0.1:{port}/api {what}" in errors[0] and "PREFECT_API_URL" in errors[0]
    assert ("PREFECT_API_KEY" in errors[0]) == (api in ("401", "403")), errors[0]  # what to set


def test_an_api_that_answers_503_is_said_at_once_not_after_minutes_of_silent_retries(data):
    """Prefect's client retries a 503 (also 429, 502, 408) PREFECT_CLIENT_MAX_RETRIES times with
    growing waits: with the default 5, nst said nothing for ~115 s before its one line. Now it says
    so before the first call (and then waits as Prefect does: a busy SQLite answers 503 for a moment)."""
    with _answers(503) as port:
        url = f"http://user:hunter2@127.0.0.1:{port}/api"
        proc = nst("batch", "--contents", "c", "--styles", "s", "--output", "out", *FAST, cwd=data,
                   env={**os.environ, "PREFECT_API_URL": url, "PREFECT_CLIENT_MAX_RETRIES": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out and "hunter2" not in out, out
    warned = [line for line in proc.stderr.splitlines() if line.startswith("nst: warning:")]
    assert len(warned) == 1, out
    assert f"the Prefect API at http://127.0.0.1:{port}/api answers 503 Service Unavailable" in warned[0], warned
    assert "retries each call up to 1 times" in warned[0] and "PREFECT_CLIENT_MAX_RETRIES" in warned[0], warned
    assert proc.stderr.index(warned[0]) < proc.stderr.index("nst: error:"), out


def test_serve_says_it_uses_a_server_already_on_its_port_and_one_that_fails_is_one_line(data):
    """Old: `nst serve` without PREFECT_API_URL printed "starting a local Prefect server … (stopped
    when nst serve stops)" over a server already on its port, which it neither started nor stops;
    when that server failed its API calls the command ended in Prefect's traceback, exit 1."""
    with _answers(500, health=200) as port:
        proc = nst("serve", "--port", str(port), cwd=data, env=first_start(data / "home"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out
    assert f"using the Prefect server already answering on 127.0.0.1:{port}" in proc.stdout, out
    assert "starting a local Prefect server" not in out and "stopped when nst serve stops" not in out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nst: error:")]
    assert len(errors) == 1 and f"the Prefect API at http://127.0.0.1:{port}/api failed (500" in errors[0], out


def test_serves_own_server_failing_is_not_blamed_on_a_prefect_api_url_the_user_never_set(data):
    """Old: a server on nst serve's port that answered /health and then failed its calls (404: not a
    Prefect server, or one that died mid-serve) ended in "fix PREFECT_API_URL, or unset it" for a
    user who had set none."""
    with _answers(404, health=200) as port:
        proc = nst("serve", "--port", str(port), cwd=data, env=first_start(data / "home"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nst: error:")]
    assert len(errors) == 1 and f"the Prefect API at http://127.0.0.1:{port}/api cannot be used (404" in errors[0], out
    assert "PREFECT_API_URL" not in errors[0] and f"nst serve uses on 127.0.0.1:{port}" in errors[0], errors[0]
    assert "--port" in errors[0], errors[0]


@pytest.mark.parametrize("command", ["batch", "serve"])
def test_an_api_that_accepts_but_never_answers_is_one_line_in_bounded_time(data, command):
    """A PREFECT_API_URL whose server accepts connections and never replies (a hung proxy, a stopped
    container's port forward). Old: 7 min 12 s of silence, then the error."""
    import socket

    args = ["--contents", "c", "--styles", "s", "--output", "out", *FAST] if command == "batch" else []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # accepted by the kernel, never read or answered
        url = f"http://user:hunter2@127.0.0.1:{listener.getsockname()[1]}/api"
        proc = nst(command, *args, cwd=data, env={**os.environ, "PREFECT_API_URL": url, "NST_API_CHECK_S": "2"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nst: error:")]
    assert len(errors) == 1 and "does not answer (no reply within 2 s)" in errors[0], proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr + proc.stdout


def test_progress_bar_and_log_lines_never_share_a_line():
    """Old: a log line written while the bar was drawn continued the bar's line."""
    import io
    import logging

    from flows.cli import _LineBar, _logs_start_on_their_own_line

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    logger = logging.getLogger("nst-test-bar")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    bar = _LineBar(3, "pairs ", stream=stream)
    try:
        with _logs_start_on_their_own_line(lambda: bar):
            bar.update(1)
            logger.warning("a log line")
            bar.update(2)
            logger.warning("another")
            bar.update(3)
    finally:
        logger.removeHandler(handler)
    for line in stream.getvalue().split("\n"):
        visible = line.rsplit("\r", 1)[-1]  # what a terminal shows of that line
        assert not ("pairs [" in visible and ("log line" in visible or "another" in visible)), repr(line)
    shown = [line.rsplit("\r", 1)[-1].strip() for line in stream.getvalue().split("\n") if line.strip()]
    assert shown[:2] == ["a log line", "another"] and shown[-1].startswith("pairs [") and "3/3" in shown[-1]


def test_an_exit_at_once_records_its_run_crashed_and_cancels_its_queued_chunk_runs(monkeypatch):
    """A second Ctrl-C during a fan-out run: nst exits at once. The run cancels its chunk runs last,
    after its report, so they may still be queued: old, they waited for a GPU worker, their parent
    recorded Crashed only by the first half of this change."""
    from prefect.client.orchestration import get_client
    from prefect.states import Running, Scheduled

    import flows.batch as batch
    from flows.chunk import stylize_chunk
    from flows.cli import _record_crashed

    with get_client(sync_client=True) as client:
        parent = client.create_flow_run(batch.stylize_batch, state=Running())
        kids = [client.create_flow_run(stylize_chunk, tags=[f"nst-parent:{parent.id}"], state=Scheduled())
                for _ in range(2)]
        monkeypatch.setattr(batch, "in_progress", {str(parent.id)})
        _record_crashed("nst exited at once")
        assert client.read_flow_run(parent.id).state.name == "Crashed"
        assert [client.read_flow_run(k.id).state.name for k in kids] == ["Cancelled", "Cancelled"]


@pytest.mark.parametrize("args,message", [(["--limit", "1"], "--limit must be at least 2 (got 1)"),
                                          (["--name", "a/b"], "--name 'a/b': give a deployment name without '/'")])
def test_serve_refuses_its_options_before_it_starts_a_server(tmp_path, args, message):
    """Old: `nst serve --limit 1` without PREFECT_API_URL started a local Prefect server, then refused."""
    result = nst("serve", "--port", "4391", *args, cwd=tmp_path, env=first_start(tmp_path / "home"))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("nst: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "starting a local Prefect server" not in result.stdout + result.stderr


def test_a_bad_seconds_variable_is_a_warning_naming_it_not_a_traceback(tmp_path, monkeypatch):
    """Old: `NST_S3_READ_TIMEOUT_S=abc nst --help` died with a ValueError traceback from an import."""
    env = {**os.environ, "NST_S3_READ_TIMEOUT_S": "abc", "NST_CHUNK_START_TIMEOUT_S": "-5", "NST_STALE_TEMP_S": "1e3"}
    result = nst("--help", cwd=tmp_path, env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "NST_S3_READ_TIMEOUT_S='abc' is not a positive number of seconds; using 60" in result.stderr
    assert "NST_CHUNK_START_TIMEOUT_S" not in result.stderr  # not read by --help
    assert "NST_STALE_TEMP_S" not in result.stderr  # a good value is taken quietly
    from tasks.storage import env_seconds

    for name in ("NST_S3_READ_TIMEOUT_S", "NST_CHUNK_START_TIMEOUT_S", "NST_STALE_TEMP_S"):
        monkeypatch.setenv(name, env[name])
    assert [env_seconds(name, 7) for name in ("NST_S3_READ_TIMEOUT_S", "NST_CHUNK_START_TIMEOUT_S",
                                              "NST_STALE_TEMP_S")] == [7, 7, 1000]


@pytest.mark.parametrize("raw", ["-5", "0", "abc", "inf"])
def test_a_bad_api_check_wait_is_warned_about_and_the_default_used(monkeypatch, caplog, raw):
    """NST_API_CHECK_S reads like the other NST_..._S variables (README "Bounded time"). Old: -5
    ended nst with httpx's "Timeout value out of range", 0 waited for nothing, abc ended it."""
    import httpx

    from flows import cli

    waits = []
    monkeypatch.setattr(httpx, "get", lambda url, timeout: waits.append(timeout) or httpx.Response(200))
    monkeypatch.setenv("NST_API_CHECK_S", raw)
    cli._check_answers("http://127.0.0.1:9/api")
    assert waits == [cli.API_CHECK_S]
    assert f"NST_API_CHECK_S={raw!r} is not a positive number of seconds" in caplog.text


def test_nst_serve_losing_its_own_server_is_one_line_not_a_traceback(monkeypatch):
    """Prefect's runner gives up after three failed polls for runs (~3.5 min of an API restart):
    old, an unattended nst serve ended there with an ExceptionGroup traceback. On the server it
    started itself, nothing starts that server again: one line (tests/flows/test_serve.py: on
    PREFECT_API_URL's, it serves again). The runner is stood
    in for by what it raises there: its poller's task group inside the runner's
    (prefect/utilities/services.py critical_service_loop, runner/_scheduled_run_poller.py)."""
    import httpx

    from flows import cli, serve
    from nst_core.errors import NSTError

    def losing(limit, name):
        raise ExceptionGroup("runner", [ExceptionGroup("poller", [RuntimeError("Service exceeded error threshold.")])])

    def pausing_fails(limit, name):  # the API still away when the runner pauses its deployments
        raise httpx.ConnectError("All connection attempts failed")

    def unavailable(limit, name):  # a proxy in front of a server restarting
        request = httpx.Request("GET", "http://user:secretpw@127.0.0.1:9/api/deployments/x")
        raise httpx.HTTPStatusError("503", request=request, response=httpx.Response(503, request=request))

    for lost, how in ((losing, "its polls for runs failed 3 times in a row"), (pausing_fails, "it did not answer (ConnectError)"),
                      (unavailable, "it answered 503 Service Unavailable")):
        monkeypatch.setattr(serve, "serve_deployments", lost)
        with pytest.raises(NSTError, match=rf"lost the Prefect API at http://127.0.0.1:9/api: {re.escape(how)}, and") as err:
            cli._serve(2, "x", "http://user:secretpw@127.0.0.1:9/api", resume=False)  # its own server: it died
        assert "secretpw" not in str(err.value)
    other = ExceptionGroup("runner", [ExceptionGroup("poller", [RuntimeError("Service exceeded error threshold.")]),
                                      ValueError("a bug")])
    monkeypatch.setattr(serve, "serve_deployments", lambda limit, name: (_ for _ in ()).throw(other))
    for resume in (False, True):
        with pytest.raises(ExceptionGroup):  # anything else keeps its traceback
            cli._serve(2, "x", "http://127.0.0.1:9/api", resume=resume)


@pytest.mark.usefixtures("prefect_api")
def test_nst_serve_waiting_for_its_lost_api_stops_on_sigterm_without_a_traceback(monkeypatch):
    """Old: while waiting, SIGTERM (systemctl stop) reached the handler of the runner that gave up,
    on its closed event loop: "RuntimeError: Event loop is closed", a traceback and exit 1. Now the
    wait has nst's own (exit 143). Waits at least RESUME_POLL_S before serving again."""
    import signal

    from flows import cli, serve

    served = []

    def losing(limit, name):
        served.append(name)
        if len(served) > 2:  # old (the first version): served again at once, in a loop
            pytest.fail("served again without waiting")
        raise ExceptionGroup("runner", [RuntimeError("Service exceeded error threshold.")])

    monkeypatch.setattr(serve, "serve_deployments", losing)
    waits = []

    def sleep(seconds):  # the first wait: a SIGTERM arrives
        waits.append(seconds)
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)

    monkeypatch.setattr(cli.time, "sleep", sleep)
    previous = signal.signal(signal.SIGTERM, lambda *a: pytest.fail("the runner's handler ran"))
    try:
        with pytest.raises(SystemExit) as ended:
            cli._serve(2, "x", PREFECT_API_URL.value(), resume=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert ended.value.code == 143 and waits == [cli.RESUME_POLL_S]
    # no exit armed for later: raised in the sleep, nothing is left to hang on (one armed here ended
    # the test process 60 s on, in another test)
    assert cli.STOP_BOUND_THREAD not in {t.name for t in threading.enumerate()}
