"""Turning a BatchSource into pairs with output names (DESIGN.md storage contract).

Output of one pair: ``{content_stem}__{style_stem}__{key8}.{ext}`` plus the sidecar
``{content_stem}__{style_stem}__{key8}.json``; key8 starts a SHA-256 of the content and style
identities, the params (all but ``device``, which does not change what is asked for) and the
weights id. A manifest's ``output`` column names the file instead (under the output prefix only).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urlparse

from tasks.models import IMAGE_EXTENSIONS, BatchSource
from nst_core.errors import NSTError
from nst_core.params import StyleParams

from .storage import Storage, StorageError, UnsafeKeyError, open_storage, read_uri, safe_key, split_uri

__all__ = ["PreflightError", "PairPlan", "SourceEntry", "list_images", "read_manifest", "source_entries",
           "pair_key", "plan_pairs", "EXTENSIONS"]

EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class PreflightError(NSTError):
    """The run cannot start: the message says what to fix."""


@dataclass(frozen=True)
class SourceEntry:
    content: str  # URI
    style: str  # URI
    output: str | None = None  # explicit output name from a manifest
    where: str = ""  # "manifest.jsonl line 3", for error messages
    content_id: str = ""  # identities known from a listing (S3 ETag); "" = look up when planning
    style_id: str = ""


@dataclass(frozen=True)
class PairPlan:
    index: int
    content: str
    style: str
    style_identity: str
    name: str  # output base key, relative to the output root, no extension
    image_key: str
    sidecar_key: str
    key: str  # full SHA-256 hex


def _is_image(key: str) -> bool:
    return PurePosixPath(key).suffix.lower() in IMAGE_EXTENSIONS


def list_images(uri: str) -> list[tuple[str, str]]:
    """(URI, identity from the listing) of the image objects under a prefix/folder, sorted by URI."""
    storage = open_storage(uri)
    return sorted((storage.uri_for(info.key), info.identity) for info in storage.list() if _is_image(info.key))


def _resolve(entry: str, base: str) -> str:
    """A manifest entry: a full URI / absolute path as is, else a key relative to the manifest's folder."""
    if urlparse(entry).scheme in ("s3", "file") or entry.startswith("/"):
        return entry
    return f"{base.rstrip('/')}/{safe_key(entry)}"


