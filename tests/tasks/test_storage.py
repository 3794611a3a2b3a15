import os
import pickle
import socket
import time
from pathlib import Path

import pytest

from tasks.storage import (
    TEMP_DIR,
    LocalStorage,
    MissingObjectError,
    StorageError,
    S3Storage,
    TooLargeError,
    UnsafeKeyError,
    is_transient,
    open_storage,
    read_uri,
    safe_key,
    split_uri,
)


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "s3://other/x", "", ".", "a/..", "C:\\x", "\\x"])
def test_unsafe_keys_are_rejected(key):
    with pytest.raises(UnsafeKeyError):
        safe_key(key)


def test_safe_key_normalizes():
    assert safe_key("a//b/./c.png") == "a/b/c.png"


def _roundtrip(storage):
    storage.write("sub/a.png", b"one")
    storage.write("b.json", b"{}")
    assert storage.exists("sub/a.png") and not storage.exists("nope.png")
    data, identity = storage.read("sub/a.png")
    assert data == b"one" and identity
    assert [i.key for i in storage.list()] == ["b.json", "sub/a.png"]
    assert [i.key for i in storage.list("sub")] == ["sub/a.png"]
    with pytest.raises(MissingObjectError, match="nope.png"):
        storage.read("nope.png")
    with pytest.raises(UnsafeKeyError):
        storage.write("../escape.png", b"x")
    storage.delete("b.json")
    assert not storage.exists("b.json")


def test_local_storage(tmp_path):
    _roundtrip(LocalStorage(tmp_path / "root"))
    assert not (tmp_path / "escape.png").exists()


def test_s3_storage_against_a_real_endpoint(bucket):
    name, client = bucket
    storage = open_storage(f"s3://{name}/out/")
    assert isinstance(storage, S3Storage) and storage.uri == f"s3://{name}/out/"
    _roundtrip(storage)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=name)["Contents"]]
    assert keys == ["out/sub/a.png"]  # nothing outside the prefix
    assert read_uri(f"s3://{name}/out/sub/a.png") == b"one"
    assert storage.identity("sub/a.png") == client.head_object(Bucket=name, Key="out/sub/a.png")["ETag"].strip('"')


def test_keys_with_a_hash_or_a_question_mark_read_the_object_listed(bucket, tmp_path):
    """'#' and '?' are plain characters of S3 keys and file names ("IMG #3.jpg"). Old: the URI
    parser took them for a fragment and a query: "in/photo #1.png" was read as "in/photo " (no
    such object: its pair failed every night) and "x.png#y.png" as the other object "x.png"."""
    from tasks.contract import output_name

    name, client = bucket
    keys = ["in/photo #1.png", "in/b?.png", "in/x.png", "in/x.png#y.png", "in/q?a=1#f.png"]
    for i, key in enumerate(keys):
        client.put_object(Bucket=name, Key=key, Body=f"object {i}".encode())
    storage = open_storage(f"s3://{name}/in/")
    listed = sorted(info.key for info in storage.list())
    assert listed == sorted(k.removeprefix("in/") for k in keys)
    for i, key in enumerate(keys):
        uri = storage.uri_for(key.removeprefix("in/"))
        assert read_uri(uri) == f"object {i}".encode(), uri
        folder, leaf = split_uri(uri)
        assert (folder.uri, leaf) == (f"s3://{name}/in/", key.removeprefix("in/"))
    (tmp_path / "a #1?.png").write_bytes(b"local")
    for uri in (str(tmp_path / "a #1?.png"), f"file://{tmp_path}/a #1?.png"):
        assert read_uri(uri) == b"local", uri
    # a file URI percent-encodes (Path.as_uri): old, file:///…/out%20dir/ was a folder named "out%20dir"
    out = open_storage((tmp_path / "out dir").as_uri())
    out.write("x.png", b"x")
    assert (tmp_path / "out dir" / "x.png").read_bytes() == b"x" and not (tmp_path / "out%20dir").exists()
    # output names keep what follows the '#'
    assert output_name(f"s3://{name}/in/photo #1.png", f"s3://{name}/s/b?.png", "0123456789") == "photo_1__b___01234567"


