"""The L-BFGS direction −H·g: torch's two-loop recursion against the compact form, side by side.

Both compute the same direction from one full history (20 pairs, fp32, one problem of an
H×W×3 image, pairs from BatchedLBFGS's own steps on a random convex quadratic, the ring's oldest
pair mid-ring as in a long run). Per size it prints each one's device operations (kernel
launches on a GPU), its time per direction (median of --repeats after two warm-up calls; on
CUDA synchronized around each), the compact/two-loop time ratio, and each one's error: the
largest difference from the two-loop recursion run in fp64 on the same history, relative to its
largest element. The compact side is timed as a step pays it: the newest pair's products (its
row and column of SᵀY and YᵀY, and Sᵀg, Yᵀg, in two reads of the history), then the direction.

    python benchmarks/lbfgs.py [--sizes 128 256 512] [--device cpu] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nst_core.lbfgs import HISTORY, BatchedLBFGS, _dot  # noqa: E402

from launches import count, launches  # noqa: E402


def two_loop(g, s, y, rho, gamma, oldest):
    """nst_core's earlier direction: torch's two-loop recursion, newest pair first, on (B, K, N) views."""
    k = s.shape[1]
    q, alphas = -g, []
    for age in range(k):
        slot = (oldest - 1 - age) % k
        alpha = _dot(s[:, slot], q) * rho[slot]
        q = q.addcmul(y[:, slot], alpha[:, None], value=-1)
        alphas.append((slot, alpha))
    r = q * gamma[:, None]
    for slot, alpha in reversed(alphas):
        beta = _dot(y[:, slot], r) * rho[slot]
        r = r.addcmul(s[:, slot], (alpha - beta)[:, None])
    return r


def filled(n: int, device: torch.device) -> BatchedLBFGS:
    """A BatchedLBFGS of one problem of ``n`` values whose ring is full and wrapped (head mid-ring),
    built by its own steps on a random convex quadratic ½·Σ a·x² (every curvature pair kept)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.rand(1, n, generator=gen, device=device) + 0.1
    x = torch.rand(1, n, generator=gen, device=device)
    opt = BatchedLBFGS(x, 0.1, HISTORY)
    frozen = torch.zeros(1, dtype=torch.bool, device=device)
    for _ in range(HISTORY + HISTORY // 2 + 1):
        opt.step(x, a * x, frozen)
    return opt


def error(d: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest difference from the fp64 direction, relative to its largest element."""
    return float((d.double() - exact).abs().max() / exact.abs().max())


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after two warm-up calls."""
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"# {device}, fp32, history {HISTORY}, one problem; two-loop vs compact direction (nst_core.lbfgs)")
    print(f"{'size':>9} {'ops':>11} {'two-loop ms':>12} {'compact ms':>11} {'ratio':>6} {'two-loop error':>14} "
          f"{'compact error':>13}")
    for size in args.sizes:
        n = size * (size * 3 // 4) * 3
        frozen = torch.zeros(1, dtype=torch.bool, device=device)
        g = torch.randn(1, n, generator=torch.Generator(device=device).manual_seed(1), device=device)
        # the errors on a history of the quadratic's own steps (a timed step rewrites a slot with g)
        opt = filled(n, device)
        sg, yg = opt._remember(g, frozen)
        a, b = two_loop(g, opt.s, opt.y, opt.rho, opt.h_diag, opt.head), opt._direction(g, sg, yg)
        exact = two_loop(*(t.double() for t in (g, opt.s, opt.y, opt.rho, opt.h_diag)), opt.head)
        opt = filled(n, device)

        def old():
            return two_loop(g, opt.s, opt.y, opt.rho, opt.h_diag, opt.head)

        def new():  # what a step pays: the newest pair's products, then the direction
            return opt._direction(g, *opt._remember(g, frozen))

        ops_old, ops_new = launches(count(old)), launches(count(new))
        old_s, new_s = timed(old, device, args.repeats), timed(new, device, args.repeats)
        label = f"{size}x{size * 3 // 4}"
        print(f"{label:>9} {ops_old:>5.0f}/{ops_new:<5.0f} {old_s * 1e3:>12.2f} {new_s * 1e3:>11.2f} "
              f"{new_s / old_s:>6.2f} {error(a, exact):>14.1e} {error(b, exact):>13.1e}", flush=True)


if __name__ == "__main__":
    main()
