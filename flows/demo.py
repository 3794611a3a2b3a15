"""`nst demo` / `make demo`: stylize_batch over the bundled examples into ./demo-output/.

Sized for a few minutes on a 2-core CPU; on a GPU it uses the full default settings. Before it
starts it times a short probe run and prints the estimate that measurement gives for this machine.
Without reachable pretrained weights it falls back to random weights, loudly, and records the
warning in every sidecar and the report. (The batch flow itself never falls back.)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tasks.models import BatchSource, OutputSpec, RunOptions
from nst_core.errors import WeightsError
from nst_core.params import StyleParams

__all__ = ["demo_inputs", "EXAMPLES"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RANDOM_WEIGHTS_WARNING = (
    "pretrained VGG16 weights are not available here, so this demo uses RANDOM weights: the images show "
    "the pipeline working, not real style transfer. See README 'VGG16 weights' to supply them."
)


def _images(kind: str) -> list[Path]:
    return sorted((EXAMPLES / kind).glob("*.png"))


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def timed_probe(params: StyleParams) -> tuple[int, float]:
    """(evaluations, seconds) of a short stylize of the first example pair with ``params``, on
    the device's compute thread, after one untimed warm-up evaluation (allocator, kernels).

    The demo's estimate scales this by the real number of evaluations and pairs, so the duration
    it states is measured on this machine, not assumed.
    """
    from PIL import Image

    from nst_core.optimize import stylize
    from tasks.compute import expand_devices, run_on_device

    device = expand_devices(["auto"], params.device)[0]
    content, style = Image.open(_images("contents")[0]), Image.open(_images("styles")[0])
    probe = max(2, min(params.iterations, params.iterations // 10))
    warm = params.model_copy(update={"iterations": 1, "device": device})
    timed = params.model_copy(update={"iterations": probe, "device": device})

    def run() -> float:
        stylize(content, style, warm)
        start = time.perf_counter()
        stylize(content, style, timed)
        return time.perf_counter() - start

    return probe, run_on_device(device, run)


def demo_inputs(output: str) -> tuple[BatchSource, OutputSpec, StyleParams, RunOptions]:
    import torch

    from nst_core.optimize import extractor_for
    from tasks.compute import expand_devices, run_on_device

    on_gpu = torch.cuda.is_available()
    # CPU: 4 pairs x 80 evaluations at 192 px fit in ~3 minutes on 2 cores; GPU: the defaults.
    params = StyleParams() if on_gpu else StyleParams(image_size=192, iterations=80)
    labels = {"demo": "true"}
    try:
        # on the device's compute thread, where the flow will use it (see run_on_device)
        run_on_device(expand_devices(["auto"], params.device)[0], lambda: extractor_for(params))
    except WeightsError as err:
        print(f"\n*** WARNING: {RANDOM_WEIGHTS_WARNING}\n*** ({err})\n", file=sys.stderr)
        params = params.model_copy(update={"weights": "random"})
        labels["warning"] = RANDOM_WEIGHTS_WARNING
    size = "full settings (GPU)" if on_gpu else "CPU settings"
    print(f"demo: {size}: image_size={params.image_size}, iterations={params.iterations}, "
          f"weights={params.weights}; writing to {output}/", file=sys.stderr)
    pairs = len(_images("contents")) * len(_images("styles"))
    probe, seconds = timed_probe(params)
    estimate = pairs * seconds * params.iterations / probe
    print(f"demo: a timed {probe}-evaluation probe took {seconds:.1f} s here, so {pairs} pairs x "
          f"{params.iterations} evaluations should take about {_minutes(estimate)} (plus Prefect's start-up)",
          file=sys.stderr)
    return (
        BatchSource(contents=str(EXAMPLES / "contents"), styles=str(EXAMPLES / "styles")),
        OutputSpec(uri=output, format="jpeg"),
        params,
        RunOptions(labels=labels),
    )
