"""Device steps: pairs waiting for a device, grouped and run N at a time (``RunOptions.pairs_per_step``).

Not a Prefect task: the queue between the pair tasks and the devices. Each pair keeps its one
task (fetch, decode, write: ``tasks.pair``); where it would lease a device and stylize alone, it
hands a ``StepRequest`` to ``DeviceSteps.run`` and waits. When a device is free, the oldest
waiting request leads a step: it takes up to N waiting requests of its own group (one run, one
output shape: no padding, which would change the Grams), waits up to ``GATHER_S`` for pairs of
its run still being fetched, and calls its ``step`` once for all of them on that device (one
``stylize_many``). Each request gets its own result or exception back, and its task writes it
or fails with it, alone. One step per device at a time: the leases of ``tasks.compute``.

N for ``pairs_per_step="auto"`` (``StepSizer``), with H·W the output's pixels::

    N = clamp(⌊HEADROOM · usable / (c · H · W)⌋, 1, MAX_AUTO)   on CUDA
    N = 1                                                      on CPU and MPS

usable = the device's free memory + what this process's allocator holds unused; c = bytes per
output pixel per pair, the largest peak allocated during a step on that device over its B·H·W
(measured on every step; the first step, unmeasured, runs one pair). On CPU batching does not
pay: a batch of B costs about B single passes there (``benchmarks/throughput.py``, README
"Several pairs per device step"); MPS is unmeasured, so it stays at one pair.

Imports neither prefect nor torch at import (``benchmarks/throughput.py`` runs bare).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .compute import release_device, try_lease

__all__ = ["StepRequest", "DeviceSteps", "StepSizer", "device_steps", "GATHER_S", "HEADROOM", "MAX_AUTO"]

#: Longest a step holds its device waiting for pairs of its run that are still being fetched
#: before it starts with fewer than N: on a GPU a step of one pair takes about as long as a full
#: one. It ends sooner when every pair in flight has arrived or failed.
GATHER_S = 2.0
#: How often a waiting pair looks at Ctrl-C and the storage's health.
POLL_S = 0.25
#: auto's largest step: benchmarks/gpu.sh measures up to 32 pairs per step; beyond is unmeasured.
MAX_AUTO = 32
#: Share of the usable device memory auto plans to fill; the rest absorbs fragmentation, cuDNN
#: workspaces and a step whose content is larger than the measured one's.
HEADROOM = 0.7


@dataclass(eq=False)
class StepRequest:
    """One pair waiting for a device step.

    ``owner`` and ``shape`` (the output's (width, height)) say which pairs may share a step;
    ``limit`` is N or "auto"; ``step(device, requests)`` is the step itself, one result or
    exception per request in order; ``check()`` raises when the pair must stop waiting (Ctrl-C, a
    storage outage); ``payload`` is whatever ``step`` needs, opaque here.
    """

    owner: object
    shape: tuple[int, int]
    limit: int | str
    step: Callable[[str, list[StepRequest]], list]
    check: Callable[[], None] = lambda: None
    payload: object = None
    arrived: float = field(default_factory=time.perf_counter)
    started: float = 0.0  # when its step began on a device
    device: str = ""
    outcome: object = None  # its result, or the exception it fails with
    taken: bool = False
    done: bool = False

    @property
    def group(self) -> tuple:
        return (self.owner, self.shape)

    @property
    def pixels(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def waited(self) -> float:
        """Seconds from arriving to its step's start."""
        return max(0.0, self.started - self.arrived)


class StepSizer:
    """N for ``pairs_per_step="auto"`` on a device: its free memory over a measured per-pair cost."""

    def __init__(self):
        self.bytes_per_pixel: dict[str, float] = {}  # by device: the largest measured

    def pairs(self, device: str, pixels: int) -> int:
        if not device.startswith("cuda"):
            return 1  # CPU: measured not to pay; MPS: not measured
        cost = self.bytes_per_pixel.get(device)
        if not cost:
            return 1  # this step measures
        import torch

        dev = torch.device(device)
        free, _ = torch.cuda.mem_get_info(dev)
        usable = free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return max(1, min(MAX_AUTO, int(HEADROOM * usable / (cost * pixels))))

    @contextmanager
    def measure(self, device: str, pixels: int) -> Iterator[dict]:
        """Record the bytes per pixel of the step run inside; ``pixels`` = B·H·W. CUDA only. The
        block sets the dict's "counts" False when no pair of the step got far enough to say what a
        pair costs (every one refused: a style too thin, a bad image), as does a step that
        allocated nothing: a cost of 0 made every later auto step divide by it."""
        counts = {"counts": True}
        if not device.startswith("cuda"):
            yield counts
            return
        import torch

        dev = torch.device(device)
        # Before CUDA's first use (a chunk run's first step on a fresh worker) the peak reset raises
        # "Invalid device argument": the allocator knows no device until CUDA is initialised.
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        yield counts
        cost = (torch.cuda.max_memory_allocated(dev) - base) / max(1, pixels)
        if counts["counts"] and cost > 0:
            self.bytes_per_pixel[device] = max(cost, self.bytes_per_pixel.get(device, 0.0))


class DeviceSteps:
    """The waiting requests of one device set, in arrival order; the oldest leads the next step."""

    def __init__(self, devices: list[str] | tuple[str, ...]):
        self.devices = tuple(devices)
        self.sizer = StepSizer()
        self._cond = threading.Condition()
        self._waiting: list[StepRequest] = []
        self._coming: dict[object, set] = {}  # owner -> its pairs submitted and not here yet

    def announce(self, owner: object, pair: object) -> None:
        """``pair`` of ``owner`` was submitted: a step of ``owner`` may wait for it (GATHER_S)."""
        with self._cond:
            self._coming.setdefault(owner, set()).add(pair)

    def settle(self, owner: object, pair: object) -> None:
        """``pair`` arrived, or ended before it could (a bad input, a failed fetch): wait no more for it."""
        with self._cond:
            coming = self._coming.get(owner)
            if coming is not None:
                coming.discard(pair)
                if not coming:
                    del self._coming[owner]
            self._cond.notify_all()

    def run(self, req: StepRequest, pair: object = None) -> StepRequest:
        """Queue ``req`` (``pair``: its announced name), lead or join a step, and return ``req``
        once its step is over, with ``outcome`` set. Raises what ``req.check`` raises while it waits."""
        with self._cond:
            self._waiting.append(req)
            self.settle(req.owner, pair)
            try:
                lead = self._wait_turn(req)
            except BaseException:
                if req in self._waiting:
                    self._waiting.remove(req)
                self._cond.notify_all()
                raise
        if lead is not None:
            self._step(*lead)
        with self._cond:
            while not req.done:  # taken: its step checks Ctrl-C and deadlines at each evaluation
                self._cond.wait(POLL_S)
        return req

    def _wait_turn(self, req: StepRequest) -> tuple[str, list[StepRequest]] | None:
        """(device, requests) when ``req`` leads a step, None when another step took it. Under the lock."""
        while not req.taken:
            req.check()
            if self._waiting and self._waiting[0] is req:
                device = try_lease(self.devices)
                if device is not None:
                    try:
                        return device, self._gather(req, device)
                    except BaseException:
                        release_device(self.devices, device)
                        raise
            self._cond.wait(POLL_S)
        return None

    def _gather(self, req: StepRequest, device: str) -> list[StepRequest]:
        """``req`` and up to N - 1 waiting requests of its group. Under the lock, holding ``device``."""
        self._waiting.remove(req)  # the next oldest may lead on another device meanwhile
        limit = self.sizer.pairs(device, req.pixels) if req.limit == "auto" else int(req.limit)
        deadline = time.monotonic() + GATHER_S
        while True:
            peers = [r for r in self._waiting if r.group == req.group][:limit - 1]
            left = deadline - time.monotonic()
            if len(peers) == limit - 1 or not self._coming.get(req.owner) or left <= 0:
                break
            req.check()
            self._cond.wait(min(left, POLL_S))
        for r in peers:
            self._waiting.remove(r)
        group = [req, *peers]
        for r in group:
            r.taken = True
        return group

    def _step(self, device: str, group: list[StepRequest]) -> None:
        """Run one step on the leased ``device``; every request of it ends done, with its outcome."""
        start = time.perf_counter()
        for r in group:
            r.started, r.device = start, device
        outcomes: list = [None] * len(group)
        try:
            with self.sizer.measure(device, len(group) * group[0].pixels) as measured:
                outcomes = list(group[0].step(device, group))
                measured["counts"] = not all(isinstance(o, BaseException) for o in outcomes)
        except BaseException as err:  # the step as a whole failed (changed weights, a bug): each pair says so
            outcomes = [err] * len(group)
            if not isinstance(err, Exception):
                raise
        finally:
            release_device(self.devices, device)
            with self._cond:
                for r, outcome in zip(group, outcomes):
                    r.outcome, r.done = outcome, True
                self._cond.notify_all()


_steps: dict[tuple[str, ...], DeviceSteps] = {}
_steps_lock = threading.Lock()


def device_steps(devices: list[str] | tuple[str, ...]) -> DeviceSteps:
    """The one DeviceSteps of this process for a device set (as ``lease_device`` has one pool)."""
    with _steps_lock:
        return _steps.setdefault(tuple(devices), DeviceSteps(devices))
