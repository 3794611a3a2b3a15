"""Pair claims: one run at a time makes a pair; a dead run's claims are taken over."""

import json
import subprocess
import sys
import threading
import time

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


def test_a_dead_runs_claim_is_taken_over_where_nothing_may_be_deleted(out, monkeypatch):
    """Credentials that may write but not delete (the README needs no DeleteObject): a claim is never
    released, and a pair that failed once failed on every later run, "AccessDenied" from the takeover's
    delete of its claim. The taker now writes its claim over the dead one."""
    from tasks.storage import StorageError

    def denied(self, key):
        raise StorageError(f"{key}: AccessDenied: Access Denied")

    monkeypatch.setattr(type(out), "delete", denied)
    night1 = Claims(out, {"id": "night-1", "name": "nightly"})
    night1.start()
    assert night1.take(PAIR) is None
    night1.release(PAIR)  # the pair failed; its claim stays
    night1.stop()
    night2, night3 = Claims(out, {"id": "night-2", "name": "nightly"}), Claims(out, {"id": "night-3", "name": "nightly"})
    night2.start()
    try:
        assert night2.take(PAIR) is None  # night 1's run ended in this process: its claim is dead
        assert json.loads(out.read(night2.key(PAIR))[0])["run"] == "night-2"
        assert night3.take(PAIR) == "run nightly (night-2)"  # and it holds, as a created one does
    finally:
        night2.stop()