def test_a_file_uri_with_a_host_is_refused_not_read_as_another_path(tmp_path, monkeypatch):
    """file://out/sub was the folder /sub (the host dropped: results written at the file system's
    root) and file://out the current folder, while the CLI's check read them as ./out."""
    monkeypatch.chdir(tmp_path)
    for uri in ("file://out", "file://out/sub", "file://out/sub/a.png"):
        with pytest.raises(StorageError, match="a file URI with a host \\('out'\\)"):
            open_storage(uri) if not uri.endswith(".png") else split_uri(uri)
    (tmp_path / "a.png").write_bytes(b"local")
    assert read_uri(f"file://localhost{tmp_path}/a.png") == b"local"  # RFC 8089: this machine
    assert open_storage(f"file://localhost{tmp_path}").uri == str(tmp_path)

def test_an_object_over_the_readers_byte_limit_is_refused_naming_it_and_its_size(bucket, tmp_path):
    name, _ = bucket
    for storage in (LocalStorage(tmp_path), open_storage(f"s3://{name}/in/")):
        storage.write("big.png", b"x" * 1001)
        with pytest.raises(TooLargeError, match=r"big\.png: 1,001 bytes, over the limit of 1,000 bytes") as err:
            storage.read("big.png", max_bytes=1000)
        assert not is_transient(err.value)  # never retried: it will be as large next time
        assert storage.read("big.png", max_bytes=1001)[0] == b"x" * 1001
        again = pickle.loads(pickle.dumps(err.value))  # as Prefect stores a failed state's exception
        assert type(again) is TooLargeError and str(again) == str(err.value) and again.size == 1001


def test_a_folder_named_like_a_file_is_missing_and_holds_no_descriptor(tmp_path):
    """Old: Linux opened the folder, the error came from fdopen ('Is a directory: 3', not a
    StorageError: planning crashed) and every attempt leaked a descriptor."""
    (tmp_path / "dir.png").mkdir()
    storage, before = LocalStorage(tmp_path), len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(MissingObjectError, match=r"dir\.png: is a folder, not a file"):
            storage.identity("dir.png")
    # 20 attempts leaked 20; the process's other threads (a test server's connections) may open or
    # close one meanwhile: seen once in `make test`, 14 where 15 were open before
    assert len(os.listdir("/proc/self/fd")) - before <= 1


def test_a_local_files_identity_is_its_sha256_read_in_blocks(tmp_path, monkeypatch):
    import hashlib

    data = os.urandom(3 * 2**20 + 7)
    (tmp_path / "a.png").write_bytes(data)
    monkeypatch.setattr("pathlib.Path.read_bytes", lambda self: pytest.fail("read whole to hash it"))
    assert LocalStorage(tmp_path).identity("a.png") == "sha256:" + hashlib.sha256(data).hexdigest()


def test_s3_listing_paginates(bucket):
    name, client = bucket
    for i in range(1005):  # one more page than list_objects_v2's 1000
        client.put_object(Bucket=name, Key=f"many/{i:04d}.txt", Body=b"x")
    assert len(open_storage(f"s3://{name}/many").list()) == 1005


def test_a_flat_listing_holds_a_folders_own_objects_on_both_storages(bucket, tmp_path):
    name, client = bucket
    for key in ("top/a.png", "top/b.png", "top/sub/c.png", "top/sub/deeper/d.png"):
        client.put_object(Bucket=name, Key=key, Body=b"x")
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(b"x")
    for storage in (open_storage(f"s3://{name}/top"), LocalStorage(tmp_path / "top")):
        assert sorted(o.key for o in storage.list(flat=True)) == ["a.png", "b.png"]
        assert sorted(o.key for o in storage.list("sub", flat=True)) == ["sub/c.png"]
        assert len(storage.list()) == 4


def test_s3_missing_bucket_is_a_clear_error(s3_endpoint):
    with pytest.raises(MissingObjectError, match="s3://no-such-bucket-here/"):
        open_storage("s3://no-such-bucket-here/x/").list()


def test_local_write_failing_midway_leaves_no_partial_file(tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path)
    storage.write("a.png", b"old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        storage.write("a.png", b"new-but-interrupted")
    with pytest.raises(OSError):
        storage.write("b.png", b"never")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != TEMP_DIR) == ["a.png"]
    assert not list((tmp_path / TEMP_DIR).iterdir())
    assert (tmp_path / "a.png").read_bytes() == b"old"


def test_split_uri():
    storage, key = split_uri("s3://bkt/a/b/c.png")
    assert (storage.uri, key) == ("s3://bkt/a/b/", "c.png")
    storage, key = split_uri("/tmp/x/y.csv")
    assert (storage.uri, key) == ("/tmp/x", "y.csv")


