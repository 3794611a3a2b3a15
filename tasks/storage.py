"""One small interface over ``s3://bucket/prefix`` (boto3) and local folders.

Keys are relative POSIX paths under a storage's root. A key that would resolve outside the
root (``..``, an absolute path, a URI of another bucket) raises ``UnsafeKeyError``: no write
can land outside the output prefix, whatever a manifest says. boto3 appears only in this module.

Credentials are a value (``tasks.credentials.StorageCredentials``): every S3Storage, and every
function that opens one from a URI, takes the run's credentials (default: boto3's chain), and
``s3_client`` caches one boto3 client per credentials value. ``clear_clients()`` drops them.

Bounded time: every S3 request has connect/read timeouts (``S3_TIMEOUTS``) and boto3 makes a
single attempt; ``retrying()`` is the one retry budget (``RETRY_DELAYS``), for transient errors only.
A run's ``StorageHealth`` hears of every attempt made with it and declares the storage unreachable
when every attempt failed for ``OUTAGE_S``; from then on ``retrying`` gives up at once
(``StorageUnreachableError``), so a run whose endpoint died ends in minutes, not pair by pair.
Writes are atomic: local files are written under ``{root}/.nst-tmp/`` and renamed into place
(a crash leaves nothing visible; ``clean_temp()`` removes what a dead process left); S3 objects
are written with one PutObject.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import re
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

from nst_core.errors import NSTError
from nst_core.uris import host_problem, parse_uri

from .credentials import DEFAULT_CHAIN, StorageCredentials

__all__ = [
    "StorageError",
    "TooLargeError",
    "MissingObjectError",
    "UnsafeKeyError",
    "WriteRefusedError",
    "StorageUnreachableError",
    "StorageHealth",
    "ObjectInfo",
    "Storage",
    "LocalStorage",
    "S3Storage",
    "open_storage",
    "parse_uri",
    "within",
    "split_uri",
    "read_uri",
    "read_object",
    "presigned_url",
    "s3_client",
    "clear_clients",
    "safe_key",
    "signing_expiry",
    "is_transient",
    "retrying",
    "S3_TIMEOUTS",
    "env_seconds",
    "RETRY_DELAYS",
    "TEMP_DIR",
    "pid_space",
    "OUTAGE_S",
    "OUTAGE_MIN_FAILURES",
]

T = TypeVar("T")


def env_seconds(name: str, default: float) -> float:
    """Seconds from the environment variable ``name``, else ``default``. A value that is not a
    positive finite number is warned about, naming it, and ``default`` used (each time it is read):
    most are read when a module is imported, where an error would be a traceback before `nst`
    could say anything."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        logging.getLogger(__name__).warning("%s=%r is not a positive number of seconds; using %g", name, raw, default)
        return default
    return value


#: (connect, read) timeout of every S3 request, seconds. Env: NST_S3_CONNECT_TIMEOUT_S, NST_S3_READ_TIMEOUT_S.
S3_TIMEOUTS = (env_seconds("NST_S3_CONNECT_TIMEOUT_S", 10), env_seconds("NST_S3_READ_TIMEOUT_S", 60))
#: Waits between the attempts of one storage call (len + 1 attempts in all): the one retry budget.
RETRY_DELAYS: tuple[float, ...] = (1.0, 4.0, 10.0)
#: Local temp files live here under a storage root, outside every listing.
TEMP_DIR = ".nst-tmp"
#: Temp files of older versions: local listings skip names starting with it, at any depth.
OLD_TEMP_PREFIX = ".nst-tmp-"
#: Seconds after which another machine's temp file in a shared output folder counts as abandoned
#: (its writer's pid means nothing on this machine). Env: NST_STALE_TEMP_S.
STALE_TEMP_S = env_seconds("NST_STALE_TEMP_S", 86400)


def pid_space() -> tuple[str, str] | None:
    """(boot id, pid namespace) of this process on Linux, else None: where its pids mean something
    (they repeat across boots and containers)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip(), os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _temp_owner() -> str:
    """Whose pids a temp file's name carries: the host name and, on Linux, a hash of ``pid_space``
    (containers, and cloned machines, may share a host name while their pids are each their own)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"
    space = pid_space()
    return host if space is None else f"{host}.{hashlib.sha256(''.join(space).encode()).hexdigest()[:12]}"


#: This process's pid space in its temp files' names: {pid}-{hex}.{owner}.
_TEMP_OWNER = _temp_owner()
#: Storage is declared unreachable when no attempt succeeded for this long while at least
#: OUTAGE_MIN_FAILURES attempts failed with transient errors. Env: NST_STORAGE_OUTAGE_S (read per run).
#: With the S3 timeouts above, a run then ends within OUTAGE_S + 60 s (the attempts in flight
#: time out) + 70 s (one try at its report): about 4 minutes after the endpoint died.
OUTAGE_S = 120.0
OUTAGE_MIN_FAILURES = 3
#: A failure seen within this long is fresh evidence of an outage; older evidence (no attempt
#: since) is checked with one probe attempt before the storage is declared unreachable.
FRESH_S = 30.0
#: Writes refused in a row (a full disk, a read-only remount, credentials that expired) after which a
#: run starts no more pairs: each would be optimized for nothing.
WRITE_REFUSALS = 3


