"""Pair claims: one run at a time makes a pair; a dead run's claims are taken over."""

import json
import subprocess
import sys
import threading

import pytest

from tasks import claims as claims_mod
from tasks.claims import Claims
from tasks.contract import PairPlan
from tasks.processes import this_process
from tasks.storage import open_storage

PAIR = PairPlan(0, "c.png", "s.png", "cid", "sid", "c__s", "c__s.jpg", "c__s.json", "k")


@pytest.fixture(params=["folder", "s3"])
def out(request, tmp_path):
    if request.param == "folder":
        return open_storage(str(tmp_path / "out"))
    name, _ = request.getfixturevalue("bucket")
    return open_storage(f"s3://{name}/out/")


def test_a_claim_is_held_by_one_run_until_it_lets_go(out):
    a, b = Claims(out, {"id": "run-a", "name": "nightly"}), Claims(out, {"id": "run-b", "name": "rerun"})
    a.start()
    b.start()
    try:
        assert a.take(PAIR) is None
        assert b.take(PAIR) == "run nightly (run-a)"
        assert a.take(PAIR) is None  # its own: an earlier attempt of the flow run (Prefect's Retry)
        a.release(PAIR)
        assert b.take(PAIR) is None and a.take(PAIR) == "run rerun (run-b)"
        b.release(PAIR)
        assert out.info(b.key(PAIR)) is None
    finally:
        a.stop()
        b.stop()
    assert out.info("_runs/claims/run-a.live") is None  # the heartbeat goes with the run


def test_creating_a_claim_is_one_step_only_one_of_many_wins(out):
    wins, go = [], threading.Barrier(8)

    def race(i):
        go.wait()
        wins.append(out.create("_runs/claims/x.json", f"{i}".encode()))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]
    assert out.read("_runs/claims/x.json")[0] in {f"{i}".encode() for i in range(8)}


def test_a_dead_runs_claim_is_taken_over(out, monkeypatch):
    """kill -9 leaves the claim: its run's heartbeat is gone, too old, or its process is gone."""
    dead, live = Claims(out, {"id": "run-a", "name": "nightly"}), Claims(out, {"id": "run-b", "name": "rerun"})
    # no heartbeat at all: the run ended (or never beat) without removing its claim
    assert dead.take(PAIR) is None and live.take(PAIR) is None
    live.release(PAIR)
    # a heartbeat older than STALE_S by this clock
    dead.start()
    dead._stop.set()  # renews no more
    assert dead.take(PAIR) is None and live.take(PAIR) == "run nightly (run-a)"
    monkeypatch.setattr(claims_mod, "STALE_S", -1.0)
    assert live.take(PAIR) is None
    live.release(PAIR)
    monkeypatch.undo()
    # a live heartbeat, but the claim's process is gone from this machine
    if this_process() is not None:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        gone = this_process(child.pid)
        child.kill()
        child.wait()
        assert gone is not None
        out.write(dead.key(PAIR), json.dumps({"run": "run-a", "name": "nightly", "process": gone}).encode())
        assert live.take(PAIR) is None
    dead.stop()
