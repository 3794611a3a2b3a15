"""Pair claims: which run is making a pair now, so that two runs on one output (a nightly running
late, a manual rerun) never both make it.

A run with ``skip_existing`` takes a pair's claim before it starts the pair's task (the task then
applies the done rule again): an object ``_runs/claims/{hash of the image key}.json``, created
only if none is there (``Storage.create``: S3's If-None-Match, a folder's hard link), removed when
the pair ends. A pair whose claim another live run holds gets no task yet (``Claims.take`` names
the holder); once the run's own pairs are started it takes each such claim as it comes free
(``tasks.pipeline``: made meanwhile, the task reports it skipped, made by another run; its holder
dead, it makes the pair), for at most WAIT_S, after which the pair is reported left to that run.

A run is live while its heartbeat, ``_runs/claims/{flow run id}.live``, is renewed (every
RENEW_S). A claim is stale when its run's heartbeat is gone (the run ended without removing it),
was last renewed over STALE_S ago by this machine's clock (keep it well above the machines'
skew), or its process is gone from this machine (``processes.process_gone``: a kill -9 rerun on
the same machine takes the claims at once).

A claim written by this process for a run no longer live here is stale too (its release failed
in an outage). A claim that cannot be read counts as live for UNREADABLE_TRIES looks. Only old
heartbeats are swept at a run's start (beside its pairs), never claims.

A dead run's claim is taken over by one run only: before it writes, the taker creates a marker
named after that claim's content (``{claim}.{digest}.taken``, only if none is there), so a run that
judged the same dead claim stale a moment later backs off instead of writing over the taker's new
claim, and the taker writes its own claim over it only if it is still the one it judged dead
(a write, not a delete: credentials without DeleteObject take over too; their claims, heartbeats
and markers are never removed, and are judged dead as those of a run killed -9 are). A marker over
STALE_S old is a dead taker's: the claim is taken over again. Markers stay (a late looker must
still find one) and are swept with old heartbeats.

Left: the look that the claim is still the dead one and the write over it are two steps, so a
claim written between them (by a run judged dead that was alive, or by a second taker once the
marker is STALE_S old) is written over, and both runs may make the pair;
with a botocore before 1.35 a claim is a look then a write, and an
S3-compatible store that ignores If-None-Match gives each creator the claim: then both may make
the pair, which is the old behaviour.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import datetime, timezone

from .contract import RUNS, PairPlan
from .processes import process_gone, this_process
from .storage import MissingObjectError, Storage, StorageError, StorageHealth, WriteRefusedError, retrying

__all__ = ["Claims", "CLAIMS", "RENEW_S", "STALE_S", "POLL_S", "WAIT_S", "UNREADABLE_TRIES"]

CLAIMS = f"{RUNS}/claims"
#: How often a run renews its heartbeat (s).
RENEW_S = 30.0
#: A heartbeat older than this (s, by this machine's clock) is a dead run's.
STALE_S = 180.0
#: How often a run waiting for another's pair looks again (s).
POLL_S = 5.0
#: How long a run waits for the pairs another live run holds, after its own (s; env NST_CLAIM_WAIT_S).
WAIT_S = 3600.0
#: At a run's start, heartbeats and takeover markers older than this (s) are removed, at most SWEEP_MAX looked at.
SWEEP_AGE_S = 86400.0
SWEEP_MAX = 100
#: Looks at a claim that cannot be read (a store's error, a file being written) before it counts as abandoned.
UNREADABLE_TRIES = 3


#: Flow run ids whose claims this process is renewing now: a claim written by this process for a
#: run not among them was left by a run that ended here (its release and heartbeat's removal failed).
_live_here: set[str] = set()
_live_lock = threading.Lock()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class Claims:
    """The claims of one run (``run``: its flow run {id, name}) on ``storage``, thread-safe."""

    def __init__(self, storage: Storage, run: dict, health: StorageHealth | None = None):
        self.storage, self.run, self.health = storage, run, health
        self._held: set[str] = set()
        self._unreadable: dict[str, int] = {}  # claim key -> looks that could not read it
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewing: threading.Thread | None = None
        self._sweeping: threading.Thread | None = None

    def key(self, pair: PairPlan) -> str:
        return f"{CLAIMS}/{hashlib.sha256(pair.image_key.encode()).hexdigest()[:40]}.json"

    def _heartbeat_key(self, run_id: str) -> str:
        return f"{CLAIMS}/{run_id}.live"

    def _call(self, fn):
        return retrying(fn, health=self.health)

    def start(self) -> None:
        """Write the heartbeat, then sweep and renew it every RENEW_S in a daemon thread until
        ``stop``. Never raises: without a heartbeat this run's claims look abandoned, and another
        run may make its pairs too (the old behaviour), which loses nothing."""
        with _live_lock:
            _live_here.add(str(self.run.get("id")))
        try:
            self._beat()
        except Exception:
            pass
        # beside the pairs and the renewals, in a thread of its own: up to SWEEP_MAX reads, each
        # bounded only by the store's read timeout, held every pair back for hours where reads hung
        # (and in the renewing thread would have let this run's heartbeat go stale meanwhile)
        self._sweeping = threading.Thread(target=self._sweep_quietly, name="nst-claims-sweep", daemon=True)
        self._sweeping.start()
        self._renewing = threading.Thread(target=self._renew, name="nst-claims", daemon=True)
        self._renewing.start()

    def _sweep(self) -> int:
        """Remove the heartbeats dead runs left under CLAIMS (a kill -9 leaves its own) and takeover
        markers once over a day old: one listing, a read per object, at most SWEEP_MAX. Claims are
        never swept: one may be taken over between a look and a write, and a dead run's is taken
        over when its pair is next wanted (one whose pair was made meanwhile stays: a few hundred
        bytes). Returns how many."""
        removed = 0
        listed = [i for i in self._call(lambda: self.storage.list(CLAIMS, flat=True))
                  if i.key.endswith((".live", ".taken"))]
        for info in listed[:SWEEP_MAX]:
            try:
                age = time.time() - datetime.fromisoformat(json.loads(self.storage.read(info.key)[0])["at"]).timestamp()
            except (KeyError, TypeError, ValueError, StorageError):
                continue
            if age > SWEEP_AGE_S:
                self.storage.delete(info.key)
                removed += 1
        return removed

    def _beat(self) -> None:
        body = json.dumps({"run": self.run.get("id"), "at": _now()}).encode()
        self._call(lambda: self.storage.write(self._heartbeat_key(str(self.run.get("id"))), body, "application/json"))

    def _sweep_quietly(self) -> None:
        try:
            self._sweep()
        except Exception:  # housekeeping: the next run sweeps again
            pass

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                self._beat()
            except Exception:  # the storage's trouble is the pairs' to report; the next beat tries again
                pass

    def stop(self, ended: bool = True) -> None:
        """Stop renewing; ``ended`` (the run's pairs are all through): remove the heartbeat too (best
        effort: a stale one is judged by its age). A run stopped part-way (a cancel) leaves it to go
        stale: its pairs still in flight hold their claims until they stop."""
        self._stop.set()
        for thread in (self._renewing, self._sweeping):
            if thread is not None:
                thread.join(5)
        with _live_lock:
            _live_here.discard(str(self.run.get("id")))
        if ended:
            try:
                self.storage.delete(self._heartbeat_key(str(self.run.get("id"))))
            except Exception:
                pass

    def _create(self, key: str, body: bytes) -> bool:
        """``Storage.create``, its refusals told to the run's health as a write's are (a full disk
        stops the run, whichever write meets it first). One that goes through is not told: a claim
        of a few hundred bytes fits on a disk too full for any image."""
        return self._told(lambda: self.storage.create(key, body))

    def _told(self, write):
        """``write()`` through ``_call``, a refusal told to the run's health (see ``_create``)."""
        started_at = datetime.now(timezone.utc)
        try:
            return self._call(write)
        except WriteRefusedError as err:
            if self.health is not None:
                self.health.wrote(err, started_at)
            raise

    def take(self, pair: PairPlan) -> str | None:
        """Take ``pair``'s claim: None when this run holds it now, else who holds it ("run NAME (ID)")."""
        key = self.key(pair)
        body = json.dumps({"run": self.run.get("id"), "name": self.run.get("name"), "pair": pair.image_key,
                           "process": this_process(), "at": _now()}).encode()
        for _ in range(3):  # a claim removed or taken over between our create and our read
            if self._create(key, body):
                with self._lock:
                    self._held.add(key)
                return None
            found = self._read(key)
            if found is None:
                continue  # released meanwhile: try again
            # An earlier attempt of this flow run (Prefect's Retry) is taken over as a dead run's
            # is: another run may be taking it over already, its attempt having died.
            if found.get("run") != self.run.get("id") and self._stale(key, found) is None:
                return f"run {found.get('name') or '?'} ({found.get('run') or 'unknown'})"
            # One taker only (the marker), and only while the claim is still the one judged dead:
            # without both, runs that judged it so together each deleted the claim, the later ones
            # the first's new one, and several made the pair.
            if not self._may_take_over(key, found):
                return "another run (it is taking over a dead run's claim)"
            if self._read(key) != found:
                continue  # it changed hands meanwhile: look again
            # written over the dead claim, not deleted and created again: one step, and one that needs
            # no DeleteObject (a bucket that refuses it kept every dead claim, failing its pair for ever)
            self._told(lambda: self.storage.write(key, body, "application/json"))
            with self._lock:
                self._held.add(key)
            return None
        return "another run (its claim changed hands while this run looked)"

    def _may_take_over(self, key: str, found: dict) -> bool:
        """Whether this run takes over the dead claim ``found`` at ``key``: it created its marker,
        or the marker is its own (an earlier look whose answer was lost, or whose write failed),
        or the marker's taker died (it is over STALE_S old, or unreadable for UNREADABLE_TRIES looks)."""
        marker = self._taken_key(key, found)
        if self._create(marker, json.dumps({"run": self.run.get("id"), "at": _now()}).encode()):
            return True
        held = self._read(marker)
        if held is None:
            return False  # swept meanwhile: the next look makes it again
        if not held:
            with self._lock:
                return self._unreadable.get(marker, 0) >= UNREADABLE_TRIES
        if held.get("run") == self.run.get("id"):
            return True
        try:
            return time.time() - datetime.fromisoformat(held["at"]).timestamp() > STALE_S
        except (KeyError, TypeError, ValueError):
            return False

    @staticmethod
    def _taken_key(key: str, found: dict) -> str:
        """The takeover marker of the claim at ``key`` with content ``found`` (a claim that cannot
        be read: {}), in CLAIMS: one per dead claim, whoever takes it over."""
        digest = hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest()[:16]
        return f"{key.removesuffix('.json')}.{digest}.taken"

    def _read(self, key: str) -> dict | None:
        """A claim's content; None if it is gone; {} if it cannot be read (counted: see _stale)."""
        try:
            found = json.loads(self._call(lambda: self.storage.read(key))[0])
        except MissingObjectError:
            return None
        except (ValueError, StorageError):
            found = None
        with self._lock:
            if isinstance(found, dict):
                self._unreadable.pop(key, None)
                return found
            self._unreadable[key] = self._unreadable.get(key, 0) + 1
        return {}

    def _stale(self, key: str, found: dict) -> str | None:
        """Why a claim's run is dead, or None while it is live (or nothing tells)."""
        if not found:  # a store's error, or a claim being written (a folder without hard links)
            with self._lock:
                tries = self._unreadable.get(key, 0)
            return f"it could not be read in {tries} looks" if tries >= UNREADABLE_TRIES else None
        if why := process_gone(found.get("process")):
            return why
        run = found.get("run")
        if not isinstance(run, str):
            return "it names no run"
        if (here := this_process()) is not None and found.get("process") == here:
            with _live_lock:
                if run not in _live_here:
                    return "its run ended in this process"
        try:
            beat = json.loads(self._call(lambda: self.storage.read(self._heartbeat_key(run)))[0])
        except MissingObjectError:
            return "its run ended without removing it"
        except (ValueError, StorageError):
            return None
        try:
            age = time.time() - datetime.fromisoformat(beat["at"]).timestamp()
        except (KeyError, TypeError, ValueError):
            return None
        return f"its run's heartbeat is {age:.0f} s old" if age > STALE_S else None

    def release(self, pair: PairPlan) -> None:
        """Remove ``pair``'s claim if this run holds it and it is still this run's (another run may
        have taken it over, judging this run dead); best effort: a claim left behind is stale once
        this run's heartbeat is."""
        key = self.key(pair)
        with self._lock:
            if key not in self._held:
                return
            self._held.discard(key)
        try:
            found = self._read(key)
            if found and found.get("run") == self.run.get("id"):
                self._call(lambda: self.storage.delete(key))
        except Exception:
            pass
