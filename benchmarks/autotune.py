"""cuDNN autotuning on and off for a nightly run of mixed shapes, side by side.

Each side runs in its own fresh process (autotuning results live per process, as in a worker):
the same pairs, each content centre-cropped to another aspect ratio (1:1, 4:3, 3:4, 16:9, 9:16,
3:2), stylized one after the other with the default params at ``--size`` px for ``--iterations``
evaluations, ``nst_core.backend.CUDNN_BENCHMARK`` set on one side and off on the other. Prints
each side's wall time over all pairs, the first pair's (where autotuning lands) and their ratio
off/on (> 1: autotuning pays). Off CUDA the switch does nothing; the script still runs.

Imports neither prefect nor boto3 (benchmarks/gpu.sh runs it on a bare Python with torch).

    python benchmarks/autotune.py [--device cuda] [--size 512] [--iterations 100] [--weights random]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nst_core import StyleParams, stylize  # noqa: E402
from nst_core import backend  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RATIOS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (3, 2))


def _crop(img: Image.Image, ratio: tuple[int, int]) -> Image.Image:
    """The largest centred crop of ``img`` with width:height = ``ratio``."""
    w, h = img.size
    rw, rh = ratio
    cw, ch = (w, w * rh // rw) if w * rh // rw <= h else (h * rw // rh, h)
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def _child(args) -> None:
    backend.CUDNN_BENCHMARK = args.autotune == "on"
    contents = [Image.open(p).convert("RGB") for f in ("contents", "photos/contents")
                for p in sorted((EXAMPLES / f).glob("*.png"))]
    styles = [Image.open(p).convert("RGB") for f in ("styles", "photos/styles")
              for p in sorted((EXAMPLES / f).glob("*.png"))]
    params = StyleParams(weights=args.weights, device=args.device, image_size=args.size, iterations=args.iterations)
    seconds, benchmark = [], None
    for i, ratio in enumerate(RATIOS):
        t0 = time.perf_counter()
        result = stylize(_crop(contents[i % len(contents)], ratio), styles[i % len(styles)], params)
        seconds.append(time.perf_counter() - t0)
        benchmark = result.metadata["backend"]["cudnn_benchmark"]
    print(json.dumps({"seconds": seconds, "cudnn_benchmark": benchmark, "device": result.metadata["device"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--autotune", choices=["on", "off"], help=argparse.SUPPRESS)  # the child's side
    args = parser.parse_args()
    if args.autotune:
        return _child(args)
    sides = {}
    for side in ("on", "off"):
        cmd = [sys.executable, __file__, "--device", args.device, "--size", str(args.size),
               "--iterations", str(args.iterations), "--weights", args.weights, "--autotune", side]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"autotune {side} failed: {done.stderr.strip()[-400:]}")
        sides[side] = json.loads(done.stdout.strip().splitlines()[-1])
    on, off = sides["on"], sides["off"]
    print(f"{len(RATIOS)} pairs of aspect ratios {', '.join(f'{w}:{h}' for w, h in RATIOS)}, {args.size} px, "
          f"{args.iterations} evaluations each, default params, {args.weights} weights, device {on['device']}")
    print(f"cudnn.benchmark on (seen {on['cudnn_benchmark']}): {sum(on['seconds']):.1f} s, first pair "
          f"{on['seconds'][0]:.1f} s; off (seen {off['cudnn_benchmark']}): {sum(off['seconds']):.1f} s, first pair "
          f"{off['seconds'][0]:.1f} s; off/on {sum(off['seconds']) / sum(on['seconds']):.2f} (> 1: autotuning pays)")


if __name__ == "__main__":
    main()
