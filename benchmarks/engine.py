"""Engine cost per loss evaluation, in three layers measured side by side in one process:

- bare     : a forward+backward of the truncated VGG16 alone (no losses, no optimizer);
- + Grams  : the objective (``Objective.value_and_grad``: the same VGG pass, the style Grams, the
             style and content losses and their backward) on a fixed image;
- stylize  : one evaluation inside ``stylize`` (projection, objective, finiteness checks, best-image
             keeping, progress, the L-BFGS step with a full history), timed between its progress
             events; the rest of its optimize time (content features, setup, the first reads)
             is printed apart as "per run" (the exact fp32 measure of the result comes after
             the optimize time and is in neither).

A fourth layer, "formula", is the same objective written with the plain loss functions and
autograd: the Grams share it would have without ``losses.style_loss_through``.

Goals (issue 14): Grams share = (+ Grams) / bare − 1 <= 10%, overhead = stylize / (+ Grams) − 1
<= 3%. Single scale at --precision (fp32 by default), the bundled harbour × waves pair. Each
layer is timed in windows of GPU_READ_EVERY evaluations (a GPU run reads its losses that
often), the layers taking turns window by window; the fastest window of each is printed: on a shared machine other
tenants only ever add time, so the least disturbed window is the closest to the cost itself.

Like with like: the bare and Grams passes run under the backend settings stylize runs under
(run_settings: cuDNN autotuning as a run sets it; precision_section: TF32 only for
precision=tf32), at the precision stylize resolves, with its weights copy and memory format.

    python benchmarks/engine.py [--sizes 128 192 256 512] [--evals 24] [--rounds 3] [--device auto]
"""

from __future__ import annotations

import argparse
import time

import torch

from nst_core import StyleParams, compute_style_targets, stylize
from nst_core.backend import DTYPES, precision_section, resolve_precision, run_settings, uses_tf32
from nst_core.lbfgs import HISTORY
from nst_core.optimize import GPU_READ_EVERY
from nst_core.imageio import resize_longest, to_tensor
from nst_core.losses import content_loss, gram_matrix, style_loss, weighted_sum
from nst_core.objective import Objective
from nst_core.vgg import extractor_for

from helpers_bench import sample_pair