def test_a_file_or_folder_in_the_way_of_a_write_is_one_line_naming_it(tmp_path):
    """Manifest outputs "o/x" and "o/x.png/y": old, the second write raised a bare FileExistsError
    (NotADirectoryError, IsADirectoryError the other way round): a traceback, no file named."""
    out = LocalStorage(str(tmp_path))
    out.write("o/x.png", b"1")
    with pytest.raises(StorageError, match=r"o/x.png/y.png: cannot write: .* in the way"):
        out.write("o/x.png/y.png", b"2")
    out.write("p/y.png/z.png", b"3")
    with pytest.raises(StorageError, match=r"p/y.png: cannot write: .* in the way"):
        out.write("p/y.png", b"4")
    assert not list((tmp_path / TEMP_DIR).iterdir())


@pytest.mark.parametrize("uri", ["s3://bkt/c//a.png", "s3://bkt//a.png", "s3://bkt/x.png/", "s3://bkt/c/./a.png",
                                 "s3://bkt/c\\a.png"])
def test_an_s3_object_uri_that_folds_as_a_path_is_refused(uri):
    """Old: "s3://bkt/c//a.png" in a manifest read the object c/a.png, another key, and the report
    named the one written (a listing refuses these keys for that reason)."""
    with pytest.raises(StorageError, match="another object"):
        split_uri(uri)


def test_only_transient_errors_are_retried(bucket, monkeypatch):
    import boto3
    from botocore.config import Config

    from tasks import storage as storage_mod

    name, _ = bucket
    with pytest.raises(MissingObjectError) as missing:
        open_storage(f"s3://{name}/").read("nope.png")
    assert not is_transient(missing.value)
    with pytest.raises(UnsafeKeyError) as unsafe:
        open_storage(f"s3://{name}/").read("../x")
    assert not is_transient(unsafe.value)

    with socket.socket() as s:  # a port where nothing listens: connection refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    client = boto3.client("s3", endpoint_url=dead, config=Config(retries={"max_attempts": 1}, connect_timeout=2))
    monkeypatch.setattr(storage_mod, "s3_client", lambda credentials=None: client)
    with pytest.raises(StorageError) as refused:
        open_storage(f"s3://{name}/").read("a.png")
    assert is_transient(refused.value) and f"s3://{name}/a.png" in str(refused.value)
    assert is_transient(ConnectionResetError()) and not is_transient(ValueError("bad pixels"))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_local_outputs_get_the_umask_permissions(tmp_path, umask, mode):
    """The umask in force at the write, not one captured at import (mkstemp alone gives 0600)."""
    old = os.umask(umask)
    try:
        LocalStorage(tmp_path).write("a.png", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == mode


def test_temp_files_are_outside_the_listing_and_a_dead_writers_are_cleaned(tmp_path):
    import subprocess

    storage = LocalStorage(tmp_path)
    storage.write("a.png", b"x")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / TEMP_DIR / f"{dead.pid}-crashed").write_bytes(b"partial")
    (tmp_path / TEMP_DIR / f"{os.getpid()}-writing").write_bytes(b"in progress")
    assert [i.key for i in storage.list()] == ["a.png"]
    assert storage.clean_temp() == 1
    assert [p.name for p in (tmp_path / TEMP_DIR).iterdir()] == [f"{os.getpid()}-writing"]


