"""Throughput: pairs per hour with N pairs per device step, side by side with N = 1.

Engine level (``stylize_many``, what one device step of the batch flow runs), in this process:
the same P pairs (P = the largest N, at least 8) for every N, optimized in steps of N, with the
same params and evaluations; pairs per hour = P / wall time. ``auto`` is what
``RunOptions.pairs_per_step="auto"`` picks on this device (``tasks.steps.StepSizer``): a first step of
one pair measures its memory, then N from the free memory; 1 off CUDA.

Pairs: the contents of examples/contents and examples/photos/contents, centre-cropped to 4:3 so
that they share one output shape, each with a style of examples/styles and examples/photos/styles
(the same list for every N). Random weights unless --weights; single scale; the run's default
precision unless --precision. A warm-up step of each N's size runs first (cuDNN autotuning,
allocator), untimed.

Also the largest per-pair difference between a pair's batched result (any N > 1) and the same pair
alone (N = 1 in this run): max pixel difference in 1/255 and the final loss's relative difference,
and the geometric mean of the final-loss ratios batched / alone ("loss ratio": ~1 when batching only
changes rounding, above 1 when batched pairs end worse).

Imports neither prefect nor boto3 (benchmarks/gpu.sh runs it on a bare Python with torch).

    python benchmarks/throughput.py [--sizes 256 512] [--ns 1 2 4 8] [--iterations 10] [--device auto]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tasks.steps, when run from anywhere

from nst_core import StyleParams, StylePair, stylize_many  # noqa: E402
from nst_core.vgg import resolve_device  # noqa: E402
from tasks.steps import StepSizer  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _images(*folders: str) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for f in folders for p in sorted((EXAMPLES / f).glob("*.png"))]


def sample_pairs(count: int, size: int) -> list[StylePair]:
    """``count`` pairs of one output shape (size x 3/4 size), styles rotating against contents."""
    contents = [_crop(img, size) for img in _images("contents", "photos/contents")]
    styles = _images("styles", "photos/styles")
    return [StylePair(contents[i % len(contents)], styles[(i + i // len(contents)) % len(styles)],
                      content_name=f"content {i % len(contents)}") for i in range(count)]


def _crop(img: Image.Image, size: int) -> Image.Image:
    """Centre crop to 4:3, then size x 3/4 size: every content gives the same output shape."""
    w, h = img.size
    cw, ch = (w, w * 3 // 4) if w * 3 // 4 <= h else (h * 4 // 3, h)
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch)).resize((size, size * 3 // 4), Image.Resampling.LANCZOS)


def run_steps(pairs: list[StylePair], params: StyleParams, n: int | str, sizer: StepSizer, device: str) -> tuple:
    """All ``pairs`` in steps of ``n`` ("auto": as the batch flow sizes them). Returns (seconds, results, sizes)."""
    results, sizes = [], []
    pixels = pairs[0].content.width * pairs[0].content.height
    t0 = time.perf_counter()
    i = 0
    while i < len(pairs):
        step = sizer.pairs(device, pixels) if n == "auto" else n
        with sizer.measure(device, step * pixels):
            results += stylize_many(pairs[i:i + step], params)
        sizes.append(len(pairs[i:i + step]))
        i += step
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, results, sizes


def differences(batched: list, alone: list) -> tuple[float, float, float]:
    """(max pixel difference in 1/255, max relative final-loss difference, geometric mean of the
    final-loss ratios batched / alone) over the pairs. The mean tells a bias (batched pairs ending
    worse) from rounding that L-BFGS amplifies either way (ratios scattered around 1)."""
    pixels, loss, logs = 0.0, 0.0, []
    for b, a in zip(batched, alone):
        if isinstance(a, Exception) or isinstance(b, Exception):
            continue
        pixels = max(pixels, float(np.abs(np.asarray(b.image, np.int16) - np.asarray(a.image, np.int16)).max()))
        fa, fb = a.losses["final"]["total"], b.losses["final"]["total"]
        loss = max(loss, abs(fb - fa) / abs(fa)) if fa else loss
        if fa > 0 and fb > 0:  # a loss of exactly 0 has no ratio
            logs.append(math.log(fb / fa))
    return pixels, loss, math.exp(sum(logs) / len(logs)) if logs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="output longest sides, px")
    ap.add_argument("--ns", type=int, nargs="+", default=[1, 2, 4, 8], help="pairs per step (auto is always added)")
    ap.add_argument("--iterations", type=int, default=10, help="loss evaluations per pair")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--precision", default=StyleParams.model_fields["precision"].default)
    args = ap.parse_args()
    ns: list[int | str] = sorted(set(args.ns) | {1}) + ["auto"]
    count = max(8, *args.ns)
    device = str(resolve_device(args.device))
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    print(f"device {device} (torch {torch.__version__}, {torch.get_num_threads()} threads), {count} pairs, "
          f"{args.iterations} evaluations each, weights {args.weights}, precision {args.precision}, single scale")
    for size in args.sizes:
        params = StyleParams(weights=args.weights, image_size=size, iterations=args.iterations, device=device,
                             scales=1, precision=args.precision)
        pairs = sample_pairs(count, size)
        alone, base = None, 0.0
        print(f"\n{size} px ({pairs[0].content.width}x{pairs[0].content.height})")
        print(f"{'N':>6} {'steps':>10} {'seconds':>9} {'pairs/hour':>11} {'vs N=1':>7} {'max px diff':>12} "
              f"{'max loss diff':>14} {'loss ratio':>10}  precision")
        for n in ns:
            warm = min(count, 1 if n == "auto" else n)
            stylize_many(pairs[:warm], params.model_copy(update={"iterations": 2}))  # untimed
            seconds, results, sizes = run_steps(pairs, params, n, StepSizer(), device)  # auto: as a new run
            failed = [r for r in results if isinstance(r, Exception)]
            per_hour = count / seconds * 3600
            if n == 1:
                alone, base = results, per_hour
            px, loss, ratio = differences(results, alone) if n != 1 else (None, None, None)
            shown = f"auto={max(sizes)}" if n == "auto" else str(n)
            steps = ",".join(map(str, sizes)) if len(set(sizes)) > 1 else f"{len(sizes)}x{sizes[0]}"
            print(f"{shown:>6} {steps:>10} {seconds:9.1f} {per_hour:11.0f} {per_hour / base:7.2f} "
                  f"{'-' if px is None else f'{px:.0f}/255':>12} {'-' if loss is None else f'{loss:.2e}':>14} "
                  f"{'-' if ratio is None else f'{ratio:.4f}':>10}  "
                  f"{results[0].metadata['precision'] if not failed else '?'}"
                  + (f"  {len(failed)} failed: {failed[0]}" if failed else ""), flush=True)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("prefect", "boto3", "botocore"))
    assert not loaded, f"the engine benchmark imported {loaded}"


if __name__ == "__main__":
    main()
