"""Precision, memory format and torch's process-wide backend switches.

torch keeps TF32, cuDNN and determinism switches per process, while the batch tasks run one
pair per device in a thread per device. So every run enters ``run_settings`` (reference
counted: the process's own switches come back when the last run exits), and every stretch of
GPU work enters ``precision_section`` with the TF32 mode it needs. Sections of one mode run
together; a section of the other mode waits until they drain and then flips the switches, so
an exact-fp32 measurement on one GPU never runs with another GPU's TF32, and a TF32 pass never
runs with TF32 switched off under it. Work is launched from the host inside the section, which
is where cuBLAS and cuDNN read the switches.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from .errors import NSTError

T = TypeVar("T")

__all__ = ["DTYPES", "REDUCED_MIN_SIZE", "OUT_OF_MEMORY", "cuda_capability", "out_of_memory", "unless_out_of_memory",
           "resolve_precision", "memory_format", "run_settings", "precision_section", "exact_fp32", "uses_tf32"]

#: Autocast dtype of the VGG pass per precision (None: no autocast, fp32 storage).
DTYPES = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: First CUDA compute capability with native bf16 and TF32 tensor cores (Ampere, sm_80).
_AMPERE = (8, 0)


@functools.cache
def _cpu_flags() -> str:
    """/proc/cpuinfo's text (x86 flag names; "" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def _cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16: bf16 convolutions run natively (oneDNN), not emulated."""
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cpu_has_fp16() -> bool:
    """AVX512-FP16 or AMX-FP16: fp16 arithmetic in hardware, not emulated."""
    flags = _cpu_flags()
    return "avx512_fp16" in flags or "amx_fp16" in flags