def test_a_temp_folder_that_is_a_link_is_neither_cleaned_nor_written_through(tmp_path):
    """.nst-tmp made a link to another folder (by mistake or on purpose): clean_temp removed every
    file there not named like a live writer's, outside the output, and writes went through it."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("keep me")
    root = tmp_path / "out"
    root.mkdir()
    (root / TEMP_DIR).symlink_to(elsewhere, target_is_directory=True)
    storage = LocalStorage(root)
    with pytest.raises(StorageError, match=f"{TEMP_DIR}.*not a folder of the output"):
        storage.clean_temp()
    with pytest.raises(StorageError, match=f"{TEMP_DIR}.*not a folder of the output"):
        storage.write("a.png", b"x")
    assert [p.name for p in elsewhere.iterdir()] == ["notes.txt"]


def test_a_folder_inside_the_temp_folder_is_left_alone(tmp_path):
    storage = LocalStorage(tmp_path)
    (tmp_path / TEMP_DIR / "sub").mkdir(parents=True)
    assert storage.clean_temp() == 0  # old: IsADirectoryError, and every later run failed at preflight

def test_another_machines_temp_file_in_a_shared_folder_is_left_to_finish(tmp_path):
    """An output folder shared by several machines (NFS): a chunk run on another GPU machine is
    writing an image while this run starts and cleans the temp folder. Its writer's pid means
    nothing here (old: no such process here, so its temp file was removed and its rename failed).
    Only a day-old one, whose machine is surely done with it, is removed."""
    import subprocess

    storage = LocalStorage(tmp_path)
    storage.write("a.png", b"x")
    dead = subprocess.Popen(["true"])
    dead.wait()
    temp = tmp_path / TEMP_DIR
    (temp / f"{dead.pid}-{'0' * 32}.gpu-2.example").write_bytes(b"another machine, writing")
    (temp / f"{dead.pid}-{'1' * 32}.gpu-3.example").write_bytes(b"another machine, gone")
    old = time.time() - 2 * 86400
    os.utime(temp / f"{dead.pid}-{'1' * 32}.gpu-3.example", (old, old))
    assert storage.clean_temp() == 1
    assert [p.name for p in temp.iterdir()] == [f"{dead.pid}-{'0' * 32}.gpu-2.example"]
    storage.write("b.png", b"y")  # this machine's own temp names carry its host too
    assert [p.name for p in temp.iterdir()] == [f"{dead.pid}-{'0' * 32}.gpu-2.example"]


def test_a_container_sharing_this_host_name_keeps_its_temp_files(tmp_path):
    """Containers with the host's name (host networking) share an output folder, each with pids of
    its own: the other one's writer pid means nothing here, whatever the host name says (old: a
    name that carried only the host name was judged by its pid here, and removed)."""
    import socket
    import subprocess

    if not Path("/proc/self/ns/pid").exists():
        pytest.skip("no pid namespace to tell apart off Linux")
    dead = subprocess.Popen(["true"])
    dead.wait()
    temp = tmp_path / TEMP_DIR
    temp.mkdir()
    host = socket.gethostname()
    others = sorted([f"{dead.pid}-{'2' * 32}.{host}", f"{dead.pid}-{'3' * 32}.{host}.{'f' * 12}"])
    for name in others:
        (temp / name).write_bytes(b"the other container, writing")
    assert LocalStorage(tmp_path).clean_temp() == 0
    assert sorted(p.name for p in temp.iterdir()) == others


def test_s3_client_makes_one_attempt_with_timeouts(s3_endpoint):
    from tasks import storage as storage_mod

    config = storage_mod.s3_client().meta.config
    assert config.retries["total_max_attempts"] == 1  # the retry budget is storage.retrying, not boto's
    assert config.connect_timeout and config.read_timeout


def test_errors_without_an_http_response_are_transient_not_a_crash(bucket, monkeypatch):
    from botocore.exceptions import CredentialRetrievalError, IncompleteReadError, ReadTimeoutError

    from tasks import storage as storage_mod

    name, _ = bucket
    for err in (IncompleteReadError(actual_bytes=3, expected_bytes=10),
                ReadTimeoutError(endpoint_url="http://x"),
                CredentialRetrievalError(provider="sso", error_msg="refresh failed")):
        class Client:
            def get_object(self, **kw):
                raise err

            head_object = get_object

        monkeypatch.setattr(storage_mod, "s3_client", lambda credentials=None: Client())
        s3 = open_storage(f"s3://{name}/")
        with pytest.raises(StorageError) as caught:
            s3.read("a.png")
        assert is_transient(caught.value), err
        with pytest.raises(StorageError):
            s3.exists("a.png")


def test_writing_into_a_missing_bucket_says_so(s3_endpoint):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        open_storage("s3://no-such-bucket-here/out/").write("_runs/x", b"x")


def test_an_endpoint_that_never_answers_fails_in_bounded_time(silent_s3):
    """Accepts the connection, never answers: the read timeout and the one retry budget end it."""
    from tasks import storage as storage_mod

    with pytest.raises(StorageError, match="Timeout") as caught:
        storage_mod.retrying(lambda: open_storage("s3://bkt/").read("a.png"))
    assert is_transient(caught.value)
    assert len(silent_s3) == 3  # one connection per attempt: no hidden boto retries, then it gives up


def test_two_credentials_in_one_process_each_sign_with_their_own_keys(bucket, s3_endpoint, monkeypatch):
    """Credentials are values: two storages opened with different keys, used at the same time from
    several threads, each sign every request with their own access key (seen on the requests boto
    sends). Old code: one process-global "active" block signed for every storage."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    import botocore.endpoint

    from tasks.credentials import StorageCredentials
    from tasks.storage import presigned_url

    name, _ = bucket
    signed: list[tuple[str, str]] = []
    real_send = botocore.endpoint.Endpoint._send

    def send(self, request):
        auth = request.headers.get("Authorization") or b""
        auth = auth.decode() if isinstance(auth, bytes) else auth
        signed.append((request.url, re.search(r"Credential=([^/]+)/", auth).group(1)))
        return real_send(self, request)

    monkeypatch.setattr(botocore.endpoint.Endpoint, "_send", send)
    alpha, beta = (StorageCredentials(block=who, access_key_id=f"AKID{who.upper()}", secret_access_key=f"secret-{who}",
                                      region_name="us-east-1", endpoint_url=s3_endpoint) for who in ("alpha", "beta"))
    stores = {"alpha": open_storage(f"s3://{name}/alpha/", alpha), "beta": open_storage(f"s3://{name}/beta/", beta)}
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: stores["alpha" if i % 2 else "beta"].write(f"{i}.txt", b"x"), range(8)))
    assert stores["alpha"].read("1.txt")[0] == b"x" and stores["beta"].list()
    assert len(signed) >= 10
    for url, key_id in signed:
        assert key_id == ("AKIDALPHA" if f"/{name}/alpha/" in url else "AKIDBETA"), (url, key_id)
    assert "AKIDALPHA" in presigned_url(f"s3://{name}/alpha/1.txt", 60, alpha)
    assert "AKIDBETA" in presigned_url(f"s3://{name}/beta/0.txt", 60, beta)


