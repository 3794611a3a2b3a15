"""Tiled against untiled evaluation: gradient error per halo, fidelity, seams, memory, cost.

    python benchmarks/tiling.py halo     [--size 1024] [--tile 384] [--halos 0 16 32 48 64 80]
    python benchmarks/tiling.py fidelity [--size 1024] [--tile 384] [--evaluations 30]
    python benchmarks/tiling.py memory   [--sizes 2048 4096] [--evaluations 2] [--max-memory-gb 5]

halo: one evaluation at the content image (where a default run starts) per halo: the relative
error of the tiled gradient against the untiled one, ‖g_tiled − g‖/‖g‖, and the evaluation's
time over the untiled one's (the same process, side by side).
fidelity: ``--evaluations`` of the default run untiled and tiled at ``--tile`` px: the final
untiled fp32 loss of each written image (ratio goal <= 1.02), the seam metric
(``nst_core.tiling.seam_ratio``: |neighbour difference| across the borders of a 384 px grid over
elsewhere; tiled within 10% of untiled) and time per evaluation (goal tiled/untiled <= 1.5).
memory: peak RSS (and on CUDA peak allocated) of a run in a fresh child process per case:
untiled where its estimate fits this machine, tiled with ``--max-memory-gb`` (tile_size=auto).

Images: examples/photos chelsea (content) × gravel (style), resized; --weights random by default
(the pretrained weights cannot be downloaded on the project's machines).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nst_core import StyleParams, stylize  # noqa: E402
from nst_core.imageio import resize_longest, to_tensor  # noqa: E402
from nst_core.lbfgs import HISTORY  # noqa: E402
from nst_core.objective import Objective  # noqa: E402
from nst_core.params import layer_factor  # noqa: E402
from nst_core.targets import compute_style_targets  # noqa: E402
from nst_core.tiling import Tiling, exact_halo, seam_ratio, untiled_bytes  # noqa: E402
from nst_core.vgg import extractor_for  # noqa: E402

PHOTOS = Path(__file__).resolve().parent.parent / "examples" / "photos"


def images() -> tuple[Image.Image, Image.Image]:
    return (Image.open(PHOTOS / "contents" / "chelsea.png").convert("RGB"),
            Image.open(PHOTOS / "styles" / "gravel.png").convert("RGB"))


def base(args, **kw) -> StyleParams:
    return StyleParams(**{"weights": args.weights, "device": args.device, "image_size": args.size,
                          "precision": "fp32", **kw})


def halo(args) -> None:
    content, style = images()
    p = base(args, tile_size="off")
    extractor = extractor_for(p)
    c = to_tensor(resize_longest(content, args.size), extractor.device)
    grams = compute_style_targets(style, p, extractor=extractor).grams
    layers = [*p.content_layers, *p.style_layers]
    align = max(layer_factor(n) for n in layers)

    def evaluate(tiling):
        objective = Objective.build(extractor, p, c, [grams], tiling)
        x = c.clone().requires_grad_(True)
        objective.value_and_grad(x, None, 0)  # warm
        x.grad = None
        t0 = time.perf_counter()
        objective.value_and_grad(x, None, 1)
        return x.grad, time.perf_counter() - t0

    g0, t_untiled = evaluate(None)
    print(f"{args.size} px ({c.shape[-1]}x{c.shape[-2]}), tiles {args.tile} px, {p.weights} weights, fp32, "
          f"{torch.get_num_threads()} threads; untiled evaluation {t_untiled:.2f} s")
    print("halo px | gradient rel. error | time tiled/untiled")
    for h in args.halos:
        g, t = evaluate(Tiling(args.tile, h, align, exact_halo(layers)))
        print(f"{h:7d} | {float((g - g0).norm() / g0.norm()):19.2e} | {t / t_untiled:.2f}")


def _final_untiled_loss(result, content, style, args) -> float:
    """The written image's fp32 loss, untiled (1024 px fits here)."""
    p = base(args, tile_size="off")
    extractor = extractor_for(p)
    c = to_tensor(resize_longest(content, args.size), extractor.device)
    objective = Objective.build(extractor, p, c, [compute_style_targets(style, p, extractor=extractor).grams])
    return objective.measure(to_tensor(result.image, extractor.device))[0]["total"]


