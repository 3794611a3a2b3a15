"""Precision by device capability; torch's process-wide switches shared safely by per-device threads."""

import threading
import time

import pytest
import torch

from nst_core import NSTError
from nst_core import backend
from nst_core.backend import exact_fp32, precision_section, resolve_precision, run_settings

CUDA = torch.device("cuda", 0)


def _capability(monkeypatch, major, minor):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    # is_bf16_supported says yes on a T4 (emulation counts): it must not be what decides
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.mark.parametrize("capability,auto,tf32", [
    ((7, 0), "fp32", "fp32"),  # V100
    ((7, 5), "fp32", "fp32"),  # T4: bf16 is emulated there
    ((8, 0), "bf16", "tf32"),  # A100
    ((9, 0), "bf16", "tf32"),  # H100/H200
])
def test_precision_follows_the_devices_compute_capability(monkeypatch, capability, auto, tf32):
    _capability(monkeypatch, *capability)
    assert resolve_precision("auto", CUDA) == auto
    assert resolve_precision("tf32", CUDA) == tf32
    assert resolve_precision("fp16", CUDA) == "fp16" and resolve_precision("fp32", CUDA) == "fp32"
    if capability < (8, 0):
        with pytest.raises(NSTError, match=rf"capability {capability[0]}\.{capability[1]}\) has no native bf16"):
            resolve_precision("bf16", CUDA)
    else:
        assert resolve_precision("bf16", CUDA) == "bf16"


def test_capability_is_asked_of_the_runs_own_device(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or (8, 0))
    resolve_precision("auto", torch.device("cuda", 1))
    assert asked == [torch.device("cuda", 1)]


def test_cuda_is_one_device_whatever_it_is_called(monkeypatch):
    from nst_core.vgg import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("cuda") == resolve_device("cuda:0") == resolve_device("auto") == CUDA
    assert str(resolve_device("cuda")) == "cuda:0"
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def _flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_an_exact_section_waits_for_another_threads_tf32_work_and_sees_tf32_off():
    # Two GPUs in one process: one pair's exact-fp32 re-measure switched TF32 off (process-wide)
    # in the middle of another pair's TF32 evaluation, and switched it back on under its own
    # measurement when that pair's restore ran first.
    events, seen = [], {}
    tf32_inside, release = threading.Event(), threading.Event()
    cpu = torch.device("cpu")

    def tf32_pair():
        with run_settings(cpu, "tf32", False), precision_section(True):
            seen["tf32 start"] = _flags()
            events.append("tf32 in")
            tf32_inside.set()
            release.wait(5)
            seen["tf32 end"] = _flags()  # nobody switched it off under this evaluation
            events.append("tf32 out")

    def exact_pair():
        tf32_inside.wait(5)
        with run_settings(cpu, "fp32", False):
            with exact_fp32():
                events.append("exact in")
                seen["exact"] = _flags()

    a, b = threading.Thread(target=tf32_pair), threading.Thread(target=exact_pair)
    a.start()
    b.start()
    time.sleep(0.3)  # the exact section is waiting now (or would have run, on the old code)
    release.set()
    a.join(10)
    b.join(10)
    assert events == ["tf32 in", "tf32 out", "exact in"]
    assert seen == {"tf32 start": (True, True), "tf32 end": (True, True), "exact": (False, False)}