def test_clients_are_cached_by_the_credentials_value_whose_repr_shows_no_secret():
    from tasks import storage as storage_mod
    from tasks.credentials import StorageCredentials

    def creds(secret: str) -> StorageCredentials:
        return StorageCredentials(block="b", access_key_id="AKIDX", secret_access_key=secret, session_token="tok-xyz",
                                  region_name="us-east-1", endpoint_url="http://127.0.0.1:9")

    one, same, other = creds("s3cr3t-one"), creds("s3cr3t-one"), creds("s3cr3t-two")
    assert hash(one) == hash(same) and one == same and one != other
    assert storage_mod.s3_client(one) is storage_mod.s3_client(same)
    assert storage_mod.s3_client(one) is not storage_mod.s3_client(other)  # a rotated key: a client of its own
    for text in (repr(one), str(one), repr(open_storage("s3://bkt/x/", one).credentials)):
        assert "s3cr3t" not in text and "AKIDX" not in text and "tok-xyz" not in text and "'b'" in text, text
    storage_mod.clear_clients()
    assert storage_mod._clients == {}


# --- a storage endpoint that dies mid-run: StorageHealth ends the retrying -------------------------------

class Clock:
    def __init__(self):
        self.now = 100.0

    def monotonic(self):
        return self.now


def test_storage_is_declared_unreachable_after_every_attempt_failed_for_the_outage_time(monkeypatch):
    from datetime import datetime, timezone

    from tasks import storage
    from tasks.storage import StorageHealth

    clock = Clock()
    monkeypatch.setattr(storage.time, "monotonic", clock.monotonic)
    health = StorageHealth(outage_s=120, min_failures=3)
    first = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    health.failed(clock.now, first)
    clock.now += 60
    health.failed(clock.now - 1, first)
    health.failed(clock.now, first)
    assert health.unreachable_since() is None  # three failures, but only for 60 s
    clock.now += 59
    assert health.unreachable_since() is None
    health.succeeded()  # an answer (even a 404) resets the streak
    clock.now += 100
    assert health.unreachable_since() is None
    health.failed(clock.now, first)
    clock.now += 121
    assert health.unreachable_since() is None  # a long streak of one failure is not enough
    health.failed(clock.now, first)
    health.failed(clock.now, first)
    assert health.unreachable_since() == first
    health.succeeded()  # once declared, the run ends: a late answer does not undo it
    assert health.unreachable_since() == first


