"""Per-process compute state for the batch tasks: device leases and the style-targets cache.

These are caches and locks, not models: the extractor itself is cached by nst_core.vgg.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from .lru import LRU

__all__ = ["expand_devices", "device_problem", "lease_device", "try_lease", "release_device", "run_on_device",
           "TargetsCache", "targets_cache", "io_slot", "decode_slot", "DECODE_SLOTS"]

T = TypeVar("T")


def expand_devices(devices: list[str], params_device: str) -> list[str]:
    """RunOptions.devices -> concrete device names. ['auto'] follows StyleParams.device."""
    import torch

    if devices != ["auto"]:
        return list(dict.fromkeys(devices))
    if params_device in ("auto", "cuda") and torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if params_device == "auto":
        return ["mps"] if torch.backends.mps.is_available() else ["cpu"]
    return [params_device]


def device_problem(devices: list[str]) -> str:
    """Why this machine cannot run on every one of ``devices`` ("" = it can), e.g. "device 'cuda:7'
    requested but only 1 CUDA device(s) exist"; two names of one device ("cuda" and "cuda:0") too."""
    from nst_core.errors import NSTError
    from nst_core.vgg import resolve_device

    seen: dict[object, str] = {}
    for name in devices:
        try:
            device = resolve_device(name)
        except NSTError as err:
            return str(err)
        if device in seen:
            return f"devices {seen[device]!r} and {name!r} are one device"
        seen[device] = name
    return ""


_leases: dict[tuple[str, ...], queue.Queue] = {}
_leases_lock = threading.Lock()


def _pool(devices: list[str] | tuple[str, ...]) -> queue.Queue:
    """The free devices of ``devices`` in this process (one queue per device set)."""
    key = tuple(devices)
    with _leases_lock:
        if key not in _leases:
            _leases[key] = queue.Queue()
            for d in devices:
                _leases[key].put(d)
        return _leases[key]


@contextmanager
def lease_device(devices: list[str]) -> Iterator[str]:
    """Hold one device of ``devices`` exclusively: one stylize step per device at a time in this process."""
    device = _pool(devices).get()
    try:
        yield device
    finally:
        release_device(devices, device)


def try_lease(devices: list[str] | tuple[str, ...]) -> str | None:
    """A free device of ``devices``, now held by the caller, or None (never waits): the device
    steps (``tasks.steps``) poll for a device while they also wait for their pair to be taken."""
    try:
        return _pool(devices).get_nowait()
    except queue.Empty:
        return None


def release_device(devices: list[str] | tuple[str, ...], device: str) -> None:
    """Give back a device leased with ``try_lease``."""
    _pool(devices).put(device)


_device_threads: dict[str, ThreadPoolExecutor] = {}


def run_on_device(device: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the one long-lived compute thread of ``device`` (with the caller's context).

    Why: with libgomp, once a second thread has run OpenMP regions, both thread teams fall back
    to sleeping between regions and CPU compute in task threads gets ~25% slower (measured with
    benchmarks/batch.py on 2 cores). Keeping all torch work of a device on one thread avoids it.
    """
    with _leases_lock:
        if device not in _device_threads:
            _device_threads[device] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"nst-{device}")
    ctx = contextvars.copy_context()  # Prefect's run context, so the task logger works there
    return _device_threads[device].submit(ctx.run, fn).result()


_io_slots: dict[int, threading.BoundedSemaphore] = {}

#: Images decoding at once in this process. A decode peaks at several times the image's pixels
#: (a 64 MP 16-bit PNG: ~0.7 GB) before it is sized down for the engine: with every pair of the
#: window (16) decoding at once that was ~9 GB. Two keep both cores of a small worker busy.
DECODE_SLOTS = 2
_decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)


@contextmanager
def decode_slot() -> Iterator[None]:
    """One of DECODE_SLOTS: hold it while an input decodes and is sized down."""
    with _decode_slots:
        yield


@contextmanager
def io_slot(workers: int) -> Iterator[None]:
    """At most ``workers`` concurrent downloads/uploads in this process."""
    with _leases_lock:
        sem = _io_slots.setdefault(workers, threading.BoundedSemaphore(workers))
    with sem:
        yield


class TargetsCache:
    """LRU of StyleTargets keyed by (style identity, device, targets key); bounded in entries.

    Cross pairings are planned style-major, so each style's Grams are computed once per device.
    """

    def __init__(self, max_entries: int = 32):
        self.max_entries = max_entries
        self._items: LRU[object] = LRU(max_entries)
        self._lock = threading.Lock()
        self.computed = 0  # how many times a target was built (tests and logs read it)

    def get_or_compute(self, key: tuple, compute: Callable[[], object]):
        value = self._items.get(key)
        if value is not None:
            return value
        value = compute()  # callers hold the device lease, so one device never computes a key twice at once
        with self._lock:
            self.computed += 1
        self._items.put(key, value)
        return value


targets_cache = TargetsCache()