def test_sections_of_one_mode_overlap_and_a_waiting_mode_gets_its_turn():
    inside = threading.Barrier(2, timeout=5)

    def tf32_work():
        with precision_section(True):
            inside.wait()  # both TF32 sections are in at once: no serialisation of one mode

    threads = [threading.Thread(target=tf32_work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)


def test_sections_nest_only_in_their_own_mode():
    with exact_fp32(), exact_fp32():
        assert _flags() == (False, False)
    with precision_section(True), pytest.raises(RuntimeError, match="cannot nest"):
        with exact_fp32():
            pass


def test_a_section_outside_any_run_puts_the_switches_back():
    before = _flags()
    with exact_fp32():
        assert _flags() == (False, False)
    assert _flags() == before


def test_overlapping_runs_leave_the_process_settings_as_they_found_them():
    # Two devices' runs in one process exit out of order: a per-run restore left the first
    # run's deterministic mode on for the rest of the process.
    cpu = torch.device("cpu")
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, _flags())
    first, second = run_settings(cpu, "fp32", True), run_settings(cpu, "fp32", False)
    first.__enter__()
    with exact_fp32():
        pass
    second.__enter__()
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    after = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, _flags())
    assert after == before and before[:2] == (False, False)


def test_bf16_runs_keep_their_fp32_grams_exact():
    # The README says Grams and losses stay fp32; with TF32 on under bf16 they were not.
    assert not backend.uses_tf32("bf16") and not backend.uses_tf32("fp16") and not backend.uses_tf32("fp32")
    assert backend.uses_tf32("tf32")


def test_auto_is_fp32_for_small_outputs(monkeypatch):
    _capability(monkeypatch, 9, 0)
    assert resolve_precision("auto", CUDA, 255) == "fp32" and resolve_precision("auto", CUDA, 256) == "bf16"
    assert resolve_precision("bf16", CUDA, 64) == "bf16"  # asked for: honoured
    monkeypatch.setattr(backend, "_cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("cpu"), 64) == "fp32"
    assert resolve_precision("auto", torch.device("cpu"), 512) == "bf16"


@pytest.mark.parametrize("precision,flag", [("bf16", "avx512_bf16"), ("fp16", "amx_fp16")])
def test_a_reduced_precision_a_cpu_only_emulates_is_run_with_a_warning(monkeypatch, precision, flag):
    # emulated bf16 measured 45x fp32 on an AVX2 EPYC: a run asking for it must say why it is slow
    import warnings

    cpu = torch.device("cpu")
    _capability(monkeypatch, 9, 0)
    monkeypatch.setattr(backend.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(backend, "_cpu_flags", lambda: "fpu avx avx2 fma")
    with pytest.warns(RuntimeWarning, match=f"precision='{precision}' on a CPU without native {precision}"):
        assert resolve_precision(precision, cpu) == precision
    monkeypatch.setattr(backend.platform, "machine", lambda: "aarch64")  # x86 flag names say nothing there
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision(precision, cpu) == precision
    monkeypatch.setattr(backend.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(backend, "_cpu_flags", lambda: f"fpu avx avx2 fma {flag}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision(precision, cpu) == precision
        assert resolve_precision("fp32", cpu) == resolve_precision("auto", cpu, 64) == "fp32"
        assert resolve_precision(precision, CUDA) == precision  # a GPU's own matter (capability above)


def test_a_cuda_run_does_not_autotune_by_default():
    """Measured on an H200 (benchmarks/autotune.py): six aspect ratios at 512 px took 3.1x as long
    with autotuning as without, so a run leaves cuDNN's heuristics in charge."""
    with run_settings(torch.device("cuda"), "bf16", False) as settings:
        assert settings["cudnn_benchmark"] is False


@pytest.mark.parametrize("switch,deterministic,seen", [(True, False, True), (False, False, False),
                                                       (True, True, False)])
def test_cudnn_autotuning_follows_the_switch_and_determinism(monkeypatch, switch, deterministic, seen):
    """benchmarks/autotune.py flips CUDNN_BENCHMARK per side; a CUDA run sees it (no CUDA call is
    made, so a CUDA device object is enough here); the process's own setting comes back after."""
    monkeypatch.setattr(backend, "CUDNN_BENCHMARK", switch)
    before = torch.backends.cudnn.benchmark
    with run_settings(torch.device("cuda"), "fp32", deterministic) as settings:
        assert settings["cudnn_benchmark"] is seen
    assert torch.backends.cudnn.benchmark is before
