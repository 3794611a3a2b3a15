"""Engine speed: our time per loss evaluation over a bare forward+backward of the same VGG16.

Both run in this process, interleaved over several rounds, on the same truncated extractor
and a 256 px image, single scale in fp32 (scales=1, precision=fp32: per-evaluation cost, not the
coarse-to-fine speed-up, which benchmarks/speed.py measures); the medians are compared.
Goal: ratio <= 1.10 (the Grams are ~6% of the FLOPs).

Like with like: the bare pass runs under the backend settings stylize runs under (run_settings:
cuDNN autotuning as a run sets it; precision_section: TF32 only for precision=tf32), at the
precision stylize resolves (tf32 off CUDA is fp32), with its autocast dtype and memory format.
Outside a run, cuDNN convolves "fp32" in TF32 (torch's default) and autotunes nothing, so the
bare pass would measure other kernels than the ones stylize runs.

    python benchmarks/engine.py [--size 256] [--evals 20] [--rounds 3] [--device auto]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nst_core import StyleParams, compute_style_targets, stylize
from nst_core.backend import DTYPES as _DTYPES
from nst_core.backend import precision_section, resolve_precision, run_settings, uses_tf32
from nst_core.vgg import extractor_for

from helpers_bench import sample_pair


def bare_forward_backward(extractor, x: torch.Tensor, evals: int, dtype: torch.dtype | None = None) -> float:
    """Seconds per forward+backward of the truncated VGG16 alone (no losses, no optimizer)."""
    x = x.clone().requires_grad_(True)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(evals):
        x.grad = None
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = extractor.layers((x - extractor.mean) / extractor.std)
        out.float().sum().backward()
    sync()
    return (time.perf_counter() - t) / evals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--evals", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16", "fp16"])
    args = ap.parse_args()

    params = StyleParams(weights=args.weights, image_size=args.size, iterations=args.evals, device=args.device,
                         scales=1, precision=args.precision)
    content, style = sample_pair(args.size)
    extractor = extractor_for(params)
    targets = compute_style_targets(style, params)
    stylize(content, style, params.model_copy(update={"iterations": 2}), targets=targets)  # warm-up
    from nst_core.imageio import resize_longest, to_tensor as _to_tensor

    device = extractor.device
    precision = resolve_precision(args.precision, device)  # what stylize runs at (tf32 off CUDA: fp32)
    x = _to_tensor(resize_longest(content, args.size), device).contiguous(memory_format=extractor.memory_format)

    def bare_pass(evals: int) -> tuple[float, dict]:
        with run_settings(device, precision, params.deterministic) as settings, \
                precision_section(uses_tf32(precision)):
            return bare_forward_backward(extractor, x, evals, _DTYPES[precision]), {
                "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "tf32": (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32),
                "deterministic": settings["deterministic"]}

    bare_pass(2)  # warm-up, as stylize had
    ours, bare = [], []
    for _ in range(args.rounds):
        result = stylize(content, style, params, targets=targets)
        ours.append(result.metadata["seconds"]["optimize"] / result.metadata["evaluations"])
        seconds, seen = bare_pass(args.evals)
        bare.append(seconds)
    o, b = statistics.median(ours), statistics.median(bare)
    meta = result.metadata
    print(f"device {device}, {x.shape[-1]}x{x.shape[-2]} px, {args.evals} evaluations x {args.rounds} rounds, "
          f"torch threads {torch.get_num_threads()}")
    print(f"both at precision {precision} ({meta['precision']} in stylize), {meta['memory_format']}, "
          f"cudnn.benchmark {seen['cudnn_benchmark']}, TF32 matmul/cudnn {seen['tf32']} in the bare pass")
    print(f"stylize per loss evaluation : {o * 1000:8.1f} ms")
    print(f"bare VGG16 forward+backward : {b * 1000:8.1f} ms  (truncated at {len(extractor.layers)} layers)")
    print(f"ratio                       : {o / b:8.3f}  (goal <= 1.10)")


if __name__ == "__main__":
    main()