class StorageError(NSTError):
    """A storage operation failed; the message names the URI. ``transient``: worth retrying."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class MissingObjectError(StorageError):
    """The object does not exist (not transient: never retried)."""


class TooLargeError(StorageError):
    """The object is larger than the reader accepts (not transient: never retried, never read).
    ``size`` None: its size was not told and the read stopped at the limit."""

    def __init__(self, where: str, size: int | None, limit: int, what: str = "an input image"):
        self.where, self.size, self.limit, self.what = where, size, limit, what
        told = f"{size:,} bytes, over" if size is not None else "over"
        super().__init__(f"{where}: {told} the limit of {limit:,} bytes for {what}")

    def __reduce__(self):  # picklable, as a state's exception must be
        return type(self), (self.where, self.size, self.limit, self.what)


class UnsafeKeyError(StorageError):
    """A key would resolve outside its storage root."""


class WriteRefusedError(StorageError):
    """The storage answered a write with a refusal that the next write will meet too (no space, a
    read-only file system, access denied, expired credentials): never retried."""


#: Local errors that refuse every write alike, and S3's error codes that do.
_REFUSING_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})  # whatever the call; EPERM may be link's own


def _in_the_way(path: Path, err: OSError) -> StorageError:
    """A write whose path a file or folder blocks ("o/x.png" beside "o/x.png/y.png"): that pair's one line."""
    return StorageError(f"{path}: cannot write: a file or folder of that name is in the way ({err.strerror})")


def _refusal(path: Path, err: OSError) -> WriteRefusedError | None:
    """A local write's OSError as the refusal it is (no space, read-only, denied), else None."""
    return WriteRefusedError(f"{path}: cannot write: {err.strerror or err}") if err.errno in _REFUSING_ERRNOS else None
_REFUSING_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem", "ExpiredToken", "InvalidAccessKeyId",
                             "InvalidToken", "NoSuchBucket", "SignatureDoesNotMatch", "TokenRefreshRequired"})


# Only an outage: a chunk run whose own writes were refused (its worker's mount, its token) fails
# its own pairs, and the parent's other chunks go on.
_UNREACHABLE = re.compile(r"storage unreachable since (\d\d):(\d\d):(\d\d) UTC")


class StorageUnreachableError(StorageError):
    """The run's storage was declared unreachable, or refusing writes (``why``: the last refusal),
    by ``StorageHealth``: no further attempt is made."""

    def __init__(self, since: datetime, why: str = ""):
        super().__init__(f"storage refuses writes since {since:%H:%M:%S} UTC ({why})" if why
                         else f"storage unreachable since {since:%H:%M:%S} UTC")
        self.since, self.why = since, why

    def __reduce__(self):  # picklable, as a state's exception must be
        return type(self), (self.since, self.why)

    @staticmethod
    def parse(text: str) -> datetime | None:
        """The time in a message this error wrote (a chunk run's state), as the last such UTC time
        up to now; None when the message is not one."""
        found = _UNREACHABLE.search(text or "")
        if not found:
            return None
        now = datetime.now(timezone.utc)
        since = now.replace(hour=int(found[1]), minute=int(found[2]), second=int(found[3]), microsecond=0)
        return since - timedelta(days=1) if since > now else since


