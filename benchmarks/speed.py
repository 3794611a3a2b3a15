"""Speed to result: the default params against single-scale fp32 L-BFGS, side by side.

Both stylize the same content/style with the same weights at --size px. The baseline
(scales=1, precision=fp32, --evals evaluations) records its loss trajectory with timestamps
through the progress callback (for scales=1 in fp32 those losses are exact). Printed for each:
wall time and the fp32 loss at the output size of the returned image; then the time the
baseline needed to first reach the default's final loss, and the ratio default / that time
(goal <= 0.5). When the baseline never reaches the default's loss within --evals, the printed
ratio is only a bound, "< default / the whole baseline run", and it is the figure of one pair
(examples/ harbour x waves) with the weights given: a bound on one pair, not a measured ratio.

    python benchmarks/speed.py [--size 384] [--evals 300] [--weights random] [--device auto]
    python benchmarks/speed.py --formats     # channels_last vs contiguous, fp32 vs bf16, VGG fwd+bwd
    python benchmarks/speed.py --memory 1024 # peak RSS of a default run at 1024 px, in a subprocess:
                                             # the full default evaluations (StyleParams.iterations)
                                             # unless --evals N is given
    python benchmarks/speed.py --table --size 512 --evals 500 --device cuda
                                             # wall time per precision (fp32, tf32, bf16 single-scale) and default

With random weights the loss plateaus early (~100 evaluations at 256 px); real weights keep
improving for hundreds of evaluations, so the defaults are not tuned to that plateau.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers_bench import sample_pair  # noqa: E402

from nst_core import StyleParams, stylize  # noqa: E402
from nst_core.optimize import HISTORY  # noqa: E402


def timed(content, style, params: StyleParams, trajectory: list | None = None):
    """(result, wall seconds, seconds before the first evaluation)."""
    def progress(ev):
        trajectory.append((ev.elapsed, ev.loss))

    t = time.perf_counter()
    result = stylize(content, style, params, progress=progress if trajectory is not None else None)
    wall = time.perf_counter() - t
    return result, wall, result.metadata["seconds"]["total"] - result.metadata["seconds"]["optimize"]


def speed(args) -> None:
    content, style = sample_pair(args.size)
    common = {"weights": args.weights, "image_size": args.size, "device": args.device, "seed": args.seed}
    default = StyleParams(**common)
    baseline = StyleParams(**common, scales=1, precision="fp32", iterations=args.evals or 300)
    # warm-up: builds both extractors (layouts differ) and touches every kernel once
    for p in (default, baseline):
        stylize(content, style, p.model_copy(update={"iterations": 3}))

    res_d, wall_d, _ = timed(content, style, default)
    trajectory: list[tuple[float, float]] = []
    res_b, wall_b, setup_b = timed(content, style, baseline, trajectory)
    loss_d, loss_b = res_d.losses["final"]["total"], res_b.losses["final"]["total"]
    reach = next((setup_b + t for t, loss in trajectory if loss <= loss_d), None)
    first = next((i for i, (_, loss) in enumerate(trajectory, 1) if loss <= loss_d), None)

    print(f"one pair (examples/ harbour x waves), {args.size} px, weights {args.weights}, "
          f"device {res_d.metadata['device']}, torch threads {torch.get_num_threads()}")
    print(f"default     : {wall_d:7.1f} s  final fp32 loss {loss_d:.5g}  precision {res_d.metadata['precision']}, "
          f"{res_d.metadata['memory_format']}, scales "
          + ", ".join(f"{s['size'][0]}x{s['size'][1]}:{s['evaluations']}" for s in res_d.metadata["scales"]))
    print(f"single fp32 : {wall_b:7.1f} s  final fp32 loss {loss_b:.5g}  ({res_b.metadata['evaluations']} evaluations,"
          f" {(wall_b - setup_b) / res_b.metadata['evaluations'] * 1000:.0f} ms each)")
    if reach is None:
        print(f"single fp32 never reached {loss_d:.5g} in {res_b.metadata['evaluations']} evaluations; "
              f"ratio < {wall_d / wall_b:.3f}: a bound, not a measurement (default / the whole single-scale "
              f"run), on this one pair with {args.weights} weights")
    else:
        print(f"single fp32 first reached the default's final loss after {reach:.1f} s (evaluation {first})")
        print(f"ratio default / time-to-same-loss : {wall_d / reach:.3f}  (goal <= 0.5)")


def table(args) -> None:
    """Wall time of --evals evaluations at --size for each precision (single scale) and the default."""
    content, style = sample_pair(args.size)
    common = {"weights": args.weights, "image_size": args.size, "device": args.device, "seed": args.seed,
              "iterations": args.evals or 300}
    runs = {f"{p} single-scale": StyleParams(**common, scales=1, precision=p) for p in ("fp32", "tf32", "bf16")}
    runs["default"] = StyleParams(**common)
    for p in runs.values():  # warm-up (cuDNN autotuning, extractor per layout)
        stylize(content, style, p.model_copy(update={"iterations": 3}))
    print(f"{args.size} px x {common['iterations']} evaluations, weights {args.weights}")
    for name, p in runs.items():
        result, wall, _ = timed(content, style, p)
        print(f"  {name:>20}: {wall:7.2f} s  final fp32 loss {result.losses['final']['total']:.5g}  "
              f"({result.metadata['precision']}, {result.metadata['memory_format']}, "
              f"{result.metadata['evaluations']} evaluations)", flush=True)


def formats(args) -> None:
    """Median VGG16 fwd+bwd (through relu5_1) per layout and precision, interleaved over rounds."""
    from nst_core.vgg import load_extractor

    layers = ["relu4_2", "relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
    device = torch.device("cpu") if args.device == "auto" and not torch.cuda.is_available() else None
    kinds = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        ex = load_extractor("random", layers=layers, device=device or args.device, memory_format=fmt)
        for dtype in (None, torch.bfloat16):
            kinds[(str(fmt).split(".")[-1], "bf16" if dtype else "fp32")] = (ex, dtype)
    x = torch.rand(1, 3, args.size, args.size, device=next(iter(kinds.values()))[0].device)
    times: dict = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for k, (ex, dtype) in kinds.items():
            xi = x.clone().requires_grad_(True)
            t = time.perf_counter()
            for _ in range(3):
                with torch.autocast(ex.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    feats = ex(xi, layers)
                sum(f.float().sum() for f in feats.values()).backward()
            if ex.device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append((time.perf_counter() - t) / 3)
    base = statistics.median(times[("contiguous_format", "fp32")])
    print(f"VGG16 fwd+bwd to relu5_1 at {args.size} px, median of {args.rounds} rounds x 3:")
    for k, ts in times.items():
        m = statistics.median(ts)
        print(f"  {k[0]:>17} {k[1]}: {m * 1000:7.1f} ms  ({base / m:4.2f}x vs contiguous fp32)")


def memory(args) -> None:
    """Peak resident memory of one default run at args.memory px (a fresh subprocess).

    Runs the default's full evaluations (StyleParams.iterations) unless --evals is given: the
    L-BFGS history (HISTORY pairs of image-sized vectors) and the exact-fp32 tail are part of the
    peak only once they have run, so a short run under-reports it. The figure is the child's
    VmHWM (/proc/self/status), its own peak; ru_maxrss of a child also carries this process's
    peak across fork and exec, so it is only the fallback off Linux.
    """
    evals = args.evals or StyleParams.model_fields["iterations"].default
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "from helpers_bench import sample_pair\n"
        "from nst_core import StyleParams, stylize\n"
        f"c, s = sample_pair({args.memory})\n"
        f"r = stylize(c, s, StyleParams(weights={args.weights!r}, image_size={args.memory}, iterations={evals}, "
        f"device={args.device!r}))\n"
        "hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')] "
        "if sys.platform == 'linux' else []\n"
        "import json; print(json.dumps({'precision': r.metadata['precision'], 'scales': r.metadata['scales'], "
        "'evaluations': r.metadata['evaluations'], 'hwm_kib': hwm[0] if hwm else None}))\n"
    )
    here = Path(__file__).resolve().parent
    proc = subprocess.run([sys.executable, "-c", code, str(here), str(here.parent)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    peak_gb = (info["hwm_kib"] or resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 2**20  # KiB
    print(f"peak RSS at {args.memory} px, default params with iterations={evals} ({info['evaluations']} evaluations "
          f"ran; L-BFGS history {HISTORY} pairs), {info['precision']}, weights {args.weights}, scales "
          + ", ".join(f"{s['size'][0]}x{s['size'][1]}:{s['evaluations']}" for s in info["scales"])
          + f": {peak_gb:.2f} GB  (goal <= 4 GB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--evals", type=int, default=None,
                    help="baseline evaluations (default 300); with --memory, the run's (default: StyleParams')")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--formats", action="store_true", help="measure memory formats and precisions instead")
    ap.add_argument("--memory", type=int, metavar="PX", help="measure peak memory at PX instead")
    ap.add_argument("--table", action="store_true", help="wall time per precision and the default instead")
    args = ap.parse_args()
    if args.formats:
        formats(args)
    elif args.memory:
        memory(args)
    elif args.table:
        table(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
