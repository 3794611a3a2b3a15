"""`nst demo` / `make demo`: stylize_batch over the bundled examples into ./demo-output/.

Sized so a 2-core CPU finishes in about 3 minutes; on a GPU it uses the full default settings.
Without reachable pretrained weights it falls back to random weights, loudly, and records the
warning in every sidecar and the report. (The batch flow itself never falls back.)
"""

from __future__ import annotations

import sys
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
    return (
        BatchSource(contents=str(EXAMPLES / "contents"), styles=str(EXAMPLES / "styles")),
        OutputSpec(uri=output, format="jpeg"),
        params,
        RunOptions(labels=labels),
    )
