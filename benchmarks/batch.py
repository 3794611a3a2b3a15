"""Batch overhead: the stylize-batch flow's wall time over the sum of pure stylize() times.

8 pairs (4 contents x 2 styles) at 128 px, 30 evaluations, random weights, local folders, all
measured in this process: first the pure engine on each pair, then the flow over the same pairs.

Both sides do the same work. A warm-up flow run first starts the Prefect API and builds the
extractor; it stylizes the photo set (examples/photos), whose styles are not the timed ones, so
the flow's style-targets cache holds none of the timed styles. The flow computes each timed
style's targets once (its cache: a cross pairing is planned style-major), and so does the pure
side: compute_style_targets once per style, timed, then stylize(..., targets=) per pair.
Goal: ratio <= 1.10.

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
from nst_core.targets import compute_style_targets  # noqa: E402
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

        # Warm-up: starts the Prefect API (once per process) and builds the extractor, on styles
        # that are not timed below (a warm-up on the timed styles would fill the targets cache).
        photos = BatchSource(contents=str(EXAMPLES / "photos" / "contents"), styles=str(EXAMPLES / "photos" / "styles"))
        stylize_batch(photos, OutputSpec(uri=str(root / "warmup")), params.model_copy(update={"iterations": 1}),
                      RunOptions())

        def pure_targets(s: Path):
            t = time.perf_counter()
            targets = compute_style_targets(Image.open(s).convert("RGB"), params)
            return targets, time.perf_counter() - t

        def pure_time(c: Path, s: Path, targets) -> float:
            content, style = Image.open(c).convert("RGB"), Image.open(s).convert("RGB")
            t = time.perf_counter()
            stylize(content, style, params, targets=targets)
            return time.perf_counter() - t

        # On the same compute thread the flow's tasks use, so both see the same OpenMP setup.
        device = expand_devices(["auto"], params.device)[0]
        style_targets = {s: run_on_device(device, lambda s=s: pure_targets(s)) for s in sorted(styles.iterdir())}
        pure = sum(t for _, t in style_targets.values())
        pure += sum(run_on_device(device, lambda c=c, s=s: pure_time(c, s, style_targets[s][0])) for c, s in pairs)

        t = time.perf_counter()
        state = stylize_batch(source, OutputSpec(uri=str(root / "out")), params, RunOptions(), return_state=True)
        wall = time.perf_counter() - t
        assert state.is_completed(), state.message
        assert state.result()["totals"]["done"] == len(pairs)

    print(f"{len(pairs)} pairs (4 contents x 2 styles) at {args.size} px, {args.evals} evaluations, random weights, "
          f"local storage; no timed style warmed, style targets once per style on both sides")
    print(f"sum of pure stylize() times : {pure:7.2f} s  (with the 2 style-target computations)")
    print(f"stylize-batch flow wall time: {wall:7.2f} s")
    print(f"ratio                       : {wall / pure:7.3f}  (goal <= 1.10)")


if __name__ == "__main__":
    main()
