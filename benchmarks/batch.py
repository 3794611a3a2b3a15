"""Batch overhead: the stylize-batch flow's wall time over the sum of pure stylize() times.

8 pairs (4 contents x 2 styles) at 128 px, 30 evaluations, local folders, all measured in this
process: first the pure engine on each pair, then the flow over the same pairs (after a warm-up
run that starts the Prefect API and builds the extractor). Goal: ratio <= 1.10.

    python benchmarks/batch.py [--size 128] [--evals 30]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from PIL import Image  # noqa: E402

from flows.batch import stylize_batch  # noqa: E402
from tasks.models import BatchSource, OutputSpec, RunOptions  # noqa: E402
from nst_core import StyleParams, stylize  # noqa: E402
from tasks.compute import expand_devices, run_on_device  # noqa: E402

from helpers_bench import EXAMPLES  # noqa: E402


def make_dataset(root: Path) -> tuple[Path, Path]:
    """4 contents (the 2 examples and their mirrors) and the 2 example styles."""
    contents, styles = root / "contents", root / "styles"
    contents.mkdir(parents=True)
    styles.mkdir()
    for path in sorted((EXAMPLES / "contents").glob("*.png")):
        img = Image.open(path).convert("RGB")
        img.save(contents / path.name)
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(contents / f"{path.stem}-mirror.png")
    for path in sorted((EXAMPLES / "styles").glob("*.png")):
        Image.open(path).convert("RGB").save(styles / path.name)
    return contents, styles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--evals", type=int, default=30)
    args = ap.parse_args()
    params = StyleParams(weights="random", image_size=args.size, iterations=args.evals)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        contents, styles = make_dataset(root)
        pairs = [(c, s) for s in sorted(styles.iterdir()) for c in sorted(contents.iterdir())]
        source = BatchSource(contents=str(contents), styles=str(styles))

        # Warm-up: starts the Prefect API (once per process) and builds the extractor.
        stylize_batch(source, OutputSpec(uri=str(root / "warmup")), params.model_copy(update={"iterations": 1}),
                      RunOptions())

        def pure_time(c: Path, s: Path) -> float:
            content, style = Image.open(c).convert("RGB"), Image.open(s).convert("RGB")
            t = time.perf_counter()
            stylize(content, style, params)
            return time.perf_counter() - t

        # On the same compute thread the flow's tasks use, so both see the same OpenMP setup.
        device = expand_devices(["auto"], params.device)[0]
        pure = sum(run_on_device(device, lambda c=c, s=s: pure_time(c, s)) for c, s in pairs)

        t = time.perf_counter()
        state = stylize_batch(source, OutputSpec(uri=str(root / "out")), params, RunOptions(), return_state=True)
        wall = time.perf_counter() - t
        assert state.is_completed(), state.message
        assert state.result()["totals"]["done"] == len(pairs)

    print(f"{len(pairs)} pairs at {args.size} px, {args.evals} evaluations, local storage")
    print(f"sum of pure stylize() times : {pure:7.2f} s")
    print(f"stylize-batch flow wall time: {wall:7.2f} s")
    print(f"ratio                       : {wall / pure:7.3f}  (goal <= 1.10)")


if __name__ == "__main__":
    main()
