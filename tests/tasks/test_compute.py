import contextvars
import threading
import time

from tasks.compute import TargetsCache, device_problem, expand_devices, lease_device, run_on_device


def test_expand_devices():
    assert expand_devices(["cuda:1", "cuda:1", "cpu"], "auto") == ["cuda:1", "cpu"]
    assert expand_devices(["auto"], "cpu") == ["cpu"]
    import torch

    if not torch.cuda.is_available():
        assert expand_devices(["auto"], "auto") in (["cpu"], ["mps"])


def test_device_problem_names_a_device_this_machine_lacks_and_two_names_of_one_device():
    """Old: neither was checked; a pair leased to a missing device failed with "Invalid device
    argument", and "cuda" beside "cuda:0" ran two pairs at once on one GPU."""
    import torch

    assert device_problem(["cpu"]) == ""
    assert device_problem(["cpu", "cpu"]) == "devices 'cpu' and 'cpu' are one device"
    if torch.cuda.device_count() < 8:
        assert device_problem(["cpu", "cuda:7"]).startswith("device 'cuda:7' requested but")
    if torch.cuda.is_available():
        assert device_problem(["cuda", f"cuda:{torch.cuda.current_device()}"]).endswith("are one device")


def peak_concurrency(devices: list[str], threads: int = 6) -> int:
    """How many threads held a lease of ``devices`` at the same time, at most."""
    inside, peak, lock = [], [0], threading.Lock()

    def work():
        with lease_device(devices) as device:
            with lock:
                inside.append(device)
                peak[0] = max(peak[0], len(inside))
            time.sleep(0.05)
            with lock:
                inside.remove(device)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    [t.start() for t in pool]
    [t.join() for t in pool]
    return peak[0]


def test_one_holder_per_device():
    assert peak_concurrency(["dev-a"]) == 1


def test_two_devices_run_side_by_side():
    assert peak_concurrency(["d0", "d1"]) == 2


def test_run_on_device_uses_one_thread_and_the_callers_context():
    var = contextvars.ContextVar("var", default="unset")
    var.set("caller")
    seen = [run_on_device("cpu-test", lambda: (threading.get_ident(), var.get())) for _ in range(3)]
    assert len({ident for ident, _ in seen}) == 1 and seen[0][0] != threading.get_ident()
    assert all(value == "caller" for _, value in seen)


def test_targets_cache_is_an_lru_that_computes_once():
    cache = TargetsCache(max_entries=2)
    calls = []
    for key in ["a", "a", "b", "a", "c", "b"]:
        cache.get_or_compute(key, lambda key=key: calls.append(key) or key.upper())
    assert calls == ["a", "b", "c", "b"]  # "b" was evicted by "c" (a was used more recently)
    assert cache.computed == 4
