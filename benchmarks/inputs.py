"""Large inputs: memory and decodes of a run whose pairs share one large style.

A run of 8 small contents (64×48 px) × one style, ``image_size`` 32, 3 evaluations, random
weights, window 16, local folders, Prefect's temporary local API: once with a small style (48×64)
and once with an 8000×8000 px PNG (a 64 MP painting scan; a small file: its rows repeat). Each
run is a child process of its own; printed per run: wall time of the flow call, how many times the
style was decoded, and the peak RSS the run added (the child's VmHWM at the end minus after its
imports). Goal: a large style costs about one decoded copy, not one per pair in flight.

    python benchmarks/inputs.py [--side 8000] [--contents 8]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def vm_hwm_mb() -> float:
    """This process's peak resident memory (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def big_png(path: Path, side: int) -> None:
    """An RGB PNG of side×side px whose rows repeat (written without holding the image)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + (bytes(range(256)) * (side * 3 // 256 + 1))[:side * 3]
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def child(folder: Path) -> None:
    """One run over folder/contents × folder/styles; prints a JSON line of its figures."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    import nst_core.imageio as imageio
    from flows.batch import stylize_batch
    from nst_core import StyleParams
    from tasks.models import BatchSource, OutputSpec, RunOptions

    decodes = []
    real = imageio.decode_image
    imageio.decode_image = lambda data, name, **k: decodes.append(name) or real(data, name, **k)
    params = StyleParams(weights="random", image_size=32, iterations=3, device="cpu", scales=1)
    after_imports = vm_hwm_mb()
    t0 = time.perf_counter()
    state = stylize_batch(BatchSource(contents=str(folder / "contents"), styles=str(folder / "styles")),
                          OutputSpec(uri=str(folder / "out"), format="png"), params, RunOptions(window=16),
                          return_state=True)
    print(json.dumps({"ok": state.is_completed(), "message": state.message, "seconds": time.perf_counter() - t0,
                      "style_decodes": sum("/styles/" in n for n in decodes),
                      "added_mb": vm_hwm_mb() - after_imports}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=8000)
    ap.add_argument("--contents", type=int, default=8)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import pattern

    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, side in (("small", 0), ("large", args.side)):
            folder = Path(tmp) / name
            (folder / "contents").mkdir(parents=True)
            (folder / "styles").mkdir()
            for i in range(args.contents):
                pattern((64, 48), "content", i).save(folder / "contents" / f"c{i}.png")
            if side:
                big_png(folder / "styles" / "style.png", side)
            else:
                pattern((48, 64), "style").save(folder / "styles" / "style.png")
            env = {**os.environ, "PREFECT_HOME": str(folder / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
            out = subprocess.run([sys.executable, __file__, "--child", str(folder)], env=env, capture_output=True,
                                 text=True, check=True).stdout
            figures[name] = json.loads(out.strip().splitlines()[-1])
            f = figures[name]
            label = f"{side}x{side}" if side else "48x64"
            print(f"{name} style ({label}): {f['message']}; {f['seconds']:.1f} s, style decoded {f['style_decodes']} "
                  f"times, peak RSS +{f['added_mb']:.0f} MB", flush=True)
    extra = figures["large"]["added_mb"] - figures["small"]["added_mb"]
    copy = args.side ** 2 * 4 / 2**20  # Pillow holds RGB in 4 bytes a pixel
    print(f"the large style added {extra:.0f} MB; one decoded copy is {copy:.0f} MB ({extra / copy:.2f} copies; "
          f"goal: about 1, not one per pair in flight)")


if __name__ == "__main__":
    main()
