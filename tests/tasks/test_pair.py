import pytest

from tasks import pair
from tasks.storage import MissingObjectError, StorageError

pytestmark = pytest.mark.usefixtures("prefect_api")


def flaky(failures: list[Exception]):
    calls = []

    def read(uri):
        calls.append(uri)
        if failures:
            raise failures.pop(0)
        return b"bytes"

    return read, calls


def test_fetch_retries_transient_errors(monkeypatch):
    read, calls = flaky([StorageError("s3://b/k: SlowDown", transient=True),
                         StorageError("s3://b/k: EndpointConnectionError", transient=True)])
    monkeypatch.setattr(pair, "read_uri", read)
    assert pair.fetch_image.with_options(retry_delay_seconds=0)("s3://b/k") == b"bytes"
    assert len(calls) == 3


def test_fetch_does_not_retry_a_missing_key(monkeypatch):
    read, calls = flaky([MissingObjectError("s3://b/k: no such object")])
    monkeypatch.setattr(pair, "read_uri", read)
    with pytest.raises(MissingObjectError):
        pair.fetch_image.with_options(retry_delay_seconds=0)("s3://b/k")
    assert len(calls) == 1