def test_a_dead_runs_claim_is_taken_over_by_one_of_many_runs_that_find_it_together(out):
    """Old: runs that judged one dead claim stale together each deleted it, the later ones deleting
    the first's new claim, and several held the pair (each made it). Five rounds of 6 runs."""
    runs = [Claims(out, {"id": f"run-{i}", "name": f"r{i}"}) for i in range(6)]
    for run in runs:
        run.start()
    try:
        for round_ in range(5):
            # a kill -9'd run's claim: its heartbeat is gone
            out.write(runs[0].key(PAIR), json.dumps({"run": f"dead-{round_}", "name": "killed"}).encode())
            held, go = [], threading.Barrier(len(runs))

            def race(run):
                go.wait()
                if run.take(PAIR) is None:
                    held.append(run)

            threads = [threading.Thread(target=race, args=(run,)) for run in runs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(held) == 1, [r.run["id"] for r in held]
            assert json.loads(out.read(runs[0].key(PAIR))[0])["run"] == held[0].run["id"]
            held[0].release(PAIR)
    finally:
        for run in runs:
            run.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process identities are read from /proc")
def test_a_takeover_in_progress_is_left_to_its_taker_and_a_dead_takers_marker_is_not_for_ever(out, monkeypatch):
    """Review of the first takeover marker: (1) a Retry's attempt rewrote its dead attempt's claim
    blindly while another run was taking it over: both held it; (2) a taker whose write failed, or
    whose marker's answer was lost, found its own marker on its next look and backed off for a day;
    (3) a taker that died after its marker left the dead claim for a day."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = this_process(child.pid)  # a process of this machine that is gone: its claims are dead at once
    child.kill()
    child.wait()

    def dead_claim(run_id):
        out.write(PAIR_KEY(out), json.dumps({"run": run_id, "name": "killed", "process": gone}).encode())
        return json.loads(out.read(PAIR_KEY(out))[0])

    taker, retry = Claims(out, {"id": "run-b", "name": "rerun"}), Claims(out, {"id": "run-a", "name": "nightly"})
    taker.start()
    retry.start()
    try:
        found = dead_claim("run-a")  # attempt 1 of run-a died
        assert taker._may_take_over(PAIR_KEY(out), found)  # run-b is taking it over...
        assert retry.take(PAIR) is not None  # ...so attempt 2 of run-a backs off (old: it rewrote and held)
        assert taker.take(PAIR) is None and retry.take(PAIR) == "run rerun (run-b)"
        taker.release(PAIR)

        found = dead_claim("run-x")
        real_write = out.write
        monkeypatch.setattr(out, "write", lambda *args: (_ for _ in ()).throw(OSError("the store said no")))
        with pytest.raises(OSError):
            taker.take(PAIR)  # the marker is made, the write over the dead claim fails
        monkeypatch.setattr(out, "write", real_write)
        assert taker.take(PAIR) is None  # its own marker: it goes on (old: "another run ... taking it over")
        taker.release(PAIR)

        found = dead_claim("run-y")
        out.write(Claims._taken_key(PAIR_KEY(out), found),
                  json.dumps({"run": "run-died-taking", "at": "2020-01-01T00:00:00+00:00"}).encode())
        assert taker.take(PAIR) is None  # the marker's taker is long dead
    finally:
        taker.stop()
        retry.stop()


def PAIR_KEY(out):
    return Claims(out, {"id": "k"}).key(PAIR)


def test_a_claim_that_cannot_be_read_is_not_taken_from_a_live_run_at_once(out, monkeypatch):
    """Old: a store's error on the read, or a claim file seen empty while its creator wrote it
    (a folder without hard links), read as "it names no run" and the live run's claim was taken."""
    a, b = Claims(out, {"id": "run-a", "name": "nightly"}), Claims(out, {"id": "run-b", "name": "rerun"})
    a.start()
    try:
        assert a.take(PAIR) is None
        out.write(a.key(PAIR), b"")  # being written
        looks = [b.take(PAIR) for _ in range(claims_mod.UNREADABLE_TRIES)]
        assert all(h is not None for h in looks[:-1]), looks
        assert looks[-1] is None  # still unreadable after UNREADABLE_TRIES looks: abandoned
    finally:
        a.stop()


def test_a_run_lets_go_only_of_its_own_claim_and_a_retry_records_its_own_process(out):
    """Old: release deleted whatever claim was there (after a takeover, the new holder's), and a
    Retry's attempt 2 kept attempt 1's dead process in the claim, so other runs took it over."""
    a, b = Claims(out, {"id": "run-a", "name": "nightly"}), Claims(out, {"id": "run-b", "name": "rerun"})
    assert a.take(PAIR) is None
    out.write(a.key(PAIR), json.dumps({"run": "run-b", "name": "rerun", "process": this_process()}).encode())
    b._held.add(b.key(PAIR))  # run-b took it over, judging run-a dead
    a.release(PAIR)
    assert json.loads(out.read(a.key(PAIR))[0])["run"] == "run-b"
    b.release(PAIR)
    if this_process() is not None:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        attempt_1 = this_process(child.pid)
        child.kill()
        child.wait()
        out.write(a.key(PAIR), json.dumps({"run": "run-a", "name": "nightly", "process": attempt_1}).encode())
        a.start()
        try:
            assert a.take(PAIR) is None  # attempt 2 of run-a: its own
            assert json.loads(out.read(a.key(PAIR))[0])["process"] == this_process()
            assert b.take(PAIR) == "run nightly (run-a)"
        finally:
            a.stop()


def test_a_claim_refused_by_a_full_disk_counts_as_a_refused_write(tmp_path, monkeypatch):
    """Old: creating a claim on a full disk raised a bare OSError (a traceback per pair), and the
    run never stopped: the write-refusal stop saw only image and sidecar writes."""
    import errno
    import os

    from tasks import storage as storage_mod
    from tasks.storage import StorageHealth, WriteRefusedError

    out = open_storage(str(tmp_path / "out"))
    health = Claims(out, {"id": "run-a", "name": "n"}, StorageHealth())

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage_mod.os, "link", full)
    for _ in range(3):
        with pytest.raises(WriteRefusedError, match="cannot write: No space left on device"):
            health.take(PAIR)
    assert "storage refuses writes since" in str(health.health.stop_error())
    assert os.listdir(tmp_path / "out" / ".nst-tmp") == []