def test_a_blip_long_over_is_no_outage_however_long_the_run_makes_no_call_after_it(monkeypatch):
    """Old: a fan-out parent idle between two chunk endings (or a pipeline computing a pair) after a
    30 s blip declared the storage unreachable 120 s after its first failure, and cancelled every
    chunk run, work in flight lost. Now evidence no failure renewed for FRESH_S is checked with one
    probe attempt first; a storage down all along fails it and is declared as before."""
    from datetime import datetime, timezone

    from tasks import storage
    from tasks.storage import FRESH_S, StorageHealth

    clock = Clock()
    monkeypatch.setattr(storage.time, "monotonic", clock.monotonic)
    first = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)

    def down():
        raise StorageError("s3://b/o/_runs: ConnectTimeoutError", transient=True)

    probes = []
    back, dead, bare = (StorageHealth(outage_s=120, min_failures=3, probe=lambda: probes.append(clock.now)),
                        StorageHealth(outage_s=120, min_failures=3, probe=down), StorageHealth(outage_s=120))
    for _ in range(4):  # a chunk's merge: its report and sidecars, retried through a 30 s blip
        for health in (back, dead, bare):
            health.failed(clock.now, first)
        clock.now += 10
    assert back.unreachable_since() is None and not probes  # fresh, and only 30 s of it
    clock.now += 600  # no call: the run waits on chunk runs, or computes
    assert back.unreachable_since() is None and len(probes) == 1  # the probe answered: the blip is over
    back.failed(clock.now, first)  # one new failure starts a new streak, not the old one's 650 s
    assert back.unreachable_since() is None and len(probes) == 1
    assert dead.unreachable_since() == first  # down all along: the probe failed too
    assert bare.unreachable_since() == first  # no probe to ask (a caller without a storage): as before
    # evidence renewed within FRESH_S needs no probe: a real outage with calls still failing
    clock.now += 200
    for _ in range(3):
        back.failed(clock.now, first)
    clock.now += FRESH_S - 1
    assert back.unreachable_since() == first and len(probes) == 1


def test_writes_refused_in_a_row_declare_the_storage_refusing_and_s3s_refusals_are_told_apart(bucket):
    """A full disk or expired credentials answer every write alike: after WRITE_REFUSALS in a row
    (a write that goes through resets the count) the run stops, naming the last refusal."""
    from datetime import datetime, timezone

    from tasks.storage import WRITE_REFUSALS, StorageHealth, StorageUnreachableError, WriteRefusedError

    health, first = StorageHealth(), datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    full = WriteRefusedError("/out/a.png: cannot write: No space left on device")
    for _ in range(WRITE_REFUSALS - 1):
        health.wrote(full, first)
    health.wrote(None, first)  # space was freed meanwhile
    for _ in range(WRITE_REFUSALS - 1):
        health.wrote(full, first)
    assert health.stop_error() is None
    health.wrote(full, datetime(2025, 1, 2, 3, 9, 0, tzinfo=timezone.utc))
    assert str(health.stop_error()) == "storage refuses writes since 03:04:05 UTC (/out/a.png: cannot write: No space left on device)"
    # a chunk run's refused writes are its own (its worker's mount, its token): never a parent's outage
    assert StorageUnreachableError.parse(str(health.stop_error())) is None
    # S3: a bucket gone (or access denied, an expired token) refuses the next write too; never retried
    name, client = bucket
    with pytest.raises(WriteRefusedError, match="does not exist"):
        S3Storage(name + "-gone", "out/").write("a.png", b"x")


def test_the_outage_time_comes_from_the_environment(monkeypatch):
    from tasks.storage import OUTAGE_S, StorageHealth

    assert OUTAGE_S == 120 and StorageHealth().outage_s == 120
    monkeypatch.setenv("NST_STORAGE_OUTAGE_S", "2.5")
    assert StorageHealth().outage_s == 2.5


