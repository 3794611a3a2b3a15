"""Device steps: waiting pairs grouped by run and shape, up to N per step, one step per device at a time."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks import steps
from tasks.steps import DeviceSteps, StepRequest, StepSizer

RUN = object()


def submit_all(board: DeviceSteps, specs, limit, step, owner=RUN, stagger=0.02):
    """Announce every pair, then let pair i arrive after i·stagger s with ``specs[i]`` = its shape.
    Returns {i: request} once every request's step is over."""
    for i in range(len(specs)):
        board.announce(owner, i)
    done: dict[int, StepRequest] = {}

    def pair(i, shape):
        time.sleep(i * stagger)
        req = StepRequest(owner, shape, limit, step, payload=i)
        done[i] = board.run(req, i)

    threads = [threading.Thread(target=pair, args=(i, shape)) for i, shape in enumerate(specs)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    return done


def recording_step(groups, seconds=0.1, fail=()):
    def step(device, requests):
        groups.append([r.payload for r in requests])
        time.sleep(seconds)
        return [ValueError(f"pair {r.payload} is bad") if r.payload in fail else f"image {r.payload}"
                for r in requests]
    return step


def test_pairs_of_one_shape_share_a_step_up_to_n_oldest_first():
    groups = []
    A, B = (40, 32), (32, 40)
    done = submit_all(DeviceSteps(["dev-steps-1"]), [A, A, B, A, A], 3, recording_step(groups))
    # pair 0 leads and waits for the pairs still on their way; B cannot join it; 4 goes next after B
    assert groups == [[0, 1, 3], [2], [4]]
    assert {i: r.outcome for i, r in done.items()} == {i: f"image {i}" for i in range(5)}
    assert all(r.device == "dev-steps-1" for r in done.values())
    assert done[4].waited >= 0.1  # it waited for the first step's device: its wait is recorded


def test_one_pair_per_step_is_the_old_behaviour():
    groups = []
    submit_all(DeviceSteps(["dev-steps-2"]), [(8, 8)] * 3, 1, recording_step(groups))
    assert sorted(map(tuple, groups)) == [(0,), (1,), (2,)]


def test_a_step_per_device_at_a_time_and_devices_side_by_side():
    inside, peak, lock = [0], [0], threading.Lock()

    def step(device, requests):
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        time.sleep(0.1)
        with lock:
            inside[0] -= 1
        return [None] * len(requests)

    submit_all(DeviceSteps(["dev-steps-3"]), [(8, 8)] * 4, 1, step, stagger=0)
    assert peak[0] == 1
    peak[0] = 0
    submit_all(DeviceSteps(["dev-steps-4a", "dev-steps-4b"]), [(8, 8)] * 4, 1, step, stagger=0)
    assert peak[0] == 2


def test_each_pair_gets_its_own_error_and_a_failed_step_reaches_all_of_its_pairs():
    groups = []
    done = submit_all(DeviceSteps(["dev-steps-5"]), [(8, 8)] * 3, 3, recording_step(groups, fail={1}))
    assert groups == [[0, 1, 2]]
    assert isinstance(done[1].outcome, ValueError) and "pair 1" in str(done[1].outcome)
    assert [done[i].outcome for i in (0, 2)] == ["image 0", "image 2"]

    def broken(device, requests):
        raise RuntimeError("weights changed")

    done = submit_all(DeviceSteps(["dev-steps-6"]), [(8, 8)] * 2, 2, broken)
    assert all(isinstance(r.outcome, RuntimeError) for r in done.values())


def test_a_step_waits_no_longer_than_gather_s_for_a_pair_that_does_not_come(monkeypatch):
    monkeypatch.setattr(steps, "GATHER_S", 0.3)
    board, groups = DeviceSteps(["dev-steps-7"]), []
    board.announce(RUN, "slow fetch")  # announced, never arrives
    t0 = time.perf_counter()
    board.run(StepRequest(RUN, (8, 8), 3, recording_step(groups, 0), payload=0), 0)
    assert groups == [[0]] and 0.3 <= time.perf_counter() - t0 < 2
    board.settle(RUN, "slow fetch")  # it failed: a later step waits for nothing
    t0 = time.perf_counter()
    board.run(StepRequest(RUN, (8, 8), 3, recording_step(groups, 0), payload=1), 1)
    assert time.perf_counter() - t0 < 0.2


def test_a_pair_stopped_while_it_waits_leaves_the_queue():
    board, release = DeviceSteps(["dev-steps-8"]), threading.Event()

    def step(device, requests):
        release.wait(10)
        return ["ok"] * len(requests)

    first = threading.Thread(target=board.run, args=(StepRequest(RUN, (8, 8), 1, step),))
    first.start()
    time.sleep(0.1)
    stop = threading.Event()

    def check():
        if stop.is_set():
            raise KeyboardInterrupt("stopped")  # what tasks.pair raises is an NSTError; any exception leaves

    waiting = StepRequest(RUN, (8, 8), 1, step, check=check)
    outcome = []
    second = threading.Thread(target=lambda: outcome.append(_raises(lambda: board.run(waiting))))
    second.start()
    time.sleep(0.1)
    stop.set()
    second.join(5)
    release.set()
    first.join(5)
    assert outcome and isinstance(outcome[0], KeyboardInterrupt) and not waiting.taken
    assert board._waiting == []


def _raises(fn):
    try:
        fn()
    except BaseException as err:  # noqa: BLE001 - the test looks at it
        return err
    return None


def test_auto_is_one_pair_off_cuda_and_fills_free_memory_on_cuda(monkeypatch):
    import torch

    sizer = StepSizer()
    assert sizer.pairs("cpu", 512 * 512) == 1 and sizer.pairs("mps", 512 * 512) == 1
    assert sizer.pairs("cuda:0", 512 * 512) == 1  # not measured yet: the first step measures
    sizer.bytes_per_pixel["cuda:0"] = 2000.0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (20 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: 2 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: 1 * 2**30)
    # ⌊0.7 · 21 GiB / (2000 B · 512²)⌋ = 30
    assert sizer.pairs("cuda:0", 512 * 512) == int(steps.HEADROOM * 21 * 2**30 / (2000 * 512 * 512)) == 30
    assert sizer.pairs("cuda:0", 128 * 128) == steps.MAX_AUTO
    assert sizer.pairs("cuda:0", 4096 * 4096) == 1


def test_measuring_initialises_cuda_first(monkeypatch):
    """torch's contract, modelled here (no GPU on this machine; the CUDA test below runs it for real):
    ``reset_peak_memory_stats`` raises "Invalid device argument" until CUDA is initialised (its
    allocator has no devices yet), where ``memory_allocated`` quietly says 0. A chunk run on a fresh
    GPU worker touches CUDA first inside its first step: the old ``measure`` raised there, failing
    every pair of the step, and of every later step (nothing ever initialised CUDA)."""
    import torch

    state = {"initialised": False}

    def reset(dev):
        if not state["initialised"]:
            raise RuntimeError("Invalid device argument : did you call init?")

    monkeypatch.setattr(torch.cuda, "init", lambda: state.update(initialised=True))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev: 4000)
    sizer = StepSizer()
    with sizer.measure("cuda:0", 1000):
        pass
    assert sizer.bytes_per_pixel["cuda:0"] == 4.0