def test_an_older_botocore_without_conditional_puts_still_claims(bucket, monkeypatch):
    """boto3 >= 1.34 is allowed; botocore before 1.35 refuses IfNoneMatch before sending: every pair
    on S3 failed. It looks, then writes (two runs at the same moment may both take it, as before)."""
    from tasks import storage as storage_mod

    monkeypatch.setattr(storage_mod, "_conditional_puts", lambda client: False)
    out = open_storage(f"s3://{bucket[0]}/out/")
    a, b = Claims(out, {"id": "run-a", "name": "nightly"}), Claims(out, {"id": "run-b", "name": "rerun"})
    a.start()
    try:
        assert a.take(PAIR) is None and b.take(PAIR) == "run nightly (run-a)"
    finally:
        a.stop()


def test_a_run_removes_dead_runs_old_heartbeats_and_never_sweeps_claims(out):
    """A kill -9 left its heartbeat (removed once a day old) and a claim. Claims are never swept: the
    first sweep deleted a live run's claim whose heartbeat sorted past its 1000-key listing."""
    live = Claims(out, {"id": "run-live", "name": "nightly"})
    live.start()
    other = PairPlan(1, "c1.png", "s.png", "c", "s", "c1__s", "c1__s.jpg", "c1__s.json", "k1")
    try:
        assert live.take(other) is None
        out.write("_runs/claims/run-dead.live", json.dumps({"run": "run-dead", "at": "2020-01-01T00:00:00+00:00"}).encode())
        out.write("_runs/claims/x.0123456789abcdef.taken", json.dumps({"run": "run-dead", "at": "2020-01-01T00:00:00+00:00"}).encode())
        out.write(live.key(PAIR), json.dumps({"run": "run-gone", "name": "killed"}).encode())  # no heartbeat
        late = Claims(out, {"id": "run-late", "name": "rerun"})
        late.start()
        late.stop()
        left = sorted(i.key for i in out.list("_runs/claims", flat=True))
        assert left == sorted([live.key(other), live.key(PAIR), "_runs/claims/run-live.live"]), left
    finally:
        live.stop()


def test_a_sweep_whose_reads_hang_holds_no_pair_back(out, monkeypatch):
    """A run's start swept old heartbeats before any pair: a read at a time, up to 100, each bounded
    only by the store's read timeout (70 s on S3), so a store whose reads hung held every pair back
    for up to two hours. The sweep now runs beside the pairs."""
    out.write("_runs/claims/run-dead.live", json.dumps({"run": "run-dead", "at": "2020-01-01T00:00:00+00:00"}).encode())
    read, release, returned = type(out).read, threading.Event(), threading.Event()

    def hanging(self, key, *args, **kwargs):
        if key.endswith("run-dead.live"):
            release.wait(30)
            returned.set()
        return read(self, key, *args, **kwargs)

    monkeypatch.setattr(type(out), "read", hanging)
    monkeypatch.setattr(claims_mod, "RENEW_S", 0.05)
    run = Claims(out, {"id": "run-new", "name": "nightly"})
    run.start()
    try:
        assert not returned.is_set()  # start() is back while the sweep's read still hangs
        assert run.take(PAIR) is None
        first = out.read("_runs/claims/run-new.live")[0]
        give_up = time.monotonic() + 10
        while out.read("_runs/claims/run-new.live")[0] == first and time.monotonic() < give_up:
            time.sleep(0.05)
        assert out.read("_runs/claims/run-new.live")[0] != first  # and its heartbeat is renewed meanwhile
    finally:
        release.set()
        run.stop()
    assert returned.is_set() and out.info("_runs/claims/run-dead.live") is None  # swept all the same


def test_a_folder_without_hard_links_still_claims(tmp_path, monkeypatch):
    """vfat, exFAT, some FUSE and CIFS mounts answer link(2) with EPERM. Old: that counted as a
    refused write, so every claim was refused and the run stopped after three."""
    import errno

    from tasks import storage as storage_mod

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(storage_mod.os, "link", no_links)
    out = open_storage(str(tmp_path / "out"))
    assert out.create("_runs/claims/x.json", b"1") is True and out.create("_runs/claims/x.json", b"2") is False
    assert out.read("_runs/claims/x.json")[0] == b"1"