def test_retrying_stops_at_once_when_storage_is_declared_unreachable(monkeypatch):
    from tasks import storage
    from tasks.storage import StorageHealth, StorageUnreachableError, retrying

    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    health = StorageHealth(outage_s=0, min_failures=2)
    calls = []

    def dead():
        calls.append(1)
        raise StorageError("s3://b/k: ReadTimeoutError", transient=True)

    with pytest.raises(StorageUnreachableError, match=r"storage unreachable since \d\d:\d\d:\d\d UTC"):
        retrying(dead, delays=(1, 1, 1, 1, 1), health=health)
    assert len(calls) == 2  # the second failure declared the outage: no third attempt
    with pytest.raises(StorageUnreachableError) as err:
        retrying(dead, health=health)  # a call after the declaration makes no attempt at all
    assert len(calls) == 2
    again = pickle.loads(pickle.dumps(err.value))  # as Prefect stores a failed state's exception
    assert type(again) is StorageUnreachableError and again.since == err.value.since


def test_an_error_that_is_an_answer_keeps_storage_reachable(monkeypatch):
    from tasks.storage import StorageHealth, retrying

    health = StorageHealth(outage_s=0, min_failures=1)

    def missing():
        raise MissingObjectError("s3://b/k: no such object")

    with pytest.raises(MissingObjectError):
        retrying(missing, health=health)
    assert health.unreachable_since() is None


@pytest.mark.parametrize("max_bytes", [None, 10**6])
def test_a_body_cut_short_is_a_transient_error_not_a_short_object(cut_short_s3, max_bytes):
    """A read capped at max_bytes (every image and manifest read) bypassed botocore's length check:
    40,000 of 100,000 bytes came back as the object, then failed to decode as "corrupt" (not
    retried, and kept in the run's cache), or a manifest cut at a line end lost rows silently."""
    from tasks import storage as storage_mod

    with pytest.raises(StorageError, match="40000 of 100000|IncompleteRead") as caught:
        storage_mod.retrying(lambda: open_storage("s3://bkt/").read("a.png", max_bytes))
    assert is_transient(caught.value)
    assert len(cut_short_s3) == 3  # retried like any transient failure, then given up


@pytest.mark.parametrize("code,status", [("TooManyRequests", 429), ("SlowDown", 503), ("", 429)])
def test_a_request_rate_refusal_is_retried(code, status):
    """S3-compatible stores (MinIO, Ceph, R2) answer a request burst with HTTP 429: it was a final
    error, so a busy store failed pairs that a later attempt would have done."""
    from botocore.exceptions import ClientError

    err = ClientError({"Error": {"Code": code, "Message": "reduce your request rate"},
                       "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    assert is_transient(S3Storage("bkt", "in/")._wrap(err, "a.png"))


def test_a_presigned_link_lasts_no_longer_than_the_temporary_credentials_that_sign_it(bucket, temporary_credentials):
    """A worker with an IAM role signs with credentials that expire in hours; S3 refuses a link
    once they have, whatever its X-Amz-Expires. Old: 7 days asked, 7 days written in the link
    (and in the artifacts), dead after the role's hours. Now the link states their expiry."""
    from datetime import datetime, timezone
    from urllib.parse import parse_qs, urlparse

    from tasks.storage import presigned_url, signing_expiry

    name, client = bucket
    client.put_object(Bucket=name, Key="out/a.png", Body=b"x")
    assert signing_expiry(open_storage(f"s3://{name}/out/").credentials) == (True, temporary_credentials)
    signed = datetime.now(timezone.utc)  # at or before the signing: what was left then is at most this
    query = parse_qs(urlparse(presigned_url(f"s3://{name}/out/a.png", 7 * 24 * 3600)).query)
    assert query["X-Amz-Security-Token"] == ["temporary-session-token"]
    left = (temporary_credentials - signed).total_seconds()
    assert left - 60 <= int(query["X-Amz-Expires"][0]) <= left


def test_long_lived_keys_sign_links_for_the_whole_time_asked(bucket):
    from urllib.parse import parse_qs, urlparse

    from tasks.storage import presigned_url, signing_expiry

    name, _ = bucket
    assert signing_expiry(open_storage(f"s3://{name}/out/").credentials) == (False, None)
    query = parse_qs(urlparse(presigned_url(f"s3://{name}/out/a.png", 7 * 24 * 3600)).query)
    assert query["X-Amz-Expires"] == [str(7 * 24 * 3600)]


def test_a_folder_says_whether_it_holds_names_that_differ_only_in_case_as_one_file(tmp_path, bucket, monkeypatch):
    """The probe asks the folder itself: Linux's folders tell "Out" from "out", so a manifest naming
    both there gets both; a folder that answers for the upper-cased name (macOS, Windows, an ext4
    casefold folder: stood in for here, no such file system can be mounted in a test) holds one.
    S3 keys always tell case apart. The probe leaves nothing behind."""
    import tasks.storage as storage_module

    storage = LocalStorage(tmp_path / "out")
    assert storage.folds_case() is False
    assert [p.name for p in (tmp_path / "out" / TEMP_DIR).iterdir()] == []

    real_exists = os.path.exists
    monkeypatch.setattr(storage_module.os.path, "exists", lambda p: real_exists(str(p).lower()) or real_exists(p))
    assert storage.folds_case() is True
    assert [p.name for p in (tmp_path / "out" / TEMP_DIR).iterdir()] == []
    assert S3Storage(bucket[0], "out").folds_case() is False

    # a probe that cannot be removed, or a temp folder that is a link: an answer, not a crash of the run
    monkeypatch.setattr(storage_module.os.path, "exists", real_exists)
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: (_ for _ in ()).throw(PermissionError(13, "no")))
    assert storage.folds_case() is False
    monkeypatch.undo()
    other = tmp_path / "linked"
    other.mkdir()
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / TEMP_DIR).symlink_to(other)
    assert LocalStorage(tmp_path / "out2").folds_case() is True and list(other.iterdir()) == []