def read_manifest(uri: str) -> list[SourceEntry]:
    """Rows of a JSONL or CSV manifest. Every problem names the manifest line."""
    try:
        text = read_uri(uri).decode("utf-8-sig")
    except (StorageError, UnicodeDecodeError) as err:
        raise PreflightError(f"manifest {uri}: cannot read: {err}") from None
    base = split_uri(uri)[0].uri
    name = PurePosixPath(urlparse(uri).path).name
    rows: list[tuple[int, dict]] = []
    if name.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"content", "style"} <= {f.strip() for f in reader.fieldnames}:
            raise PreflightError(f"manifest {uri}: CSV header must name content,style[,output]")
        rows = [(i + 2, {k.strip(): (v or "").strip() for k, v in row.items() if k}) for i, row in enumerate(reader)]
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PreflightError(f"manifest {uri} line {i}: not JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise PreflightError(f"manifest {uri} line {i}: expected an object with content and style")
            rows.append((i, row))
    entries = []
    for line, row in rows:
        where = f"manifest {name} line {line}"
        content, style, output = row.get("content"), row.get("style"), row.get("output") or None
        if not isinstance(content, str) or not content or not isinstance(style, str) or not style:
            raise PreflightError(f"{where}: needs non-empty 'content' and 'style'")
        try:
            if output is not None:
                output = safe_key(str(output))
            entries.append(SourceEntry(_resolve(content, base), _resolve(style, base), output, where))
        except UnsafeKeyError as err:
            raise PreflightError(f"{where}: {err}; outputs and entries must stay under their prefix") from None
    if not entries:
        raise PreflightError(f"manifest {uri} has no rows")
    return entries


def source_entries(source: BatchSource) -> list[SourceEntry]:
    """The pairs a source names, in a stable order (style-major for cross, so targets are reused)."""
    if source.manifest:
        return read_manifest(source.manifest)
    try:
        contents, styles = list_images(source.contents), list_images(source.styles)
    except StorageError as err:
        raise PreflightError(f"source is not listable: {err}") from None
    for uri, found in ((source.contents, contents), (source.styles, styles)):
        if not found:
            raise PreflightError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {uri}")
    if source.pairing == "zip":
        if len(contents) != len(styles):
            raise PreflightError(
                f"pairing 'zip' needs equal counts: {len(contents)} content images under {source.contents} "
                f"but {len(styles)} style images under {source.styles}"
            )
        return [SourceEntry(c, s, content_id=ci, style_id=si) for (c, ci), (s, si) in zip(contents, styles)]
    return [SourceEntry(c, s, content_id=ci, style_id=si) for s, si in styles for c, ci in contents]


def pair_key(content_identity: str, style_identity: str, params: StyleParams, weights_id: str) -> str:
    """SHA-256 hex over what determines a result: both inputs, the params (not device), the weights."""
    blob = json.dumps(
        {"content": content_identity, "style": style_identity, "weights": weights_id,
         "params": params.model_dump(mode="json", exclude={"device"})},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _stem(uri: str) -> str:
    return _UNSAFE_CHARS.sub("_", PurePosixPath(urlparse(uri).path).stem) or "image"


def _identities(entries: list[SourceEntry], io_workers: int) -> dict[str, str]:
    """URI -> identity: from the source listing when known, else from one listing per folder that
    holds many of them (manifests), else HEAD / sha256, concurrently. Unreadable inputs get ''
    so their pairs fail alone later."""
    known = {u: i for e in entries for u, i in ((e.content, e.content_id), (e.style, e.style_id)) if i}
    wanted: dict[str, tuple[Storage, list[tuple[str, str]]]] = {}
    for uri in {u for e in entries for u in (e.content, e.style)} - set(known):
        storage, key = split_uri(uri)
        wanted.setdefault(storage.uri, (storage, []))[1].append((uri, key))

    def one_folder(item: tuple[Storage, list[tuple[str, str]]]) -> dict[str, str]:
        storage, keys = item
        listed: dict[str, str] = {}
        if len(keys) > 8:
            try:
                listed = {info.key: info.identity for info in storage.list() if info.identity}
            except StorageError:
                pass  # fall back to one lookup per object
        out = {}
        for uri, key in keys:
            try:
                out[uri] = listed.get(key) or storage.identity(key)
            except StorageError:
                out[uri] = ""
        return out

    with ThreadPoolExecutor(max_workers=io_workers) as pool:
        for part in pool.map(one_folder, wanted.values()):
            known.update(part)
    return known


def plan_pairs(
    entries: list[SourceEntry], params: StyleParams, weights_id: str, fmt: str, io_workers: int = 8
) -> list[PairPlan]:
    """Output names and keys for every entry. Missing inputs get an identity of '' and fail later, alone."""
    identities = _identities(entries, io_workers)
    plans, seen = [], {}
    for i, e in enumerate(entries):
        key = pair_key(identities[e.content], identities[e.style], params, weights_id)
        name = e.output or f"{_stem(e.content)}__{_stem(e.style)}__{key[:8]}"
        if PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS:
            name = str(PurePosixPath(name).with_suffix(""))
        if name.split("/")[0] == "_runs":
            raise PreflightError(f"{e.where or name}: output names may not start with _runs/ (run reports live there)")
        if name in seen:
            raise PreflightError(f"{e.where or name}: output name {name!r} is used twice (also {seen[name]})")
        seen[name] = e.where or e.content
        plans.append(PairPlan(i, e.content, e.style, identities[e.style], name,
                              f"{name}.{EXTENSIONS[fmt]}", f"{name}.json", key))
    return plans