def _warn_if_emulated(requested: str, device: torch.device) -> None:
    """A reduced precision asked for on a CPU that only emulates it runs tens of times slower than
    fp32 (VGG16 forward+backward at 128x96 on a 2-core AVX2 EPYC: 0.24 s fp32, 10.9 s bf16, 13.2 s
    fp16): say so, since nothing else would tell a nightly run why it took a day."""
    native = {"bf16": _cpu_has_bf16, "fp16": _cpu_has_fp16}.get(requested)
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686")  # the flags read are x86's
    if device.type == "cpu" and x86 and native is not None and not native():
        # stacklevel 2 names resolve_precision, one place whatever called it: shown once a process
        warnings.warn(f"precision={requested!r} on a CPU without native {requested} (AVX512/AMX) is emulated, "
                      "tens of times slower than fp32; precision='auto' picks fp32 here", RuntimeWarning, stacklevel=2)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of this CUDA device (not of GPU 0 or the current one)."""
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


#: Below this output size (longest side, px) ``auto`` runs fp32: reduced precision saves little
#: there (a small pass is overhead-bound) and its rounding is as large as the loss differences
#: L-BFGS steers by (measured at 64 px: bf16 ended 8% above fp32 on chelsea × gravel at 40
#: evaluations, and a noise pair ended above its start). From 256 px the run gets an exact-fp32
#: tail (optimize.EXACT_TAIL), because bf16 alone still ended 2% above fp32 there (camera ×
#: brick, 30 evaluations) and 9% above on chelsea × brick at 300.
REDUCED_MIN_SIZE = 256


def resolve_precision(requested: str, device: torch.device, image_size: int | None = None) -> str:
    """The precision a run uses: fp32 | tf32 | bf16 | fp16.

    ``auto`` is fp32 for outputs under REDUCED_MIN_SIZE px (``image_size``); above, by device

    (CUDA by its compute capability, not ``is_bf16_supported()``, which counts emulated bf16 and
    says yes on a T4):

    ==============  ======  ==============  ======================
    device          auto    tf32            bf16
    ==============  ======  ==============  ======================
    CUDA sm_80+     bf16    tf32            bf16
    CUDA < sm_80    fp32    fp32 (recorded) NSTError
    CPU, bf16 ISA   bf16    fp32 (recorded) bf16
    other CPU, MPS  fp32    fp32 (recorded) bf16 (emulated, slow)
    ==============  ======  ==============  ======================

    fp16 is honoured where asked (CUDA tensor cores since sm_70). bf16/fp16 asked for on an x86 CPU
    without them in hardware warn (``_warn_if_emulated``).
    """
    ampere = device.type == "cuda" and cuda_capability(device) >= _AMPERE
    if requested == "tf32" and not ampere:
        return "fp32"  # TF32 is an Ampere tensor-core mode; elsewhere the run is plain fp32, recorded so
    if requested == "bf16" and device.type == "cuda" and not ampere:
        major, minor = cuda_capability(device)
        raise NSTError(f"precision='bf16' requested but {device} (compute capability {major}.{minor}) has no "
                       "native bf16 (it needs 8.0+); use auto, fp32 or fp16")
    if requested != "auto":
        _warn_if_emulated(requested, device)
        return requested
    if image_size is not None and image_size < REDUCED_MIN_SIZE:
        return "fp32"
    if device.type == "cuda":
        return "bf16" if ampere else "fp32"
    if device.type == "cpu" and _cpu_has_bf16():
        return "bf16"
    return "fp32"


def memory_format(device: torch.device, precision: str) -> torch.memory_format:
    """channels_last where it measured faster for the VGG pass (benchmarks/speed.py --formats).

    CUDA: tensor-core convolutions want NHWC. CPU (oneDNN, 2 cores, AVX-512+AMX): bf16 forward+
    backward at 384 px was faster in channels_last; fp32 was not (see README "Performance").
    """
    if device.type == "cuda" or (device.type == "cpu" and precision == "bf16"):
        return torch.channels_last
    return torch.contiguous_format


def uses_tf32(precision: str) -> bool:
    """Whether a run's working passes may use TF32: only precision="tf32". Under bf16/fp16 the VGG
    pass runs in reduced precision but the Grams and losses are fp32, and stay exact."""
    return precision == "tf32"


def _tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on


#: cuDNN autotuning (``cudnn.benchmark``) in runs on CUDA: each new input shape (scale × aspect
#: ratio × precision) first times the candidate kernels. Off: on an H200 (torch 2.11, cuDNN's
#: heuristics instead) six 512 px pairs of six aspect ratios, 100 evaluations each at the default
#: params, took 14.3 s with it off against 44.3 s on (``benchmarks/autotune.py``, 2026-12-04): the
#: timing of each new shape, twice under bf16 with its exact-fp32 tail, never paid back. Off also
#: keeps cuDNN's choice of kernels the same from run to run (a timing's noise can change it).
CUDNN_BENCHMARK = False


class _Backend:
    """The process's switches as one locked state: a count of runs and a two-mode section gate."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._runs = 0  # runs inside run_settings now, over all threads
        self._saved: tuple = ()  # the process's switches before the first of them entered
        self._mode: bool | None = None  # TF32 mode of the sections running now (None: not set by us)
        self._holders = 0  # sections running now, over all threads
        self._waiting = {True: 0, False: 0}
        self._idle: tuple | None = None  # switches before a section that started outside any run
        self._local = threading.local()  # this thread's open sections: (mode, depth)

    @contextlib.contextmanager
    def run(self, device: torch.device, precision: str, deterministic: bool) -> Iterator[dict]:
        cudnn = torch.backends.cudnn
        with self._cond:
            if self._runs == 0:
                # a section open outside any run changed the TF32 switches: the run restores them
                tf32_before, self._idle = self._idle or _tf32_flags(), None
                self._saved = (*tf32_before, cudnn.benchmark, cudnn.deterministic,
                               torch.are_deterministic_algorithms_enabled(),
                               torch.is_deterministic_algorithms_warn_only_enabled())
            self._runs += 1
            if device.type == "cuda":
                cudnn.benchmark = CUDNN_BENCHMARK and not deterministic
            if deterministic:
                # cuBLAS reads this when its handle is made; setdefault keeps a user's own choice.
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                cudnn.deterministic = True
                # warn_only: an op without a deterministic kernel warns instead of failing the pair.
                torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            tf32 = device.type == "cuda" and uses_tf32(precision)
            yield {
                "threads": torch.get_num_threads(),
                "deterministic": torch.are_deterministic_algorithms_enabled(),
                "cudnn_deterministic": cudnn.deterministic,
                "cudnn_benchmark": cudnn.benchmark,
                # what the run's working passes use (sections set it; measurements are exact fp32)
                "tf32_matmul": tf32,
                "tf32_cudnn": tf32,
                "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            }
        finally:
            with self._cond:
                self._runs -= 1
                if self._runs == 0:
                    # Wait for stray sections (none in practice: sections live inside runs).
                    while self._holders:
                        self._cond.wait()
                    saved = self._saved
                    torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32 = saved[:2]
                    cudnn.benchmark, cudnn.deterministic = saved[2:4]
                    torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])
                    self._mode = None

    @contextlib.contextmanager
    def section(self, tf32: bool) -> Iterator[None]:
        mine = getattr(self._local, "open", None)
        if mine is not None:  # nested on this thread: same mode only (a different one would deadlock)
            if mine[0] != tf32:
                raise RuntimeError("a TF32 section cannot nest an exact-fp32 one (or the reverse)")
            self._local.open = (tf32, mine[1] + 1)
            try:
                yield
            finally:
                self._local.open = (tf32, mine[1])
            return
        with self._cond:
            self._waiting[tf32] += 1
            # Wait while the other mode runs, or while this mode runs and the other waits (its turn).
            while self._holders and (self._mode != tf32 or self._waiting[not tf32]):
                self._cond.wait()
            self._waiting[tf32] -= 1
            if self._holders == 0 and self._runs == 0:
                self._idle = _tf32_flags()  # a section outside any run puts the switches back itself
            if self._mode != tf32 or _tf32_flags() != (tf32, tf32):
                _set_tf32(tf32)
                self._mode = tf32
            self._holders += 1
        self._local.open = (tf32, 1)
        try:
            yield
        finally:
            self._local.open = None
            with self._cond:
                self._holders -= 1
                if self._holders == 0:
                    if self._runs == 0 and self._idle is not None:
                        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._idle
                        self._idle, self._mode = None, None
                    self._cond.notify_all()


