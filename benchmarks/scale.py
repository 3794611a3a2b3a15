"""Scale: N pairs (default 2,000) of 16 px images, 1 evaluation each, against a real local Prefect
server; then the same run again, where every pair is skipped.

Starts ``prefect server start`` on 127.0.0.1 (a free port, a temporary PREFECT_HOME). Each run of
stylize-batch (the first and the skip-all rerun) is a child process of its own, so the peak RSS
printed for it is that run's own: the child's VmHWM (/proc/self/status) read when the run ends,
the whole process with its imports (the figure after the imports is printed beside it). Not the
child's ru_maxrss: Linux carries the parent's peak into it across fork and exec. Printed
per run: task runs created, wall time of the flow call, pairs/s, peak RSS. Goal: skip-all rerun of
10,000 pairs under 60 s.

    python benchmarks/scale.py [--pairs 2000] [--styles 20] [--window 16]
    python benchmarks/scale.py --pairs 10000 --skip-only   # prefill, then time only the skip-all run

``--skip-only`` leaves storage as a real run does, through the storage contract
(``tasks/contract.py``): one real 16 px result, encoded as the run encodes it, written under every
pair's planned name, then the full sidecar (``sidecar()``) with the planned key and the image record
(``image_record()``: size and identity) that the done rule checks. Only the image bytes repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise SystemExit("prefect server did not start")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def make_dataset(root: Path, pairs: int, styles: int) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image

    contents_dir, styles_dir = root / "contents", root / "styles"
    contents_dir.mkdir(parents=True)
    styles_dir.mkdir()
    rng = np.random.default_rng(0)
    n_contents = -(-pairs // styles)
    for i in range(n_contents):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(contents_dir / f"c{i:05d}.png")
    for i in range(styles):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(styles_dir / f"s{i:03d}.png")
    return contents_dir, styles_dir


def count_task_runs(flow_run_id) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    total, offset = 0, 0
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                         limit=200, offset=offset)
            total += len(page)
            offset += 200
            if len(page) < 200:
                return total


def inputs(spec: dict):
    """The flow's arguments, built the same way in the parent (prefill) and in each child run."""
    from nst_core import StyleParams
    from tasks.models import BatchSource, OutputSpec, RunOptions

    return (BatchSource(contents=spec["contents"], styles=spec["styles"]),
            OutputSpec(uri=spec["output"], format="png"),
            StyleParams(**spec["params"]),
            RunOptions(window=spec["window"], contact_sheet_rows=8, max_failures=spec["pairs"]))


def prefill(spec: dict) -> float:
    """Leave storage as a real run of every pair does (see the module docstring); returns seconds."""
    from PIL import Image

    from nst_core import stylize
    from nst_core.imageio import encode_image
    from tasks.contract import image_record, sidecar
    from tasks.plan import plan_pairs, source_entries
    from tasks.storage import open_storage

    source, output, params, _ = inputs(spec)
    t = time.perf_counter()
    entries = source_entries(source)
    first = entries[0]
    result = stylize(Image.open(first.content).convert("RGB"), Image.open(first.style).convert("RGB"), params)
    image = encode_image(result.image, output.format, quality=output.quality)
    out = open_storage(output.uri)
    flow_run = {"id": "prefill", "name": "scale-prefill"}
    for p in plan_pairs(entries, params, result.metadata["weights_id"], output.format, output.quality):
        identity = out.write(p.image_key, image, f"image/{output.format}")
        meta = sidecar(p, out.uri_for(p.image_key), result, {}, flow_run, {"device_wait": 0.0},
                       image_record(image, identity))
        out.write(p.sidecar_key, json.dumps(meta, indent=2).encode(), "application/json")
    return time.perf_counter() - t


def peak_rss_kib() -> int:
    """This process's peak resident memory so far, KiB: VmHWM, which starts afresh at exec."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):  # not Linux: ru_maxrss (may include the parent's peak)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(spec: dict) -> None:
    """One stylize-batch run in this (child) process; prints one JSON line for the parent."""
    from flows.batch import stylize_batch

    args = inputs(spec)
    import_rss_kib = peak_rss_kib()
    t = time.perf_counter()
    state = stylize_batch(*args, return_state=True)
    wall = time.perf_counter() - t
    peak = peak_rss_kib()
    totals = state.result()["totals"]
    runs = count_task_runs(state.state_details.flow_run_id)
    print(json.dumps({"totals": totals, "runs": runs, "wall": wall, "import_rss_kib": import_rss_kib,
                      "peak_rss_kib": peak}))


def run_child(spec: dict) -> dict:
    """Run ``child`` in a fresh process and return what it printed."""
    proc = subprocess.run([sys.executable, str(HERE), "--child", json.dumps(spec)], stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"a stylize-batch child run exited with {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(label: str, r: dict, n: int) -> None:
    print(f"{label}: {r['totals']}")
    print(f"  task runs created : {r['runs']} ({r['runs'] / max(n, 1):.2f} per pair)")
    print(f"  wall time         : {r['wall']:8.1f} s   ({n / r['wall']:.1f} pairs/s)")
    print(f"  peak RSS          : {r['peak_rss_kib'] / 1024:8.0f} MB   (this run's process; "
          f"{r['import_rss_kib'] / 1024:.0f} MB after imports, before the run)")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.path.insert(0, str(HERE.parent.parent))
        child(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--styles", type=int, default=20, help="cross pairing: pairs/styles contents x styles")
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--skip-only", action="store_true",
                    help="leave every pair's result as a real run does (contract's naming, key, sidecar and "
                         "image record), then time only the skip-all run")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent.parent))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server, api_url = start_server(root / "prefect-home")
        try:
            os.environ.update({"PREFECT_API_URL": api_url, "PREFECT_HOME": str(root / "client-home"),
                               "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
            contents, styles = make_dataset(root / "data", args.pairs, args.styles)
            spec = {"contents": str(contents), "styles": str(styles), "output": str(root / "out"),
                    "params": {"weights": "random", "image_size": 16, "iterations": 1, "device": "cpu", "scales": 1},
                    "window": args.window, "pairs": args.pairs}
            if args.skip_only:
                filled = prefill(spec)
            else:
                first = run_child(spec)
            again = run_child(spec)
        finally:
            stop_server(server)

    n = again["totals"]["pairs"]
    print(f"{n} pairs ({-(-args.pairs // args.styles)} contents x {args.styles} styles), "
          f"16 px, 1 evaluation, random weights, CPU, local storage, real Prefect server; window {args.window}")
    if args.skip_only:
        print(f"prefill (as a real run leaves storage: image, then sidecar with key and image record): "
              f"{filled:.1f} s, not timed below")
    else:
        report("first run", first, n)
    report("skip-all rerun", again, n)
    print("  (goal for 10,000 pairs: rerun < 60 s)")


if __name__ == "__main__":
    main()
