"""The sliding window: never more than run.window pairs in flight, and whichever finishes first is collected."""

import logging
import threading

import pytest

from tasks import pipeline
from tasks.contract import PairPlan, ReportItem
from tasks.pair import PairDone
from tasks.storage import StorageHealth


def plan(i: int) -> PairPlan:
    return PairPlan(i, f"c{i}", "s", "cid", "sid", f"n{i}", f"n{i}.jpg", f"n{i}.json", "k")


class Ctx:
    storage = None
    claims = None

    def __init__(self):
        self.health = StorageHealth()

    def announce(self, p):
        pass

    def settle(self, p):
        pass


class FakeFuture:
    def __init__(self, value):
        self.value, self._callbacks, self._done = value, [], False

    def finish(self):
        self._done = True
        for fn in self._callbacks:
            fn(self)

    def add_done_callback(self, fn):
        if self._done:
            fn(self)
        else:
            self._callbacks.append(fn)

    @property
    def state(self):
        class Done:
            def is_completed(self):
                return True
        return Done()

    def result(self, raise_on_failure=True):
        return self.value


@pytest.fixture(autouse=True)
def quiet_logger(monkeypatch):
    monkeypatch.setattr(pipeline, "get_run_logger", lambda: logging.getLogger("test"))


def test_window_bounds_pairs_in_flight(monkeypatch):
    tracker = {"in_flight": 0, "peak": 0}

    class Task:
        def submit(self, p, ctx, wait=False):
            tracker["in_flight"] += 1
            tracker["peak"] = max(tracker["peak"], tracker["in_flight"])
            fut = FakeFuture(PairDone(ReportItem(p.content, p.style, "done", "out"), (b"", b"", b"")))
            threading.Timer(0, lambda: (tracker.__setitem__("in_flight", tracker["in_flight"] - 1), fut.finish())).start()
            return fut

    monkeypatch.setattr(pipeline, "process_pair", Task())
    done = []
    result = pipeline.run_pairs([plan(i) for i in range(2000)], Ctx(), 7, 3, lambda n, t: done.append(n))
    assert tracker["peak"] <= 7
    assert len(result.items) == 2000 and all(i.status == "done" for i in result.items.values())
    assert len(result.thumbs) == 3 and done[-1] == 2000


def test_window_collects_whichever_pair_finishes_first(monkeypatch):
    """One slow pair must not hold the window: the others are collected (and new ones submitted) meanwhile."""
    slow_released = threading.Event()
    order = []

    class Task:
        def submit(self, p, ctx, wait=False):
            fut = FakeFuture(PairDone(ReportItem(p.content, p.style, "done", "out"), (b"", b"", b"")))
            if p.index == 0:  # the slow pair: finishes only once 5 others were collected, or after 10 s
                threading.Thread(target=lambda: (slow_released.wait(10), fut.finish()), daemon=True).start()
            else:
                threading.Timer(0.01, fut.finish).start()
            return fut

    def on_done(n, total):
        order.append(n)
        if n == 5:
            slow_released.set()

    monkeypatch.setattr(pipeline, "process_pair", Task())
    result = pipeline.run_pairs([plan(i) for i in range(8)], Ctx(), 2, 0, on_done)
    assert len(result.items) == 8
    assert slow_released.is_set() and order == list(range(1, 9))
    # pairs 1..5 were collected while pair 0 was still running (FIFO collection would wait 10 s for it)
    assert list(result.items)[:5] == [1, 2, 3, 4, 5]


def test_no_pair_is_started_once_storage_is_declared_unreachable(monkeypatch):
    """Storage goes away while the third pair runs: the window starts no further pair, and the pairs
    never started are reported "not run: storage unreachable since HH:MM:SS UTC"."""
    from datetime import datetime, timezone

    started = []
    ctx = Ctx()

    class Task:
        def submit(self, p, ctx, wait=False):
            started.append(p.index)
            if p.index == 2:
                ctx.health.declare(datetime(2025, 1, 1, 3, 4, 5, tzinfo=timezone.utc))
            fut = FakeFuture(PairDone(ReportItem(p.content, p.style, "done", "out"), (b"", b"", b"")))
            threading.Timer(0.01, fut.finish).start()
            return fut

    monkeypatch.setattr(pipeline, "process_pair", Task())
    result = pipeline.run_pairs([plan(i) for i in range(10)], ctx, 2)
    assert started == [0, 1, 2]
    assert [result.items[i].status for i in range(3)] == ["done"] * 3
    assert {result.items[i].error for i in range(3, 10)} == {"not run: storage unreachable since 03:04:05 UTC"}


class Announcing(Ctx):
    def __init__(self):
        super().__init__()
        self.announced, self.settled = set(), set()

    def announce(self, p):
        self.announced.add(p.index)

    def settle(self, p):
        self.settled.add(p.index)


def test_the_first_window_is_announced_before_any_pair_starts(monkeypatch):
    """Issue 17: announced one by one, a first pair reached its device before the others were
    announced and started a step alone (a flow test saw steps of 1 with pairs_per_step=3)."""
    from datetime import datetime, timezone

    ctx, seen = Announcing(), []

    class Task:
        def submit(self, p, ctx, wait=False):
            seen.append(set(ctx.announced))
            if p.index == 1:  # the storage goes away: pairs 2 and 3 were announced and never start
                ctx.health.declare(datetime(2025, 1, 1, tzinfo=timezone.utc))
            fut = FakeFuture(PairDone(ReportItem(p.content, p.style, "done", "out"), (b"", b"", b"")))
            threading.Timer(0, fut.finish).start()
            return fut

    monkeypatch.setattr(pipeline, "process_pair", Task())
    pipeline.run_pairs([plan(i) for i in range(10)], ctx, 4)
    assert seen[0] == {0, 1, 2, 3}
    assert ctx.settled == {2, 3}  # no device step waits for them


def test_a_claim_error_fails_its_pair_alone_and_pairs_that_finish_during_the_wait_are_counted(monkeypatch):
    """Claims taken in the driver: an OSError (a stale NFS handle) from one pair's claim crashed the
    whole run; and pairs finishing while the run waited for another run's pair were not counted
    until the wait ended (the progress card stood still for up to NST_CLAIM_WAIT_S)."""
    from tasks import claims as claims_mod

    monkeypatch.setattr(claims_mod, "POLL_S", 0.05)
    looks, counted, release = {1: 0}, [], threading.Event()

    class HeldClaims:
        def take(self, p):
            if p.index == 2:
                raise OSError(116, "Stale file handle")
            if p.index == 1:
                looks[1] += 1
                return None if release.is_set() else "run nightly (a)"
            return None

        def start(self):
            pass

        def stop(self, ended=True):
            pass

    ctx = Ctx()
    ctx.claims = HeldClaims()

    class Task:
        def submit(self, p, ctx):
            fut = FakeFuture(PairDone(ReportItem(p.content, p.style, "done", "out"), (b"", b"", b"")))
            threading.Timer(0.3 if p.index == 0 else 0.01, fut.finish).start()
            return fut

    def on_done(n, total):
        counted.append(n)
        if n == 2:  # pair 0 (slow) counted while pair 1 still waits
            release.set()

    monkeypatch.setattr(pipeline, "process_pair", Task())
    result = pipeline.run_pairs([plan(i) for i in range(3)], ctx, 4, 0, on_done)
    assert result.items[2].status == "failed" and "Stale file handle" in result.items[2].error
    assert result.items[0].status == result.items[1].status == "done"
    assert counted == [1, 2, 3] and looks[1] >= 2