_BACKEND = _Backend()


def out_of_memory(err: BaseException, device: torch.device) -> bool:
    """Whether ``err`` is the device running out of memory: torch.OutOfMemoryError (the caching
    allocator's), or a plain RuntimeError that says so: MPS's allocator (a TORCH_CHECK), and on
    CUDA an allocation inside a library (CUBLAS_STATUS_ALLOC_FAILED, cuDNN's) or the driver's own
    "CUDA error: out of memory"; on a CPU, the allocator's own refusal (a ulimit -v, strict overcommit)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    if device.type == "cpu":
        return isinstance(err, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in text
    return (device.type in ("cuda", "mps") and isinstance(err, RuntimeError)
            and ("out of memory" in text or "ALLOC_FAILED" in text))


#: What ``unless_out_of_memory`` returns when the device ran out of memory.
OUT_OF_MEMORY = object()


def unless_out_of_memory(work: Callable[[], T], device: torch.device) -> T | object:
    """``work()``, or OUT_OF_MEMORY when ``device`` ran out of memory in it, with what it held given
    back to the device: freed here, after the except block, once the traceback (and the tensors its
    frames hold) is gone. Any other error propagates."""
    try:
        return work()
    except Exception as err:
        if not out_of_memory(err, device):
            raise
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
    return OUT_OF_MEMORY


def run_settings(device: torch.device, precision: str, deterministic: bool):
    """Context for one run: cuDNN autotuning and determinism as asked; yields what is in effect.

    Reference counted over the process: overlapping runs (one per device) share the switches, and
    the process's own come back when the last run exits, in whatever order they exit.
    """
    return _BACKEND.run(device, precision, deterministic)


def precision_section(tf32: bool):
    """Context for GPU work that needs TF32 on (``tf32``) or exact fp32; see the module docstring."""
    return _BACKEND.section(tf32)


def exact_fp32():
    """Context for exact IEEE fp32 work (targets, reported losses): TF32 off, whatever other runs do."""
    return _BACKEND.section(False)