class StorageHealth:
    """Whether a run's storage still answers, from the attempts ``retrying(..., health=)`` makes.

    Declared unreachable when, for ``outage_s`` seconds, no attempt succeeded and at least
    ``min_failures`` failed with transient errors (timeouts, refused or dropped connections, 5xx):
    timed from the start of the first failed attempt since the last answer, which is when the
    endpoint was last known to work. Evidence no failure renewed for FRESH_S (no attempt since:
    a fan-out parent waiting on its chunk runs, a pair being computed) is first checked with one
    ``probe`` attempt, where the run gave one: a storage that answers it had a blip, long over
    (declared an outage 120 s after it, such a parent cancelled every chunk run); one that fails
    it is declared at once, as before. An error that is an answer (404, access denied) counts as
    reachable. Also declared, as refusing writes, after WRITE_REFUSALS writes in a row were refused
    (``wrote``). Once declared it stays declared: the run stops starting work and ends. One per run
    (a value the run passes to its calls, like its credentials), thread-safe."""

    def __init__(self, outage_s: float | None = None, min_failures: int = OUTAGE_MIN_FAILURES,
                 probe: Callable[[], object] | None = None):
        self.outage_s = env_seconds("NST_STORAGE_OUTAGE_S", OUTAGE_S) if outage_s is None else outage_s
        self.min_failures = min_failures
        self.probe = probe  # one cheap call to the run's storage (an exists), for evidence gone stale
        self._probing = False
        self._lock = threading.Lock()
        self._failing: tuple[float, datetime] | None = None  # (monotonic, UTC) start of the streak's first attempt
        self._failures = 0
        self._seen = 0.0  # (monotonic) when the streak's last failure was seen
        self._since: datetime | None = None  # set once declared
        self._why = ""  # declared for refused writes: the last refusal
        self._refused: list[tuple[datetime, str]] = []  # the refused writes since the last write that went through

    def succeeded(self) -> None:
        with self._lock:
            self._failing, self._failures = None, 0

    def failed(self, started: float, started_at: datetime) -> None:
        """A transient failure of an attempt that started at ``started`` (time.monotonic()) / ``started_at``."""
        with self._lock:
            if self._failing is None or started < self._failing[0]:
                self._failing = (started, started_at)
            self._failures += 1
            self._seen = time.monotonic()

    def declare(self, since: datetime) -> None:
        """Declared from elsewhere (a chunk run that found its storage unreachable)."""
        with self._lock:
            self._since = self._since or since

    def wrote(self, refusal: WriteRefusedError | None, started_at: datetime) -> None:
        """A write that started at ``started_at`` went through (None) or was refused."""
        with self._lock:
            if refusal is None:
                self._refused = []
                return
            self._refused.append((started_at, " ".join(str(refusal).split())))
            if self._since is None and len(self._refused) >= WRITE_REFUSALS:
                self._since, self._why = self._refused[0][0], self._refused[-1][1]

    def stop_error(self) -> StorageUnreachableError | None:
        """Why the run stops starting pairs, once declared (unreachable, or refusing writes); else None."""
        since = self.unreachable_since()
        return None if since is None else StorageUnreachableError(since, self._why)

    def unreachable_since(self) -> datetime | None:
        """When the storage stopped answering, once declared unreachable; else None. Stale
        evidence is probed first (one attempt, in the caller's thread; None meanwhile for others)."""
        with self._lock:
            if self._since is not None or not self._due():
                return self._since
            if self.probe is None or time.monotonic() - self._seen <= FRESH_S:
                self._since = self._failing[1]
                return self._since
            if self._probing:
                return None
            self._probing = True
        try:
            self._probe_once()
        finally:
            with self._lock:
                self._probing = False
        with self._lock:
            if self._since is None and self._due() and time.monotonic() - self._seen <= FRESH_S:
                self._since = self._failing[1]
            return self._since

    def _due(self) -> bool:
        return (self._failing is not None and self._failures >= self.min_failures
                and time.monotonic() - self._failing[0] >= self.outage_s)

    def _probe_once(self) -> None:
        # one attempt, heard as every attempt is (an answer, even an error that is one, ends the streak)
        with suppress(Exception):
            retrying(self.probe, delays=(), health=self)

    def check(self) -> None:
        """Raise ``StorageUnreachableError`` once declared."""
        if (err := self.stop_error()) is not None:
            raise err


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the storage root
    size: int
    identity: str  # S3 ETag from the listing; "" for local files (hashed on demand by Storage.identity)


