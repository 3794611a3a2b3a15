"""Device operations per loss evaluation: bare VGG pass, + the objective, one evaluation of ``stylize``.

On a GPU each non-view ATen operation is (about) one kernel launch, and a small pass is bound by
how fast the host issues them, not by the GPU: on an H200 at 128 px the bare pass took 1.9 ms and
one ``stylize`` evaluation 6.4 ms (README "Performance", first GPU run). This counts the operations
that reach the dispatcher (a TorchDispatchMode, below autograd: the backward's are counted too),
so the count can be lowered and checked on a CPU. The layers are those of benchmarks/engine.py;
stylize's count per evaluation is the difference between a run of H + R + 3R and one of H + R
evaluations (H = the L-BFGS history, full in both before the difference starts; R =
GPU_READ_EVERY, so on CUDA, which reads its losses every R evaluations and a CPU every one, the
difference holds whole reads), fp32, single scale, harbour × waves. The reads' own operations are
in the count; the device-to-host waits they cause are not measured here.

    python benchmarks/launches.py [--size 64] [--device cpu] [--top 12]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nst_core import StyleParams, compute_style_targets, stylize  # noqa: E402
from nst_core.imageio import resize_longest, to_tensor  # noqa: E402
from nst_core.lbfgs import HISTORY  # noqa: E402
from nst_core.objective import Objective  # noqa: E402
from nst_core.optimize import GPU_READ_EVERY  # noqa: E402
from nst_core.vgg import extractor_for  # noqa: E402

from helpers_bench import sample_pair  # noqa: E402

#: Operations that launch no kernel: views, metadata, allocation, and the host-side 0-dim tensor
#: a Python number becomes (``torch.where(c, x, 0.0)``; passed to the kernel as an argument).
NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "as_strided", "slice", "select",
             "unsqueeze", "squeeze", "detach", "alias", "_reshape_alias", "reshape", "unbind", "split",
             "lift_fresh", "empty", "new_empty", "empty_strided", "_local_scalar_dense", "scalar_tensor"}


class _Count(TorchDispatchMode):
    """Counts each ATen operation by name as it reaches the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count(fn) -> collections.Counter:
    """{operation name: calls} of one call of ``fn``."""
    with _Count() as mode:
        fn()
    return mode.ops


def launches(ops: collections.Counter) -> float:
    """Calls of the operations that launch a kernel (all but NO_KERNEL)."""
    return sum(n for name, n in ops.items() if name not in NO_KERNEL)


def top(ops: collections.Counter, k: int) -> str:
    """The ``k`` most called kernel-launching operations, "name calls, ..."."""
    kept = sorted(((n, name) for name, n in ops.items() if name not in NO_KERNEL and n > 0.05), reverse=True)
    return ", ".join(f"{name} {n:g}" for n, name in kept[:k])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    short, extra = HISTORY + GPU_READ_EVERY, 3 * GPU_READ_EVERY
    params = StyleParams(weights="random", image_size=args.size, iterations=short, device=args.device,
                         scales=1, precision="fp32")
    content, style = sample_pair(args.size)
    extractor = extractor_for(params)
    targets = compute_style_targets(style, params)
    x0 = to_tensor(resize_longest(content, args.size), extractor.device).contiguous(
        memory_format=extractor.memory_format)
    objective = Objective.build(extractor, params, x0, [targets.grams])
    x = x0.clone().requires_grad_(True)

    def bare() -> None:
        x.grad = None
        extractor.layers((x - extractor.mean) / extractor.std).sum().backward()

    def grams() -> None:
        x.grad = None
        objective.value_and_grad(x, None)

    def run(evaluations: int):
        return lambda: stylize(content, style, params.model_copy(update={"iterations": evaluations}), targets=targets)

    bare(), grams(), run(2)()  # first calls build caches
    ops = {"bare": count(bare), "grams": count(grams)}
    more, fewer = count(run(short + extra)), count(run(short))
    ops["stylize"] = collections.Counter({k: (more[k] - fewer[k]) / extra for k in more | fewer})
    print(f"# {args.size} px, {extractor.device}, fp32, single scale, L-BFGS history {HISTORY}; "
          "kernel-launching operations per loss evaluation")
    print(f"bare VGG pass      {launches(ops['bare']):6.0f}")
    print(f"+ objective        {launches(ops['grams']):6.0f}   adds: {top(ops['grams'] - ops['bare'], args.top)}")
    print(f"stylize            {launches(ops['stylize']):6.1f}   adds: "
          f"{top(collections.Counter({k: v - ops['grams'][k] for k, v in ops['stylize'].items()}), args.top)}")


if __name__ == "__main__":
    main()
