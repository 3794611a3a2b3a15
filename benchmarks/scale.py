"""Scale: N pairs (default 2,000) of 16 px images, 1 evaluation each, against a real local Prefect
server; then the same run again, where every pair is skipped.

Starts ``prefect server start`` on 127.0.0.1 (a free port, a temporary PREFECT_HOME), runs
stylize-batch in this process against it, prints the task runs created, peak RSS, wall time and
pairs/s, then the skip-all rerun's wall time, and stops the server. Goal: skip-all rerun of
10,000 pairs under 60 s.

    python benchmarks/scale.py [--pairs 2000] [--styles 20] [--window 16]
    python benchmarks/scale.py --pairs 10000 --skip-only   # results pre-written by the contract's own
                                                           # naming and keys: times only the skip-all run
"""

from __future__ import annotations

import argparse
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


def prefill(source, output, params) -> float:
    """Write every pair's result as the contract names it (placeholder image, sidecar with the key)."""
    import json

    from tasks.plan import plan_pairs, source_entries
    from tasks.storage import open_storage

    t = time.perf_counter()
    out = open_storage(output.uri)
    for p in plan_pairs(source_entries(source), params, "random(seed=0)", output.format, output.quality):
        out.write(p.image_key, b"placeholder")
        out.write(p.sidecar_key, json.dumps({"key": p.key}).encode())
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--styles", type=int, default=20, help="cross pairing: pairs/styles contents x styles")
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--skip-only", action="store_true",
                    help="write every pair's image and sidecar first (placeholder bytes, the planned key), "
                         "then time only the skip-all run")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server, api_url = start_server(root / "prefect-home")
        try:
            os.environ.update({"PREFECT_API_URL": api_url, "PREFECT_HOME": str(root / "client-home"),
                               "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
            from flows.batch import stylize_batch
            from nst_core import StyleParams
            from tasks.models import BatchSource, OutputSpec, RunOptions

            contents, styles = make_dataset(root / "data", args.pairs, args.styles)
            fields = {"weights": "random", "image_size": 16, "iterations": 1, "device": "cpu"}
            if "scales" in StyleParams.model_fields:
                fields["scales"] = 1
            params = StyleParams(**fields)
            source = BatchSource(contents=str(contents), styles=str(styles))
            output = OutputSpec(uri=str(root / "out"), format="png")
            options = RunOptions(window=args.window, contact_sheet_rows=8, max_failures=args.pairs)

            if args.skip_only:
                wall = prefill(source, output, params)
                totals, runs = {"pairs": args.pairs, "prefilled": args.pairs}, 0
            else:
                t = time.perf_counter()
                state = stylize_batch(source, output, params, options, return_state=True)
                wall = time.perf_counter() - t
                totals = state.result()["totals"]
                runs = count_task_runs(state.state_details.flow_run_id)
            rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

            t = time.perf_counter()
            again = stylize_batch(source, output, params, options, return_state=True)
            rerun = time.perf_counter() - t
            totals2 = again.result()["totals"]
            runs2 = count_task_runs(again.state_details.flow_run_id)
        finally:
            stop_server(server)

    n = totals["pairs"]
    print(f"{n} pairs ({args.pairs // args.styles + (args.pairs % args.styles > 0)} contents x {args.styles} styles), "
          f"16 px, 1 evaluation, local storage, real Prefect server; window {args.window}")
    print(f"first run : {totals}" + ("  (pre-written, not stylized)" if args.skip_only else ""))
    print(f"  task runs created : {runs} ({runs / max(n, 1):.2f} per pair)")
    print(f"  wall time         : {wall:8.1f} s   ({n / wall:.1f} pairs/s)")
    print(f"  peak RSS          : {rss_mb:8.0f} MB")
    print(f"skip-all rerun: {totals2}")
    print(f"  task runs created : {runs2}")
    print(f"  wall time         : {rerun:8.1f} s   (goal for 10,000 pairs: < 60 s)")


if __name__ == "__main__":
    main()