def test_an_object_uri_of_a_scheme_the_tool_does_not_read_is_refused_by_scheme(tmp_path, monkeypatch):
    """Old: read_uri("https://user:pw@host/vgg.pth") read the relative path ./https:/user:pw@host/vgg.pth
    and said "no such file", naming the password."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match="unsupported scheme 'https'") as err:
        read_uri("https://user:pw@host/vgg.pth")
    assert "pw@" not in str(err.value)


def test_a_folder_on_a_mount_that_stopped_answering_is_refused_in_bounded_time(tmp_path, monkeypatch):
    """Resolving a folder reads the mount: a hung one held LocalStorage's constructor (every input's
    fetch builds one) for ever."""
    import threading
    from pathlib import Path

    monkeypatch.setenv("NST_LOCAL_IO_TIMEOUT_S", "0.2")
    hung, real = threading.Event(), Path.resolve

    def resolve(self, *args, **kwargs):
        if "hung" in str(self):
            hung.wait(30)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "resolve", resolve)
    started = time.monotonic()
    try:
        with pytest.raises(StorageError, match="got no answer within 0.2 s") as err:
            LocalStorage(tmp_path / "hung")
        assert err.value.transient and time.monotonic() - started < 5
    finally:
        hung.set()


@pytest.mark.parametrize("op", ["write", "create"])
def test_a_folder_a_write_cannot_make_is_a_refused_write(tmp_path, monkeypatch, op):
    """A read-only remount or a full disk met where a write first makes its folder (a manifest's
    "2026-12-07/x"): a bare OSError, so the run's rule (three refused writes stop it) never heard of
    it, and every pair ran its whole optimization to fail with a traceback."""
    import errno

    from tasks.storage import WriteRefusedError

    out = LocalStorage(tmp_path / "out")
    out.write("_runs/r.json", b"{}")  # the run's write probe: the output and its temp folder exist

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(WriteRefusedError, match="2026-12-07/x.png: cannot write: Read-only file system"):
        getattr(out, op)("2026-12-07/x.png", b"data")


def test_a_key_under_a_file_is_nothing_there_to_look_at_or_delete(tmp_path):
    """An earlier run left the file "o/x.png"; tonight's manifest asks for "o/x.png/y": looking at or
    deleting that key raised a bare NotADirectoryError (a traceback for the pair) where nothing is there."""
    out = LocalStorage(tmp_path / "out")
    out.write("o/x.png", b"data")
    assert out.info("o/x.png/y.png") is None and out.exists("o/x.png/y.png") is False
    out.delete("o/x.png/y.png")
    assert out.read("o/x.png")[0] == b"data"


@pytest.mark.parametrize("uri", ["{root}", "file://{root}"])
def test_a_file_at_the_root_of_the_file_system_is_read_there(tmp_path, monkeypatch, uri):
    """"/pairs.jsonl" (a container's bind mount) was read from the working folder: its folder, "",
    was taken for "."."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nst-test-decoy.json").write_bytes(b"the working folder's")
    storage, key = split_uri(uri.format(root="/nst-test-decoy.json"))
    assert (storage.uri, key) == ("/", "nst-test-decoy.json")
