import pytest

from tasks import storage
from tasks.pair import ObjectCache
from tasks.storage import MissingObjectError, StorageError, retrying


def flaky(failures: list[Exception]):
    calls = []

    def read():
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return b"bytes"

    return read, calls


def test_transient_errors_are_retried_within_one_budget(monkeypatch):
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0, 0, 0))
    read, calls = flaky([StorageError("s3://b/k: SlowDown", transient=True),
                         StorageError("s3://b/k: EndpointConnectionError", transient=True)])
    assert retrying(read) == b"bytes" and len(calls) == 3
    read, calls = flaky([StorageError("503", transient=True)] * 5)
    with pytest.raises(StorageError):
        retrying(read)
    assert len(calls) == 4  # the budget: 1 + len(RETRY_DELAYS) attempts, then the error


def test_a_missing_key_is_not_retried():
    read, calls = flaky([MissingObjectError("s3://b/k: no such object")])
    with pytest.raises(MissingObjectError):
        retrying(read, delays=(0, 0))
    assert len(calls) == 1


def test_object_cache_fetches_each_object_once_even_when_asked_at_once():
    import threading

    cache, calls, gate = ObjectCache(max_bytes=100), [], threading.Event()

    def fetch(uri):
        calls.append(uri)
        gate.wait(2)
        return b"x" * 40

    threads = [threading.Thread(target=cache.get, args=("s3://b/style.png", "etag", fetch)) for _ in range(5)]
    [t.start() for t in threads]
    gate.set()
    [t.join() for t in threads]
    assert calls == ["s3://b/style.png"] and cache.fetches == 1
    cache.get("a", "1", fetch), cache.get("b", "1", fetch), cache.get("c", "1", fetch)  # 40 B each, 100 B budget
    cache.get("s3://b/style.png", "etag", fetch)
    assert calls.count("s3://b/style.png") == 2  # it was evicted by then: memory stays bounded
