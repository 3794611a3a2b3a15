"""The default against the paper's method on real photographs: loss, time, time to equal loss.

For every content × style of the benchmark set (examples/photos: chelsea, camera × brick,
gravel; examples/: houses, harbour × mosaic, waves) at each --sizes px: the default params
against single-scale fp32 L-BFGS (``scales=1, precision=fp32``), same objective, same weights,
same --evaluations. Printed per pair:

- wall seconds of each run (targets included, extractors warm);
- final loss of each: fp32 at the output size on the returned 8-bit image (what is written);
- loss ratio default / single-scale (goal <= 1.02 on every pair);
- when single-scale first reached the default's final loss (its loss trajectory, fp32 at the
  output size on the float image, timed from the call), and time ratio default / that time
  (goal: geometric mean <= 0.5). "never": single-scale did not reach it in its whole budget;
  the time ratio is then printed as a bound, "<" default / the time of single-scale's last evaluation,
  and the geometric mean over such pairs as a bound too, beside the mean of the measured pairs.

    python benchmarks/quality.py [--sizes 256 512] [--evaluations 300] [--set photos|examples|all]
                                 [--weights random] [--device auto] [--param scales=1 ...]
                                 [--exact-tail 0.667 0.8] [--only chelsea:gravel ...]

--param overrides a field of the default side (to measure a candidate default); --exact-tail
sets the share of a reduced-precision run's evaluations that run in exact fp32 at the end
(nst_core.optimize.EXACT_TAIL), to measure a candidate tail (the single-scale side is fp32).
Several tails run the default side once each against one single-scale run per pair (the
reference, the longest run, is not repeated), one line each and one summary line each.
With random weights the loss plateaus early; real weights keep improving much longer.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nst_core import StyleParams, optimize, stylize  # noqa: E402
from nst_core.backend import REDUCED_MIN_SIZE, resolve_precision  # noqa: E402
from nst_core.vgg import resolve_device  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SETS = {
    "photos": (EXAMPLES / "photos" / "contents", EXAMPLES / "photos" / "styles"),
    "examples": (EXAMPLES / "contents", EXAMPLES / "styles"),
}


def pairs(which: str) -> list[tuple[Path, Path]]:
    """(content, style) paths of the chosen set(s), sorted."""
    out = []
    for name in (SETS if which == "all" else [which]):
        contents, styles = SETS[name]
        out += [(c, s) for c in sorted(contents.glob("*.png")) for s in sorted(styles.glob("*.png"))]
    return out


def run(content: Image.Image, style: Image.Image, params: StyleParams) -> tuple:
    """(final fp32 loss, wall seconds, [(seconds since the call, best loss so far)] per evaluation)."""
    trajectory: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    best = [math.inf]

    def progress(event) -> None:
        best[0] = min(best[0], event.loss)
        trajectory.append((time.perf_counter() - t0, best[0]))

    result = stylize(content, style, params, progress=progress)
    return result.losses["final"]["total"], time.perf_counter() - t0, trajectory


def same_computation(default: StyleParams, single: StyleParams) -> bool:
    """Whether the default side would run the reference's very computation on this machine (a
    comparison would only measure noise, at twice the time): precision 'auto' resolving to fp32
    and every other field equal."""
    precision = resolve_precision(default.precision, resolve_device(default.device), default.image_size)
    return precision == "fp32" and default.model_dump(exclude={"precision"}) == single.model_dump(exclude={"precision"})


def geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--evaluations", type=int, default=300)
    ap.add_argument("--set", default="all", choices=["all", *SETS])
    ap.add_argument("--only", nargs="+", default=None, metavar="CONTENT:STYLE",
                    help="run only these pairs of the set, by file stem, e.g. chelsea:gravel")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--param", action="append", default=[], help="FIELD=JSON for the default side, e.g. scales=1")
    ap.add_argument("--exact-tail", type=float, nargs="+", default=None,
                    help="share(s) of evaluations in exact fp32 at the end; several: each against one reference run")
    args = ap.parse_args()
    tails = args.exact_tail or [optimize.EXACT_TAIL]
    if any(not 0 <= t <= 1 for t in tails):
        ap.error(f"--exact-tail: shares between 0 and 1, not {tails}")

    overrides = {k: json.loads(v) if v[:1] in "[{0123456789-tfn\"" else v
                 for k, v in (p.split("=", 1) for p in args.param)}
    common = {"weights": args.weights, "device": args.device, "seed": args.seed, "iterations": args.evaluations}
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, weights {args.weights}, {args.evaluations} evaluations; default side "
          f"{StyleParams(**common, **overrides).model_dump(include={'scales', 'precision', 'stop_tolerance'})}, "
          f"exact tail {' '.join(f'{t:.3g}' for t in tails)}")
    print(f"{'content x style':<24} {'px':>4} {'tail':>5} {'default s':>9} {'loss':>9} {'single s':>9} {'loss':>9} "
          f"{'loss ratio':>10} {'reached at':>10} {'time ratio':>10}")
    # per tail: loss ratios, measured time ratios, bounds ('never' pairs), worst (ratio, pair)
    by_tail = {t: ([], [], [], [(0.0, "")]) for t in tails}
    skipped = []
    warm = set()
    for size in args.sizes:
        for content_path, style_path in pairs(args.set):
            if args.only and f"{content_path.stem}:{style_path.stem}" not in args.only:
                continue
            content = Image.open(content_path).convert("RGB")
            style = Image.open(style_path).convert("RGB")
            default = StyleParams(**common, image_size=size, **overrides)
            single = StyleParams(**common, image_size=size, scales=1, precision="fp32")
            if same_computation(default, single):
                skipped.append(f"{content_path.stem} x {style_path.stem} @ {size}")
                continue
            # build each extractor and touch each kernel once per shape: warmed per size alone, a later
            # content of another shape paid its first calls on the side that runs first, the default
            for p in (default, single):
                key = (p.precision, p.scales, size, content.size)
                if key not in warm:
                    stylize(content, style, p.model_copy(update={"iterations": 3}))
                    warm.add(key)
            defaults = {}
            for tail in tails:
                optimize.EXACT_TAIL = tail
                defaults[tail] = run(content, style, default)[:2]
            s_loss, s_wall, trajectory = run(content, style, single)
            for tail, (d_loss, d_wall) in defaults.items():
                loss_ratios, time_ratios, time_bounds, worst = by_tail[tail]
                reached = next((t for t, best in trajectory if best <= d_loss), None)
                ratio = d_loss / s_loss
                # never reached: known above the default's loss up to its last evaluation, not its return
                t_ratio = d_wall / (reached if reached is not None else (trajectory[-1][0] if trajectory else s_wall))
                loss_ratios.append(ratio)
                (time_ratios if reached is not None else time_bounds).append(t_ratio)
                worst[0] = max(worst[0], (ratio, f"{content_path.stem} x {style_path.stem} @ {size}"))
                print(f"{content_path.stem + ' x ' + style_path.stem:<24} {size:>4} {tail:>5.3g} {d_wall:>9.1f} "
                      f"{d_loss:>9.4g} {s_wall:>9.1f} {s_loss:>9.4g} {ratio:>10.3f} "
                      f"{(f'{reached:.1f}' if reached is not None else 'never'):>10} "
                      f"{(f'{t_ratio:.3f}' if reached is not None else f'<{t_ratio:.3f}'):>10}", flush=True)
    if skipped:
        print(f"# not run, {len(skipped)} pair-sizes: the default resolves to single-scale fp32 there (precision "
              f"'auto' is fp32 under {REDUCED_MIN_SIZE} px and where bf16 is not native), the reference's own "
              f"computation: {', '.join(skipped)}")
    for tail, (loss_ratios, time_ratios, time_bounds, worst) in by_tail.items():
        if not loss_ratios:
            return
        # A 'never' pair's ratio is an upper bound, so a mean over it is one too: printed as such, and
        # the mean of the measured pairs beside it.
        every = geomean(time_ratios + time_bounds)
        times = (f"< {every:.3f} over all {len(time_ratios) + len(time_bounds)} (bounds for the {len(time_bounds)} "
                 f"'never' pairs), {geomean(time_ratios):.3f} over the {len(time_ratios)} measured") if time_bounds \
            else f"{every:.3f}"
        print(f"geometric mean, exact tail {tail:.3g}: loss ratio {geomean(loss_ratios):.3f} (worst {worst[0][0]:.3f}: "
              f"{worst[0][1]}; goal <= 1.02 on every pair), time ratio {times} (goal <= 0.5)")


if __name__ == "__main__":
    main()
