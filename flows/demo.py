"""`nst demo` / `make demo`: stylize_batch over the bundled examples into ./demo-output/.

Sized for a few minutes on a 2-core CPU; on a GPU it uses the full default settings. Before it
starts it times a short probe run and prints the estimate that measurement gives for this machine.
Without reachable pretrained weights it falls back to random weights, loudly, and records the
warning in every sidecar and the report. (The batch flow itself never falls back.)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tasks.models import BatchSource, OutputSpec, RunOptions
from nst_core.errors import NSTError, WeightsError
from nst_core.params import StyleParams

__all__ = ["demo_inputs", "timed_probe", "Probe", "EXAMPLES"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RANDOM_WEIGHTS_WARNING = (
    "pretrained VGG16 weights are not available here, so this demo uses RANDOM weights: the images show "
    "the pipeline working, not real style transfer. See README 'VGG16 weights' to supply them."
)


def _images(kind: str) -> list[Path]:
    """The bundled sample images of ``kind``; NSTError where there are none (the examples/ folder
    of a source checkout: an installed wheel has no sample images)."""
    found = sorted((EXAMPLES / kind).glob("*.png"))
    if not found:
        raise NSTError(f"no sample images in {EXAMPLES / kind}: nst demo runs from a source checkout "
                       "(git clone, then make demo); elsewhere run nst batch on your own folders")
    return found


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


@dataclass(frozen=True)
class Probe:
    """What a short timed stylize of one example pair measured (seconds, this machine)."""

    evaluations: int  # loss evaluations the probe ran
    evaluating_s: float  # seconds those evaluations took
    targets_s: float  # style targets and content features: the flow does this once per style
    other_s: float  # the rest of one stylize (final fp32 loss, conversions): once per pair

    def estimate(self, pairs: int, styles: int, iterations: int) -> float:
        """Seconds for ``pairs`` pairs of ``iterations`` evaluations: only the evaluations scale with
        ``iterations`` (scaling the whole probe would multiply its fixed part too)."""
        per_evaluation = self.evaluating_s / max(self.evaluations, 1)
        return pairs * (self.other_s + per_evaluation * iterations) + styles * self.targets_s


def timed_probe(params: StyleParams) -> Probe:
    """A short stylize of the first example pair with ``params``, on the device's compute thread,
    after one untimed warm-up evaluation (allocator, kernels), split by the engine's own timings.

    The demo's estimate is built from these parts, so the duration it states is measured on
    this machine, not assumed.
    """
    from PIL import Image

    from nst_core.optimize import stylize
    from tasks.compute import expand_devices, run_on_device

    device = expand_devices(["auto"], params.device)[0]
    content, style = Image.open(_images("contents")[0]), Image.open(_images("styles")[0])
    # enough evaluations that the coarse-to-fine split rounds like the real run's
    probe = min(params.iterations, max(10, params.iterations // 10))
    warm = params.model_copy(update={"iterations": 1, "device": device})
    timed = params.model_copy(update={"iterations": probe, "device": device})

    def run() -> Probe:
        stylize(content, style, warm)
        result = stylize(content, style, timed)
        seconds = result.metadata["seconds"]
        evaluating = seconds["optimize"]
        return Probe(result.metadata["evaluations"], evaluating, seconds["targets"],
                     max(seconds["total"] - seconds["targets"] - evaluating, 0.0))

    return run_on_device(device, run)


def demo_inputs(output: str) -> tuple[BatchSource, OutputSpec, StyleParams, RunOptions]:
    import torch

    from nst_core.vgg import extractor_for
    from tasks.compute import expand_devices, run_on_device

    _images("contents"), _images("styles")  # before the weights: a wheel has no samples, and VGG16 is 528 MB
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
    styles = len(_images("styles"))
    pairs = len(_images("contents")) * styles
    probe = timed_probe(params)
    estimate = probe.estimate(pairs, styles, params.iterations)
    print(f"demo: a timed {probe.evaluations}-evaluation probe took {probe.evaluating_s:.1f} s here "
          f"(+{probe.targets_s:.1f} s style targets, once per style), so {pairs} pairs x {params.iterations} "
          f"evaluations should take about {_minutes(estimate)} (plus Prefect's start-up)", file=sys.stderr)
    return (
        BatchSource(contents=str(EXAMPLES / "contents"), styles=str(EXAMPLES / "styles")),
        OutputSpec(uri=output, format="jpeg"),
        params,
        RunOptions(labels=labels),
    )