def fidelity(args) -> None:
    content, style = images()
    rows = {}
    for name, tile in (("untiled", "off"), ("tiled", args.tile)):
        p = base(args, iterations=args.evaluations, tile_size=tile)
        t0 = time.perf_counter()
        result = stylize(content, style, p)
        seconds = time.perf_counter() - t0
        rows[name] = (_final_untiled_loss(result, content, style, args),
                      seam_ratio(to_tensor(result.image, "cpu"), args.tile, 16),
                      result.metadata["seconds"]["optimize"] / result.metadata["evaluations"], seconds,
                      result.metadata["scales"][-1]["tiling"])
    (l0, s0, e0, w0, _), (l1, s1, e1, w1, how) = rows["untiled"], rows["tiled"]
    print(f"{args.size} px, {args.evaluations} evaluations, {args.weights} weights, fp32, chelsea x gravel, "
          f"{torch.get_num_threads()} threads; tiled: {how}")
    print(f"final untiled fp32 loss: untiled {l0:.5g}, tiled {l1:.5g}, ratio {l1 / l0:.4f} (goal <= 1.02)")
    print(f"seam metric on a {args.tile} px grid: untiled {s0:.3f}, tiled {s1:.3f}, "
          f"tiled/untiled {s1 / s0:.3f} (goal within 10%)")
    print(f"seconds per evaluation: untiled {e0:.2f}, tiled {e1:.2f}, ratio {e1 / e0:.2f} (goal <= 1.5); "
          f"wall {w0:.0f} s vs {w1:.0f} s")


def _child(args) -> None:
    """One memory case, in its own process: prints its peak RSS (and CUDA peak) as JSON."""
    content, style = images()
    p = base(args, iterations=args.evaluations, tile_size=args.case_tile, max_memory_gb=args.max_memory_gb)
    t0 = time.perf_counter()
    result = stylize(content, style, p)
    out = {"rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "seconds": round(time.perf_counter() - t0), "tiling": result.metadata["scales"][-1]["tiling"]}
    if torch.device(result.metadata["device"]).type == "cuda":
        out["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(out))


def memory(args) -> None:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    layers = [*StyleParams().content_layers, *StyleParams().style_layers]
    print(f"{args.evaluations} evaluations, {args.weights} weights, fp32, chelsea x gravel, device {args.device}, "
          f"RAM {total / 2**30:.0f} GiB; tiled: tile_size=auto, max_memory_gb={args.max_memory_gb}")
    print("size | untiled peak RSS | tiled peak RSS | tiling")
    for size in args.sizes:
        cells = []
        for tile in ("off", "auto"):
            height = size * 2 // 3
            # as tiling_for counts an untiled run: its activations and tensors, and its L-BFGS history
            estimate = untiled_bytes(height, size, layers) + 8 * HISTORY * 3 * height * size
            if tile == "off" and args.device == "cpu" and estimate > 0.8 * total:
                cells.append((f"not run (estimate {estimate / 2**30:.0f} GB with its L-BFGS history > RAM)", None))
                continue
            cmd = [sys.executable, __file__, "_child", "--size", str(size), "--evaluations", str(args.evaluations),
                   "--weights", args.weights, "--device", args.device, "--case-tile", tile,
                   "--max-memory-gb", str(args.max_memory_gb)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                cells.append((f"failed ({done.stderr.strip().splitlines()[-1][:80]})", None))
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            cuda = f", CUDA {r['cuda_peak_gb']:.2f} GB" if "cuda_peak_gb" in r else ""
            cells.append((f"{r['rss_gb']:.2f} GB{cuda} ({r['seconds']} s)", r["tiling"]))
        print(f"{size} | {cells[0][0]} | {cells[1][0]} | {cells[1][1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["halo", "fidelity", "memory", "_child"])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--tile", type=int, default=384)
    parser.add_argument("--halos", type=int, nargs="+", default=[0, 16, 32, 48, 64, 80])
    parser.add_argument("--evaluations", type=int, default=None)
    parser.add_argument("--max-memory-gb", type=float, default=5.0)
    parser.add_argument("--case-tile", default="auto")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.case_tile.isdigit():
        args.case_tile = int(args.case_tile)
    args.evaluations = args.evaluations or {"fidelity": 30}.get(args.mode, 2)
    {"halo": halo, "fidelity": fidelity, "memory": memory, "_child": _child}[args.mode](args)


if __name__ == "__main__":
    main()
