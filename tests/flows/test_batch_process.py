"""`nst batch` as a process: Ctrl-C stops it within seconds (exit 130); kill -9 mid-run, then the
same command again, redoes no completed pair and never shows a partial or temporary object."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from nst_core import StyleParams

from helpers import pattern

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.usefixtures("prefect_api")]

ROOT = Path(__file__).resolve().parents[2]
PAIRS = 4
#: After Ctrl-C, `nst batch` exits within this long whatever it is doing (flows/cli.py: "a second
#: Ctrl-C, or 10 s later, exits at once"): a promise of the product, not a benchmark.
EXIT_AFTER_CTRL_C_S = 10
#: Signal delivery, os._exit and the kernel reaping the process group; not room for a slower exit.
SLACK_S = 5


def _command(tmp_path: Path) -> list[str]:
    cmd = [sys.executable, "-m", "flows.cli", "batch", "--contents", str(tmp_path / "c"), "--styles",
           str(tmp_path / "s"), "--output", str(tmp_path / "out"), "--weights", "random", "--device", "cpu",
           "--image-size", "32", "--iterations", "30", "--window", "2"]
    if "scales" in StyleParams.model_fields:
        cmd += ["--scales", "1"]
    return cmd


def _start(tmp_path: Path) -> subprocess.Popen:
    """`nst batch` against the session's Prefect API (a kill -9 of the command leaves the API up, as
    a real server would be; starting an ephemeral one per process took ~50 s each here)."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(_command(tmp_path), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: the test can stop all of it


def _sidecars(out: Path) -> list[Path]:
    return sorted(out.glob("*.json")) if out.exists() else []


def _wait_for(predicate, deadline_s: float, proc: subprocess.Popen) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"nst batch ended early ({proc.returncode}): {proc.stdout.read().decode()[-2000:]}")
        if time.monotonic() > end:
            pytest.fail("timed out waiting for the batch to make progress")
        time.sleep(0.2)


def _visible_outputs_are_whole(out: Path) -> None:
    """What a reader of the output sees: whole images and sidecars at the top, reports under _runs/,
    nothing else. Temp files live only under .nst-tmp/ (outside every listing), named {pid}-{hex}."""
    from tasks.storage import TEMP_DIR, LocalStorage

    if not out.exists():
        return
    for path in out.iterdir():
        assert path.name in (TEMP_DIR, "_runs") or (path.is_file() and path.suffix in (".jpg", ".json")), path
    for info in LocalStorage(out).list():
        path = out / info.key
        assert info.key.startswith("_runs/") or "/" not in info.key, info.key
        if path.suffix == ".jpg":
            with Image.open(path) as img:
                img.load()  # a partial JPEG raises here
        elif path.suffix == ".json":
            json.loads(path.read_text())
    for path in (out / TEMP_DIR).glob("*") if (out / TEMP_DIR).exists() else []:
        assert re.fullmatch(r"\d+-[0-9a-f]{32}", path.name), path


def test_ctrl_c_then_kill_9_then_rerun(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "s").mkdir()
    for i in range(PAIRS):
        pattern((32, 24), "content", i).save(tmp_path / "c" / f"c{i}.png")
    pattern((24, 32), "style").save(tmp_path / "s" / "s.png")
    out = tmp_path / "out"
    procs = []
    try:
        # 1. Ctrl-C (the terminal sends SIGINT to the whole foreground group) once a pair is done.
        proc = _start(tmp_path)
        procs.append(proc)
        _wait_for(lambda: len(_sidecars(out)) >= 1, 240, proc)
        os.killpg(proc.pid, signal.SIGINT)
        signalled = time.monotonic()
        try:
            code = proc.wait(timeout=EXIT_AFTER_CTRL_C_S + SLACK_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"nst batch still running {time.monotonic() - signalled:.1f} s after Ctrl-C "
                        f"(it promises to exit within {EXIT_AFTER_CTRL_C_S} s)")
        assert code == 130, proc.stdout.read().decode()[-2000:]
        _visible_outputs_are_whole(out)

        # 2. kill -9 mid-run.
        before = {p.name: p.stat().st_mtime_ns for p in _sidecars(out)}
        proc = _start(tmp_path)
        procs.append(proc)
        _wait_for(lambda: len(_sidecars(out)) > len(before), 240, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        _visible_outputs_are_whole(out)
        done = {p.name: p.stat().st_mtime_ns for p in _sidecars(out)}

        # 3. The same command again finishes everything and redoes nothing that was done.
        proc = _start(tmp_path)
        procs.append(proc)
        output = proc.communicate(timeout=400)[0].decode()
        assert proc.returncode == 0, output[-3000:]
        reports = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
        # the killed run's report still says "running" (its write probe); Ctrl-C's says "crashed"
        assert [r.get("status") for r in reports].count("running") == 1
        assert [r.get("status") for r in reports].count("crashed") == 1
        last = max((r for r in reports if "totals" in r), key=lambda r: r["finished"])
        assert last["totals"]["pairs"] == PAIRS and last["totals"]["failed"] == 0
        assert last["totals"]["skipped"] == len(done) and last["totals"]["done"] == PAIRS - len(done)
        assert {p.name: p.stat().st_mtime_ns for p in _sidecars(out) if p.name in done} == done
        assert len(_sidecars(out)) == PAIRS and len(list(out.glob("*.jpg"))) == PAIRS
        _visible_outputs_are_whole(out)
        assert not list((out / ".nst-tmp").iterdir())  # what the killed run left is cleaned
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            proc.stdout.close()