def safe_key(key: str) -> str:
    """Normalize a relative key; reject anything that could leave the root."""
    if not key or "\x00" in key or "://" in key or key.startswith(("/", "\\")) or (len(key) > 1 and key[1] == ":"):
        raise UnsafeKeyError(f"key {key!r} is not a relative path under the storage root")
    parts = [p for p in key.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise UnsafeKeyError(f"key {key!r} would resolve outside the storage root")
    return "/".join(parts)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Storage:
    """Interface: list / read / write / exists / delete under one root URI. ``credentials``: what
    it signs S3 requests with (a local folder has none to use, and keeps the default)."""

    uri: str
    credentials: StorageCredentials = DEFAULT_CHAIN
    #: Whether ``list`` gives each object's identity (S3's ETag); a local file is hashed instead.
    lists_identities: bool = False

    def list(self, prefix: str = "", flat: bool = False) -> list[ObjectInfo]:
        """Every object under ``prefix``, at any depth; ``flat``: those directly in it only."""
        raise NotImplementedError

    def read(self, key: str, max_bytes: int | None = None) -> tuple[bytes, str]:
        """(bytes, identity). Raises TooLargeError, having read none of it, when the object is
        larger than ``max_bytes``."""
        raise NotImplementedError

    def write(self, key: str, data: bytes, content_type: str | None = None) -> str:
        """Write atomically; returns the identity the written object will list with where the
        backend gives one at listing time (S3: its ETag), else its SHA-256."""
        raise NotImplementedError

    def create(self, key: str, data: bytes) -> bool:
        """Write ``data`` at ``key`` only if no object is there, as one step no other writer can
        come between (S3: If-None-Match; a folder: a hard link); False if one was."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def info(self, key: str) -> ObjectInfo | None:
        """Size (and, on S3, ETag) of one object without reading it; None when it does not exist."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def identity(self, key: str, max_bytes: int | None = None) -> str:
        """The object's identity without downloading it where the backend allows; TooLargeError
        above ``max_bytes``."""
        raise NotImplementedError

    def uri_for(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{safe_key(key)}"

    def folds_case(self) -> bool:
        """Whether keys that differ only in case ("Out", "out") are one object here (S3: never)."""
        return False


#: Seconds one call on a local folder may take (env NST_LOCAL_IO_TIMEOUT_S): a hard-mounted NFS or
#: a FUSE mount that stops answering blocks a read or a write for ever, and Python cannot
#: interrupt the call. Past it the call is abandoned (its thread left to finish) and fails as a
#: transient error, so the run's outage rule ends the run in bounded time.
LOCAL_IO_TIMEOUT_S = 120.0


def _bounded(method=None, *, times: float = 1.0):
    """``method`` of LocalStorage run in a daemon thread, waited for at most LOCAL_IO_TIMEOUT_S
    (``times`` that for a call whose work grows with the data: a listing, a hash)."""
    if method is None:
        return functools.partial(_bounded, times=times)

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        wait = times * env_seconds("NST_LOCAL_IO_TIMEOUT_S", LOCAL_IO_TIMEOUT_S)
        outcome: list = []
        finished = threading.Event()

        def run():
            try:
                outcome.append((True, method(self, *args, **kwargs)))
            except BaseException as err:  # re-raised in the caller's thread
                outcome.append((False, err))
            finally:
                finished.set()

        threading.Thread(target=run, name=f"nst-local-{method.__name__}", daemon=True).start()
        if not finished.wait(wait):
            raise StorageError(f"{self.root if isinstance(self, LocalStorage) else self}: {method.__name__} got no answer "
                               f"within {wait:g} s (a network mount "
                               "that stopped answering?); NST_LOCAL_IO_TIMEOUT_S sets the wait", transient=True)
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    return call


@_bounded
def _resolved(path: Path) -> Path:
    """``path.resolve()``, bounded: resolving reads the mount."""
    return path.resolve()


class LocalStorage(Storage):
    """A local folder. Writes are atomic: a temp file in the same folder, then a rename. Every call
    is bounded (``_bounded``)."""

    def __init__(self, root: str | os.PathLike):
        self.root = _resolved(Path(root).expanduser())
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self._resolve(key)[1]

    def _resolve(self, key: str) -> tuple[Path, Path]:
        """(the key's path as named, its target once links are resolved); UnsafeKeyError if that
        target lies outside the root."""
        named = self.root / safe_key(key)
        try:
            path = named.resolve()
        except (OSError, RuntimeError) as err:  # a symlink loop (RuntimeError before Python 3.13)
            raise StorageError(f"{named}: cannot resolve: {err}") from None
        if not path.is_relative_to(self.root):  # a symlink pointing out of the root
            raise UnsafeKeyError(f"{key!r} resolves outside {self.root}")
        return named, path

    @_bounded(times=10)
    def list(self, prefix: str = "", flat: bool = False) -> list[ObjectInfo]:
        base = self._path(prefix) if prefix else self.root
        if not base.exists():
            return []
        if not base.is_dir():
            raise StorageError(f"{base} is not a folder")
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [] if flat else sorted(d for d in dirnames if not (d == TEMP_DIR and Path(dirpath) == self.root))
            for name in sorted(filenames):
                if name.startswith(OLD_TEMP_PREFIX):
                    continue
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                try:
                    size = path.stat().st_size
                except OSError:  # a dangling symlink, or gone since the walk: its read names it
                    size = 0
                out.append(ObjectInfo(key, size, ""))
        return out

    def _open(self, key: str, max_bytes: int | None):
        """(name, open binary file) of ``key``; TooLargeError above ``max_bytes``. Opened without
        blocking and checked before use: a FIFO, socket or device among the inputs is refused, not
        waited on for ever. Every error names the file as listed, and its target if it is a link."""
        named, path = self._resolve(key)
        where = str(named) if named == path else f"{named} (a link to {path})"
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        except FileNotFoundError:
            raise MissingObjectError(f"{where}: no such file") from None
        except IsADirectoryError:
            raise MissingObjectError(f"{where}: is a folder, not a file") from None
        except OSError as err:  # no permission; a socket (ENXIO)
            raise StorageError(f"{where}: cannot open: {err.strerror or err}") from None
        try:
            mode, size = (st := os.fstat(fd)).st_mode, st.st_size
            if stat.S_ISDIR(mode):  # Linux opens a folder read-only without complaint
                raise MissingObjectError(f"{where}: is a folder, not a file")
            if not stat.S_ISREG(mode):
                raise StorageError(f"{where}: not a regular file")
            if max_bytes is not None and size > max_bytes:
                raise TooLargeError(where, size, max_bytes)
            return where, os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    @_bounded
    def read(self, key: str, max_bytes: int | None = None) -> tuple[bytes, str]:
        where, fh = self._open(key, max_bytes)
        with fh:
            data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:  # it grew after its size was read
            raise TooLargeError(where, None, max_bytes)
        return data, _sha256(data)

    @_bounded(times=10)
    def identity(self, key: str, max_bytes: int | None = None) -> str:
        """The file's SHA-256, read in blocks: a file of any size hashes in bounded memory."""
        with self._open(key, max_bytes)[1] as fh:
            return "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest()

    @_bounded
    def write(self, key: str, data: bytes, content_type: str | None = None) -> str:
        path = self._path(key)
        try:
            return self._write(path, data)
        except (FileExistsError, NotADirectoryError, IsADirectoryError) as err:
            raise _in_the_way(path, err) from None

    def _write(self, path: Path, data: bytes) -> str:
        try:  # its folders too: a read-only remount met at a new folder is a refusal like any other
            path.parent.mkdir(parents=True, exist_ok=True)
            temp_dir = self._temp_dir(create=True)
            # Created 0666 by os.open, so the kernel applies the umask in force now (mkstemp makes 0600);
            # the pid and its pid space tell clean_temp() whether the writer is still alive.
            tmp = str(temp_dir / f"{os.getpid()}-{uuid.uuid4().hex}.{_TEMP_OWNER}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)  # same file system: atomic
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as err:
            if refused := _refusal(path, err):  # one line naming the file; the next write meets it too
                raise refused from None
            raise
        return _sha256(data)

    @_bounded
    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as err:
            raise _in_the_way(path, err) from None
        except OSError as err:
            raise _refusal(path, err) or err from None
        try:
            tmp = self._temp_dir(create=True) / f"{os.getpid()}-{uuid.uuid4().hex}.{_TEMP_OWNER}"
            try:
                tmp.write_bytes(data)
                os.link(tmp, path)  # whole or not at all, and never over another's
                return True
            except FileExistsError:
                return False
            except OSError as err:
                if err.errno in _FULL_ERRNOS:
                    raise
                # a file system without hard links (vfat, some FUSE and CIFS mounts answer EPERM):
                # exclusive create, then the bytes
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                return True
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as err:
            if refused := _refusal(path, err):  # as write's: a full disk stops the run
                raise refused from None
            raise

    @_bounded
    def info(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):  # "o/x.png/y" under the file "o/x.png": nothing
            return None
        return ObjectInfo(safe_key(key), st.st_size, "") if path.is_file() else None

    @_bounded
    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    @_bounded
    def delete(self, key: str) -> None:
        with suppress(NotADirectoryError):  # a key under a file: nothing there to delete
            self._path(key).unlink(missing_ok=True)

    @_bounded
    def folds_case(self) -> bool:
        """Whether this folder holds "Out" and "out" as one file (macOS's and Windows' file systems,
        an ext4 casefold folder; Linux's usual ones tell them apart). Asked of the folder itself: a
        probe file in its temp folder (a kill leaves it to clean_temp), looked up upper-cased. One
        that cannot be made answers True: names that may clash fail a pair, never replace an image."""
        probe = f"{os.getpid()}-case{uuid.uuid4().hex}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            temp_dir = self._temp_dir(create=True)
            path = temp_dir / f"{probe}.{_TEMP_OWNER}"
            path.touch(exist_ok=False)
        except (OSError, StorageError):  # StorageError: the temp folder is a link or a file
            return True
        folds = os.path.exists(temp_dir / f"{probe.upper()}.{_TEMP_OWNER}")
        try:
            path.unlink(missing_ok=True)
        except OSError:  # a folder that lets files be made but not removed: clean_temp tries again
            pass
        return folds

    def _temp_dir(self, create: bool = False) -> Path:
        """The output's temp folder: a real folder of the root, never a link out of it (writes
        would go through it and clean_temp would remove what it found there)."""
        path = self.root / TEMP_DIR
        if create:
            path.mkdir(exist_ok=True)
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise StorageError(f"{path} is not a folder of the output (a link, or a file): "
                               f"remove it; temp files are written there")
        return path

    @_bounded
    def clean_temp(self) -> int:
        """Remove temp files whose writer is gone (a crash or kill -9). Returns how many.

        Gone: a writer of this pid space (``_temp_owner``: this machine, this container) no longer
        runs; another's file (a shared folder) is older than ``STALE_TEMP_S``, since its pid means
        nothing here (the age is the file server's mtime against this clock: keep it well above
        their skew). A name without a pid space (written before they were named) counts as this
        one's."""
        removed = 0
        for path in self._temp_dir().glob("*"):
            if path.is_symlink() or not path.is_file():  # not a temp file of ours (a folder, a link)
                continue
            pid, _, rest = path.name.partition("-")
            _, dot, owner = rest.partition(".")
            try:
                if not dot or owner == _TEMP_OWNER:
                    if pid.isdigit() and _alive(int(pid)):  # maybe still writing (this or another run)
                        continue
                elif time.time() - path.stat().st_mtime < STALE_TEMP_S:
                    continue
                path.unlink()
            except FileNotFoundError:  # renamed into place, or removed by another run, meanwhile
                continue
            removed += 1
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_clients: dict[tuple[int, StorageCredentials], object] = {}  # (pid, credentials) -> boto3 client
_clients_lock = threading.Lock()


def s3_client(credentials: StorageCredentials = DEFAULT_CHAIN):
    """The boto3 S3 client of ``credentials`` in this process, built once per credentials value
    (clients are thread-safe; the cache key is the value's hash, never a name). Explicit timeouts
    and ONE attempt per call: ``retrying`` is the retry budget. Signature V4, which presigned URLs
    need too (its limit: 7 days)."""
    import boto3
    from botocore.config import Config

    with _clients_lock:
        key = (os.getpid(), credentials)  # a forked child builds its own
        if key not in _clients:
            config = Config(retries={"mode": "standard", "total_max_attempts": 1}, max_pool_connections=32,
                            connect_timeout=S3_TIMEOUTS[0], read_timeout=S3_TIMEOUTS[1], signature_version="s3v4")
            if credentials.client_config:  # the block's own (addressing style, …); ours win: bounded time
                config = Config(**json.loads(credentials.client_config)).merge(config)
            _clients[key] = boto3.session.Session(**credentials.session_args()).client(
                "s3", config=config, endpoint_url=credentials.endpoint_url, verify=credentials.verify)
        return _clients[key]


def clear_clients() -> None:
    """Forget every cached S3 client (tests that change the endpoint or the environment call it)."""
    with _clients_lock:
        _clients.clear()


_TRANSIENT_CODES = {"SlowDown", "TooManyRequests", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable"}


def _error_code(err: Exception) -> str:
    response = getattr(err, "response", None)  # only ClientError carries one (and it may be None)
    return str(((response or {}).get("Error") or {}).get("Code", "")) if isinstance(response, dict) else ""


def _is_missing(err: Exception) -> bool:
    return _error_code(err) in ("NoSuchKey", "404", "NotFound", "NoSuchBucket")


def _transient_types() -> tuple[type[BaseException], ...]:
    """Errors without an HTTP answer that are worth retrying: connection trouble, timeouts, a body
    cut short, a credential refresh that failed (the provider may answer next time)."""
    from botocore import exceptions as bx

    types: list[type[BaseException]] = [bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError,
                                        bx.CredentialRetrievalError, ConnectionError, TimeoutError]
    for name in ("ResponseStreamingError", "ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError"):
        if hasattr(bx, name):
            types.append(getattr(bx, name))
    try:
        from urllib3 import exceptions as ux

        types += [ux.ProtocolError, ux.TimeoutError, ux.IncompleteRead]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


class S3Storage(Storage):
    """``s3://bucket/prefix``. Large objects go through boto3's managed (multipart) transfers."""

    lists_identities = True

    def __init__(self, bucket: str, prefix: str = "", credentials: StorageCredentials = DEFAULT_CHAIN):
        if not bucket:
            raise StorageError("an s3:// URI needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        body = prefix[:-1] if prefix.endswith("/") else prefix
        if prefix.strip("/") and (folded := safe_key(prefix)) != body:
            # "out//x/", "./out/", "a\\b/": S3 keeps them apart, a path folds them
            raise UnsafeKeyError(f"prefix {prefix!r} would be used as {folded + '/'!r}, another prefix (an empty "
                                 "or '.' segment, or a backslash, folds as in a path); write it as S3 lists it")
        self.prefix = body + "/" if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}"
        self.credentials = credentials

    @property
    def client(self):
        return s3_client(self.credentials)

    def _key(self, key: str) -> str:
        return self.prefix + safe_key(key)

    def _uri(self, key: str) -> str:
        """s3://bucket/prefix+key, how every message names an object."""
        return f"s3://{self.bucket}/{self._key(key)}"

    def _wrap(self, err: Exception, key: str) -> StorageError:
        from botocore.exceptions import ClientError

        if isinstance(err, StorageError):  # UnsafeKeyError from our own key check
            return err
        try:
            uri = self._uri(key) if key else self.uri
        except UnsafeKeyError:
            uri = f"s3://{self.bucket}/{self.prefix}{key}"
        if _error_code(err) == "NoSuchBucket":
            return MissingObjectError(f"{uri}: bucket {self.bucket!r} does not exist")
        if _is_missing(err):
            return MissingObjectError(f"{uri}: no such object")
        if isinstance(err, ClientError):
            e = err.response.get("Error", {})
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            transient = status >= 500 or status == 429 or e.get("Code") in _TRANSIENT_CODES
            return StorageError(f"{uri}: {e.get('Code', 'error')}: {e.get('Message', '')}".rstrip(": "),
                                transient=transient)
        # Connection refused/reset, timeouts, a body cut short: the endpoint may come back.
        transient = isinstance(err, _transient_types())
        return StorageError(f"{uri}: {type(err).__name__}: {err}", transient=transient)

    def list(self, prefix: str = "", flat: bool = False) -> list[ObjectInfo]:
        full = self.prefix + (safe_key(prefix).rstrip("/") + "/" if prefix else "")
        out = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, **({"Delimiter": "/"} if flat else {}))
            for page in pages:
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(obj["Key"][len(self.prefix):], obj["Size"], obj["ETag"].strip('"')))
        except Exception as err:
            raise self._wrap(err, prefix) from None
        return out

    def read(self, key: str, max_bytes: int | None = None) -> tuple[bytes, str]:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            if max_bytes is None:
                return resp["Body"].read(), resp["ETag"].strip('"')
            where = self._uri(key)
            size = int(resp.get("ContentLength", -1))
            if size > max_bytes:
                resp["Body"].close()  # the headers told: none of the body is read
                raise TooLargeError(where, size, max_bytes)
            data = resp["Body"].read(max_bytes + 1)  # a response without a length is bounded too
            if len(data) > max_bytes:
                resp["Body"].close()
                raise TooLargeError(where, None, max_bytes)
            if 0 <= size != len(data):  # read(n) skips botocore's length check: a dropped connection
                raise StorageError(f"{where}: body cut short: {len(data)} of {size} bytes", transient=True)
            return data, resp["ETag"].strip('"')
        except Exception as err:
            raise self._wrap(err, key) from None

    def identity(self, key: str, max_bytes: int | None = None) -> str:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            size = int(head.get("ContentLength", -1))
            if max_bytes is not None and size > max_bytes:
                raise TooLargeError(self._uri(key), size, max_bytes)
            return head["ETag"].strip('"')
        except Exception as err:
            raise self._wrap(err, key) from None

    def write(self, key: str, data: bytes, content_type: str | None = None) -> str:
        extra = {"ContentType": content_type} if content_type else {}
        try:
            # One PutObject (up to 5 GB): atomic, so a crash never leaves a partial object visible.
            resp = self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)
        except Exception as err:
            raise self._write_error(err, key) from None
        return str(resp.get("ETag", "")).strip('"') or _sha256(data)

    def _write_error(self, err: Exception, key: str) -> StorageError:
        """``_wrap`` for a write: a refusal the next write meets too is a WriteRefusedError."""
        wrapped = self._wrap(err, key)
        if not wrapped.transient and _error_code(err) in _REFUSING_CODES:
            return WriteRefusedError(str(wrapped))
        return wrapped

    def create(self, key: str, data: bytes) -> bool:
        if not _conditional_puts(self.client):  # a botocore before S3's conditional writes (1.35): look, then write
            if self.info(key) is not None:
                return False
            self.write(key, data, "application/json")
            return True
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
            return True
        except Exception as err:
            if _error_code(err) in ("PreconditionFailed", "ConditionalRequestConflict"):  # 412; 409: another's in flight
                return False
            raise self._write_error(err, key) from None

    def info(self, key: str) -> ObjectInfo | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as err:
            if _is_missing(err):
                return None
            raise self._wrap(err, key) from None
        return ObjectInfo(safe_key(key), int(head.get("ContentLength", -1)), str(head.get("ETag", "")).strip('"'))

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as err:
            if _is_missing(err):
                return False
            raise self._wrap(err, key) from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as err:
            raise self._wrap(err, key) from None


def is_bucket(bucket: str) -> bool:
    """Whether boto3 takes ``bucket`` as a Bucket: a name (S3-compatible stores allow more than AWS's
    rules) or an access point ARN ("...:accesspoint:name"); botocore's own patterns, matched whole
    (their "$" would let a trailing newline through)."""
    from botocore.handlers import VALID_BUCKET, VALID_S3_ARN

    return "\n" not in bucket and bool(VALID_BUCKET.search(bucket) or VALID_S3_ARN.search(bucket))


def open_storage(uri: str, credentials: StorageCredentials = DEFAULT_CHAIN) -> Storage:
    """``s3://bucket/prefix`` -> S3Storage signing with ``credentials``; a folder path or ``file://``
    URI -> LocalStorage."""
    scheme, bucket, path = parse_uri(uri)
    if scheme == "s3":
        return S3Storage(bucket, path[1:], credentials)  # the "/" after the bucket
    if why := host_problem(uri):
        raise StorageError(why)
    if scheme == "file":
        return LocalStorage(path)
    _check_scheme(uri, scheme)
    return LocalStorage(uri)


def _check_scheme(uri: str, scheme: str) -> None:
    """StorageError for a URI of a scheme this tool does not read (https://, gs://): it was read as
    a relative folder ("./https:/host/vgg.pth: no such file"). A one-letter scheme is a drive (C:)."""
    if scheme and len(scheme) > 1 and scheme != "file":
        raise StorageError(f"{uri}: unsupported scheme {scheme!r}; use s3://bucket/prefix, file:// or a path")


def within(inner: Storage, outer: Storage) -> bool:
    """Whether every object of ``inner`` is also an object of ``outer`` (the same place, or below it)."""
    a, b = inner.uri.rstrip("/"), outer.uri.rstrip("/")
    return a == b or a.startswith(b + "/")


def _conditional_puts(client) -> bool:
    """Whether this botocore knows PutObject's IfNoneMatch (S3's conditional writes, botocore 1.35);
    boto3 >= 1.34 is allowed, and an older one refuses the parameter before sending anything."""
    return "IfNoneMatch" in client.meta.service_model.operation_model("PutObject").input_shape.members


def split_uri(uri: str, credentials: StorageCredentials = DEFAULT_CHAIN) -> tuple[Storage, str]:
    """An object URI -> (storage of its folder, key)."""
    scheme, bucket, path = parse_uri(uri)
    folder, _, name = path.rstrip("/").rpartition("/")
    if not name:
        raise StorageError(f"{uri}: not an object URI")
    if scheme == "s3":
        key = path[1:]  # as written after s3://bucket/
        if key.endswith("/") or "\\" in key or any(part in ("", ".") for part in key.split("/")):
            raise StorageError(f"{uri}: key {key!r} folds as a path (an empty or '.' segment, a trailing '/' or a "
                               "backslash) and would read another object; name the object's key as it is")
        return S3Storage(bucket, folder[1:], credentials), name
    if why := host_problem(uri):
        raise StorageError(why)
    _check_scheme(uri, scheme)
    return LocalStorage(folder or ("/" if path.startswith("/") else ".")), name  # "/x.jsonl": the root


def read_uri(uri: str, credentials: StorageCredentials = DEFAULT_CHAIN, max_bytes: int | None = None) -> bytes:
    """Bytes of one object by full URI (weights, manifests); TooLargeError, unread, above ``max_bytes``."""
    storage, key = split_uri(uri, credentials)
    return storage.read(key, max_bytes)[0]


def weights_reader(credentials: StorageCredentials = DEFAULT_CHAIN, health: StorageHealth | None = None,
                   should_stop: Callable[[], bool] | None = None) -> Callable[[str], bytes]:
    """The engine's reader of weights URIs it cannot open itself (s3://): ``read_uri`` with the
    run's credentials, each transient error retried as every other read is (one 503 while reading
    the 528 MB checkpoint must not fail a nightly run)."""
    return lambda uri: retrying(lambda: read_uri(uri, credentials), health=health, should_stop=should_stop)


def read_object(uri: str, credentials: StorageCredentials = DEFAULT_CHAIN,
                max_bytes: int | None = None) -> tuple[bytes, str]:
    """(bytes, identity) of one object by full URI: the identity of the bytes read (S3: the GET's
    ETag; local: their SHA-256), to compare with the identity planned. TooLargeError, unread,
    above ``max_bytes``."""
    storage, key = split_uri(uri, credentials)
    return storage.read(key, max_bytes)


def is_transient(err: BaseException) -> bool:
    """True for errors worth retrying: throttling, 5xx, connection trouble. Never a missing key."""
    if isinstance(err, StorageError):
        return err.transient
    return isinstance(err, (ConnectionError, TimeoutError))


def retrying(fn: Callable[[], T], delays: tuple[float, ...] | None = None,
             should_stop: Callable[[], bool] | None = None, health: StorageHealth | None = None) -> T:
    """``fn()``, retried after each transient error with the waits of ``delays`` (default
    ``RETRY_DELAYS``); any other error, or the last transient one, is raised as is. ``health``
    hears of every attempt; once it declares the storage unreachable no attempt is made and
    ``StorageUnreachableError`` is raised."""
    waits = list(RETRY_DELAYS if delays is None else delays)
    while True:
        if health is not None:
            health.check()
        started, started_at = time.monotonic(), datetime.now(timezone.utc)
        try:
            result = fn()
        except Exception as err:
            transient = is_transient(err)
            if health is not None:
                health.failed(started, started_at) if transient else health.succeeded()
                if transient and health.unreachable_since() is not None:
                    raise StorageUnreachableError(health.unreachable_since()) from err
            if not waits or not transient or (should_stop and should_stop()):
                raise
            time.sleep(waits.pop(0))
        else:
            if health is not None:
                health.succeeded()
            return result


def signing_expiry(credentials: StorageCredentials = DEFAULT_CHAIN) -> tuple[bool, datetime | None]:
    """(whether the credentials that sign for ``credentials`` are temporary: a session token; when
    they expire, where boto knows it: an IAM role's, refreshed by boto, else None). Read from the
    client's signer: nothing is fetched but boto's own refresh in the credentials' last minutes
    (its timeouts bound it), so a link may be as short as those minutes."""
    signer = getattr(getattr(s3_client(credentials), "_request_signer", None), "_credentials", None)
    try:
        token = signer.get_frozen_credentials().token if signer is not None else None
    except Exception:  # none found, or a refresh that failed: the links fail the same way
        return False, None
    # botocore's RefreshableCredentials keep it privately; a botocore without it loses only the date
    expiry = getattr(signer, "_expiry_time", None)
    return bool(token), expiry.astimezone(timezone.utc) if isinstance(expiry, datetime) and expiry.tzinfo else None


def presigned_url(uri: str, expires_s: int, credentials: StorageCredentials = DEFAULT_CHAIN) -> str:
    """A browser-openable GET URL for an s3:// object, signed locally with ``credentials`` (no
    request is made; Signature V4, so at most 7 days), valid ``expires_s`` or until the temporary
    credentials that sign it expire, if sooner (S3 refuses the link then: it says so)."""
    scheme, bucket, path = parse_uri(uri)
    if scheme != "s3" or not bucket:
        raise StorageError(f"{uri}: only s3:// objects have presigned URLs")
    expiry = signing_expiry(credentials)[1]
    if expiry is not None:
        expires_s = max(1, min(int(expires_s), int((expiry - datetime.now(timezone.utc)).total_seconds())))
    return s3_client(credentials).generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": path.lstrip("/")}, ExpiresIn=int(expires_s))