def _windows(device: torch.device, fns: dict, evals: int) -> dict[str, list[float]]:
    """Seconds per call of each ``fns[name]``, one value per window of GPU_READ_EVERY calls,
    synchronized; the functions take turns window by window, so a disturbance hits them alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, evals // GPU_READ_EVERY)):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            for _ in range(GPU_READ_EVERY):
                fn()
            sync()
            out[name].append((time.perf_counter() - t) / GPU_READ_EVERY)
    return out


def _formula(objective: Objective, x: torch.Tensor, dtype) -> None:
    """The objective written with the plain loss functions (gram_matrix, style_loss) and autograd:
    the reference for what ``style_loss_through`` saves (``Objective`` takes each style loss as the
    pass goes and adds its gradient in the same product)."""
    p = objective.params
    feats = objective._vgg(x, dtype)
    c = sum(content_loss(feats[n].float(), objective.content_feats[n], "none") for n in p.content_layers)
    s = weighted_sum({n: style_loss(gram_matrix(feats[n].float(), normalize=True), objective.style_grams[n], "none")
                      for n in p.style_layers}, p.layer_weights())
    (p.content_weight * c / len(p.content_layers) + p.style_weight * s).sum().backward()


def measure_size(size: int, args) -> dict:
    """Fastest-window seconds per evaluation of bare, grams and stylize, and stylize's per_run seconds."""
    params = StyleParams(weights=args.weights, image_size=size, iterations=HISTORY + GPU_READ_EVERY * (max(args.evals // GPU_READ_EVERY, 1) + 1),
                         device=args.device,
                         scales=1, precision=args.precision)
    content, style = sample_pair(size)
    extractor = extractor_for(params)
    device = extractor.device
    precision = resolve_precision(args.precision, device, size)  # what stylize runs at
    dtype = DTYPES[precision]
    targets = compute_style_targets(style, params)
    x0 = to_tensor(resize_longest(content, size), device).contiguous(memory_format=extractor.memory_format)
    objective = Objective.build(extractor, params, x0, [targets.grams])
    net = extractor if dtype is None else extractor.cast(dtype)
    x = x0.clone().requires_grad_(True)

    def bare() -> None:
        x.grad = None
        normalized = (x - extractor.mean) / extractor.std  # fp32, then cast as stylize's pass does
        net.layers(normalized if dtype is None else normalized.to(dtype)).float().sum().backward()

    def grams() -> None:
        x.grad = None
        objective.value_and_grad(x, dtype)

    def formula() -> None:
        x.grad = None
        _formula(objective, x, dtype)

    def run_stylize() -> tuple[list[float], float]:
        """Per-evaluation windows after the L-BFGS history filled, and the rest of the run's time."""
        stamps: list[float] = []
        result = stylize(content, style, params, targets=targets, progress=lambda e: stamps.append(time.perf_counter()))
        if len(stamps) != params.iterations:
            raise SystemExit(f"stylize stopped after {len(stamps)} of {params.iterations} evaluations")
        # On a GPU the events of w evaluations arrive together at each read; events i and i + w sit
        # at the same place of consecutive full reads (the run's last read may be partial: unused).
        w = GPU_READ_EVERY
        windows = [(stamps[k + w] - stamps[k]) / w for k in range(HISTORY, len(stamps) // w * w - w, w)]
        return windows, result.metadata["seconds"]["optimize"] - len(stamps) * min(windows)

    layers = {"bare": bare, "grams": grams, "formula": formula}
    seen: dict[str, list[float]] = {"bare": [], "grams": [], "formula": [], "stylize": [], "per_run": []}
    with run_settings(device, precision, params.deterministic), precision_section(uses_tf32(precision)):
        _windows(device, layers, GPU_READ_EVERY)  # warm-up: kernels, autotuning
    run_stylize()
    for _ in range(args.rounds):
        with run_settings(device, precision, params.deterministic), precision_section(uses_tf32(precision)):
            for name, times in _windows(device, layers, args.evals).items():
                seen[name] += times
        windows, per_run = run_stylize()
        seen["stylize"] += windows
        seen["per_run"].append(per_run)
    return {k: min(v) for k, v in seen.items()} | {
        "shape": tuple(x0.shape[-1:-3:-1]), "precision": precision, "device": str(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 192, 256, 512])
    ap.add_argument("--evals", type=int, default=24, help="evaluations timed per layer and round (stylize: after "
                    "its first HISTORY, which fill the L-BFGS history)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16", "fp16"])
    args = ap.parse_args()

    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, weights {args.weights}, "
          f"{args.evals} evaluations x {args.rounds} rounds, fastest windows of {GPU_READ_EVERY}")
    print(f"{'px':>9} {'prec':>5} {'bare ms':>8} {'+Grams ms':>9} {'stylize ms':>10} {'Grams share':>11} "
          f"{'overhead':>9} {'per run ms':>10} {'formula share':>13}")
    for size in args.sizes:
        m = measure_size(size, args)
        w, h = m["shape"]
        print(f"{f'{w}x{h}':>9} {m['precision']:>5} {m['bare'] * 1e3:>8.1f} {m['grams'] * 1e3:>9.1f} "
              f"{m['stylize'] * 1e3:>10.1f} {m['grams'] / m['bare'] - 1:>10.1%} {m['stylize'] / m['grams'] - 1:>9.1%} "
              f"{m['per_run'] * 1e3:>10.0f} {m['formula'] / m['bare'] - 1:>12.1%}", flush=True)
    print(f"device {m['device']}; goals: Grams share <= 10%, overhead <= 3%; formula share: the same objective "
          f"written with gram_matrix + style_loss and autograd (what style_loss_through saves)")


if __name__ == "__main__":
    main()