def fake_cuda_memory(monkeypatch):
    """CUDA's memory calls, modelled (no GPU here): 20 GiB free, nothing allocated between steps;
    a step's peak is what it sets ``state["peak"]`` to."""
    import torch

    state = {"peak": 0}
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda dev: state.update(peak=0))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev: state["peak"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (20 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: 0)
    return state


def test_a_first_step_whose_pairs_were_all_refused_measures_nothing(monkeypatch):
    """A step whose one pair is refused before it allocates (a style too thin for the output size,
    a bad image; the weights already on the device from preflight) peaks at its start: the old
    sizer recorded a cost of 0 bytes per pixel, and every later auto step on that device divided by
    it: ZeroDivisionError for every pair after the first of a one-GPU run."""
    state = fake_cuda_memory(monkeypatch)
    board, sizes = DeviceSteps(["cuda:0"]), []

    def step(device, requests):
        sizes.append(len(requests))
        if requests[0].payload == 0:
            return [ValueError("style too thin")]  # refused before any tensor was made
        state["peak"] = 1000 * len(requests) * requests[0].pixels
        return [f"image {r.payload}" for r in requests]

    outcomes = {}
    for i in range(4):  # one after another: each its own step, as a slow decoder would feed them
        board.announce(RUN, i)
        outcomes[i] = board.run(StepRequest(RUN, (32, 32), "auto", step, payload=i), i).outcome
    assert isinstance(outcomes[0], ValueError)
    assert [outcomes[i] for i in (1, 2, 3)] == ["image 1", "image 2", "image 3"]
    assert board.sizer.bytes_per_pixel["cuda:0"] == 1000.0  # measured by the first step that ran a pair


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_auto_measures_a_steps_memory_on_cuda():
    """In a fresh process, as a chunk run on a new worker: CUDA not yet initialised."""
    code = ("import torch\nfrom tasks.steps import StepSizer\nassert not torch.cuda.is_initialized()\n"
            "sizer = StepSizer()\nwith sizer.measure('cuda:0', 1000):\n"
            "    x = torch.empty(1000 * 1000, dtype=torch.uint8, device='cuda:0')\n"
            "print(sizer.bytes_per_pixel['cuda:0'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split()[-1]) >= 1000
