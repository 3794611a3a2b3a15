"""Engine tests on another device: NST_TEST_DEVICE=cuda (benchmarks/gpu.sh) runs their params() there.

A device that is asked for and missing is an error, never a quiet fall back to the CPU. The tests
below are CPU-specific as written (they rebuild a reference from CPU tensors, or assert what
only holds off CUDA); on another device they are skipped with the reason shown by ``-ra``. On the
CPU (the default) nothing here skips anything.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from helpers import engine_device

_CPU_REFERENCE = "re-measures the output with CPU tensors (_fp32_loss / a CPU reference) against the run's extractor"
CPU_ONLY = {
    "test_optimize.py": {
        "test_luminance_final_loss_is_that_of_the_output_images_own_y": _CPU_REFERENCE,
        "test_histogram_mode_optimizes_against_the_colour_matched_style": _CPU_REFERENCE,
        "test_the_best_iterate_is_returned_when_the_last_is_worse": _CPU_REFERENCE,
        "test_final_loss_is_fp32_at_the_output_size_whatever_the_precision": _CPU_REFERENCE,
        "test_style_targets_carry_one_set_of_grams_per_scale": _CPU_REFERENCE,
        "test_metadata_is_json_and_complete": 'asserts metadata["device"] == "cpu"',
        "test_tf32_off_cuda_is_plain_fp32_and_recorded_so": "tf32 off CUDA; on sm_80+ tf32 is a real precision",
        "test_out_of_memory_is_one_line_naming_the_pair_and_frees_what_it_held": 'asserts the message says "on cpu"',
    },
}


def pytest_configure(config):
    device = engine_device()
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError(f"NST_TEST_DEVICE={device} but torch sees no CUDA device "
                                    f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")


def pytest_report_header(config):
    device = engine_device()
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index or 0
        return (f"engine tests on {device}: {torch.cuda.get_device_name(index)}, "
                f"capability {'.'.join(map(str, torch.cuda.get_device_capability(index)))}")
    return f"engine tests on {device} (NST_TEST_DEVICE)"


def pytest_collection_modifyitems(config, items):
    if engine_device() == "cpu":
        return
    modules = {}
    for item in items:
        if item.path.parent != Path(__file__).parent or getattr(item, "module", None) is None:
            continue
        module = item.path.name
        modules.setdefault(module, item.module)
        reason = CPU_ONLY.get(module, {}).get(item.originalname)
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"{item.originalname} is CPU-specific, on {engine_device()}: {reason}"))
    for module, obj in modules.items():  # a renamed test would run (and fail) instead of skipping
        stale = sorted(name for name in CPU_ONLY.get(module, {}) if not hasattr(obj, name))
        if stale:
            warnings.warn(f"tests/nst_core/conftest.py: {module} has no {', '.join(stale)}", stacklevel=1)
