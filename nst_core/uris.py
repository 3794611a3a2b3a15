"""``parse_uri``: the one reading of a storage URI (``s3://bucket/key``, ``file:`` URIs, plain
paths), shared by the engine's weights reader and the batch's storage."""

from __future__ import annotations

import os
from urllib.parse import unquote, urlparse

__all__ = ["parse_uri", "host_problem", "absolute_local"]


def parse_uri(uri: str) -> tuple[str, str, str]:
    """(scheme, bucket, path) of an ``s3://`` or ``file:`` URI, an S3 path verbatim, a file path
    percent-decoded (``Path.as_uri()`` writes a space as %20); anything else: (its scheme or "", "",
    the string as is). Not ``urlparse``'s path: '#' and '?' are plain characters of S3 keys and file
    names ("IMG #3.jpg"), not a fragment or a query."""
    scheme = urlparse(uri).scheme
    rest = uri[len(scheme) + 1:]
    if scheme not in ("s3", "file"):
        return scheme, "", uri
    if not rest.startswith("//"):
        return scheme, "", unquote(rest)  # file:/abs/path
    bucket, slash, path = rest[2:].partition("/")
    if scheme == "s3":
        return scheme, bucket, slash + path
    if bucket.lower() == "localhost":  # file://localhost/x is file:///x (RFC 8089)
        bucket = ""
    return scheme, bucket, unquote(slash + path)


def host_problem(uri: str) -> str:
    """Why a ``file://`` URI cannot be read here ("" if it can): it names another host. Not read as a
    relative path: "file://out/sub" would be "/sub" by the URI's rules and "out/sub" by a reader's."""
    scheme, host, _ = parse_uri(uri)
    if scheme == "file" and host:  # named without a user:password@ it may carry
        name = host.rpartition("@")[2]
        return (f"{uri.replace(host, name, 1)}: a file URI with a host ({name!r}) is not a path on this machine; "
                f"use file:///absolute/path or a plain folder path")
    return ""


def absolute_local(uri: str) -> str:
    """``uri`` as another process in another working folder reads it: a local path or ``file:`` URI
    as an absolute path (from this process's working folder; links kept as spelled), anything else
    (``s3://``, a file URI naming a host, "") as it is."""
    scheme, host, path = parse_uri(uri)
    if not uri or scheme not in ("", "file") or host:
        return uri
    # not abspath, which folds "link/.." to the link's own folder where the file system reads the
    # link target's parent: only "." and empty segments go
    joined = os.path.join(os.getcwd(), os.path.expanduser(path))
    return "/" + "/".join(part for part in joined.split("/") if part not in ("", "."))
