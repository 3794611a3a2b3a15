"""One small interface over ``s3://bucket/prefix`` (boto3) and local folders.

Keys are relative POSIX paths under a storage's root. A key that would resolve outside the
root (``..``, an absolute path, a URI of another bucket) raises ``UnsafeKeyError``: no write
can land outside the output prefix, whatever a manifest says. boto3 appears only in this module.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from nst_core.errors import NSTError

__all__ = [
    "StorageError",
    "MissingObjectError",
    "UnsafeKeyError",
    "ObjectInfo",
    "Storage",
    "LocalStorage",
    "S3Storage",
    "open_storage",
    "split_uri",
    "read_uri",
    "safe_key",
    "is_transient",
]


class StorageError(NSTError):
    """A storage operation failed; the message names the URI. ``transient``: worth retrying."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class MissingObjectError(StorageError):
    """The object does not exist (not transient: never retried)."""


class UnsafeKeyError(StorageError):
    """A key would resolve outside its storage root."""


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
    """Interface: list / read / write / exists / delete under one root URI."""

    uri: str

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        raise NotImplementedError

    def read(self, key: str) -> tuple[bytes, str]:
        """(bytes, identity)."""
        raise NotImplementedError

    def write(self, key: str, data: bytes, content_type: str | None = None) -> None:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def identity(self, key: str) -> str:
        """The object's identity without downloading it where the backend allows."""
        raise NotImplementedError

    def uri_for(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{safe_key(key)}"


class LocalStorage(Storage):
    """A local folder. Writes are atomic: a temp file in the same folder, then a rename."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / safe_key(key)).resolve()
        if not path.is_relative_to(self.root):  # a symlink pointing out of the root
            raise UnsafeKeyError(f"{key!r} resolves outside {self.root}")
        return path

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._path(prefix) if prefix else self.root
        if not base.exists():
            return []
        if not base.is_dir():
            raise StorageError(f"{base} is not a folder")
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith(".nst-tmp-"):
                    continue
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                out.append(ObjectInfo(key, path.stat().st_size, ""))
        return out

    def read(self, key: str) -> tuple[bytes, str]:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise MissingObjectError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise MissingObjectError(f"{path}: is a folder, not a file") from None
        return data, _sha256(data)

    def identity(self, key: str) -> str:
        return self.read(key)[1]

    def write(self, key: str, data: bytes, content_type: str | None = None) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".nst-tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


_clients: dict[int, object] = {}
_clients_lock = threading.Lock()


def _s3_client():
    """One boto3 client per process (clients are thread-safe): default credential chain,
    AWS_ENDPOINT_URL_S3, adaptive retries."""
    import boto3
    from botocore.config import Config

    with _clients_lock:
        key = os.getpid()
        if key not in _clients:
            config = Config(retries={"mode": "adaptive", "max_attempts": 8}, max_pool_connections=32)
            _clients[key] = boto3.session.Session().client("s3", config=config)
        return _clients[key]


_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable"}


def _is_missing(err: Exception) -> bool:
    code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
    return code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket")


class S3Storage(Storage):
    """``s3://bucket/prefix``. Large objects go through boto3's managed (multipart) transfers."""

    def __init__(self, bucket: str, prefix: str = ""):
        if not bucket:
            raise StorageError("an s3:// URI needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = safe_key(prefix) + "/" if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}"

    @property
    def client(self):
        return _s3_client()

    def _key(self, key: str) -> str:
        return self.prefix + safe_key(key)

    def _wrap(self, err: Exception, key: str) -> StorageError:
        from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

        uri = f"s3://{self.bucket}/{self._key(key) if key else self.prefix}"
        if _is_missing(err):
            return MissingObjectError(f"{uri}: no such object")
        if isinstance(err, ClientError):
            e = err.response.get("Error", {})
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            transient = status >= 500 or e.get("Code") in _TRANSIENT_CODES
            return StorageError(f"{uri}: {e.get('Code', 'error')}: {e.get('Message', '')}".rstrip(": "),
                                transient=transient)
        # Connection refused/reset, timeouts: the endpoint may come back.
        transient = isinstance(err, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError))
        return StorageError(f"{uri}: {type(err).__name__}: {err}", transient=transient)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full = self.prefix + (safe_key(prefix).rstrip("/") + "/" if prefix else "")
        out = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(obj["Key"][len(self.prefix):], obj["Size"], obj["ETag"].strip('"')))
        except Exception as err:
            raise self._wrap(err, prefix) from None
        return out

    def read(self, key: str) -> tuple[bytes, str]:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return resp["Body"].read(), resp["ETag"].strip('"')
        except Exception as err:
            raise self._wrap(err, key) from None

    def identity(self, key: str) -> str:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ETag"].strip('"')
        except Exception as err:
            raise self._wrap(err, key) from None

    def write(self, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else None
        try:
            # upload_fileobj is boto3's managed transfer: multipart above 8 MB, retried parts.
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key), ExtraArgs=extra)
        except Exception as err:
            raise self._wrap(err, key) from None

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


def open_storage(uri: str) -> Storage:
    """``s3://bucket/prefix`` -> S3Storage; a folder path or ``file://`` URI -> LocalStorage."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return S3Storage(parsed.netloc, parsed.path.lstrip("/"))
    if parsed.scheme == "file":
        return LocalStorage(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise StorageError(f"{uri}: unsupported scheme {parsed.scheme!r}; use s3://bucket/prefix or a folder")
    return LocalStorage(uri)


def split_uri(uri: str) -> tuple[Storage, str]:
    """An object URI -> (storage of its folder, key)."""
    parsed = urlparse(uri)
    path = parsed.path if parsed.scheme in ("s3", "file") else uri
    folder, _, name = path.rstrip("/").rpartition("/")
    if not name:
        raise StorageError(f"{uri}: not an object URI")
    if parsed.scheme == "s3":
        return S3Storage(parsed.netloc, folder.lstrip("/")), name
    return LocalStorage(folder or "."), name


def read_uri(uri: str) -> bytes:
    """Bytes of one object by full URI (weights, manifests)."""
    storage, key = split_uri(uri)
    return storage.read(key)[0]


def is_transient(err: BaseException) -> bool:
    """True for errors worth retrying: throttling, 5xx, connection trouble. Never a missing key."""
    if isinstance(err, StorageError):
        return err.transient
    return isinstance(err, (ConnectionError, TimeoutError))
