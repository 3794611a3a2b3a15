"""Planning: a BatchSource -> pairs with identities, output names and keys (naming and keys:
``tasks.contract``).

Every read signs with the run's ``StorageCredentials`` (``credentials=``; default: boto3's chain).
Reads are confined to ``RunOptions.allowed_sources`` (default: the source's own prefixes, or
the manifest's folder). An input that is outside them, cannot be identified, or has an unsafe
key fails its pair at planning, with the reason; the other pairs run.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from nst_core.errors import NSTError, hide_userinfo
from nst_core.imageio import IMAGE_EXTENSIONS, MAX_INPUT_BYTES
from nst_core.params import StyleParams

from .contract import PairPlan, name_problem, output_name, pair_key
from .credentials import DEFAULT_CHAIN, StorageCredentials
from .storage import (ObjectInfo, Storage, StorageError, TooLargeError, UnsafeKeyError, open_storage, parse_uri,
                      read_uri, retrying, safe_key, split_uri)

__all__ = ["PreflightError", "SourceEntry", "list_images", "read_manifest", "source_entries",
           "default_allowed_sources", "outside_allowed", "plan_pairs", "MAX_MANIFEST_BYTES"]

#: A manifest larger than this is refused unread: a million rows of long S3 URIs fit in it, and a
#: path pointed at the wrong file (a tarball, a dataset) fails in one line instead of filling memory.
MAX_MANIFEST_BYTES = 256 * 2**20


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
    error: str = ""  # set: this pair fails at planning with this reason


def _is_image(key: str) -> bool:
    """An image by its extension; never a hidden file or one in a hidden folder (".thumbs/",
    macOS's "._a.jpg" AppleDouble files on shares), nor an S3 folder marker ("dir.png/")."""
    path = PurePosixPath(key)
    return (not key.endswith("/") and path.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") and part not in (".", "..") for part in path.parts))


def _refusal(uri: str, info: ObjectInfo) -> TooLargeError | None:
    """Why a listed input object is never read (larger than MAX_INPUT_BYTES), or None."""
    return TooLargeError(uri, info.size, MAX_INPUT_BYTES) if info.size > MAX_INPUT_BYTES else None


def list_images(uri: str, credentials: StorageCredentials = DEFAULT_CHAIN) -> list[tuple[str, str, str]]:
    """(URI, identity from the listing, error) of the image objects under a prefix/folder, sorted.

    An object whose key would leave the prefix (a ``..`` segment) is returned with an error, so
    its pairs fail alone instead of the whole listing; so is one larger than MAX_INPUT_BYTES (its
    size is in the listing: it is never read, nor hashed at planning).
    """
    storage = open_storage(uri, credentials)
    out = []
    for info in storage.list():
        if not _is_image(info.key):
            continue
        as_listed = f"{storage.uri.rstrip('/')}/{info.key}"
        try:
            uri = storage.uri_for(info.key)
        except UnsafeKeyError as err:
            out.append((as_listed, "", f"refused: {err}; rename the object"))
            continue
        if uri != as_listed:  # "a//b.png", "./b.png", "x\\y.png": keys fold as paths, and would read another object
            folded = uri[len(storage.uri.rstrip("/")) + 1:]
            out.append((as_listed, "", f"refused: key {info.key!r} would be read as {folded!r}, another key (an empty "
                                       "or '.' segment, or a backslash, folds as in a path); rename the object"))
        elif refused := _refusal(uri, info):
            out.append((uri, "", str(refused)))
        else:
            out.append((uri, info.identity, ""))
    return sorted(out)


#: A URL's scheme and its "//" (a colon alone is a file name's: ``photo:2.png``).
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+)://")


def _resolve(entry: str, base: str) -> str:
    """A manifest entry: a full URI / absolute path as is (``split_uri`` refuses an S3 key that folds
    as a path), else a path relative to the manifest's folder ``base``, read as a path: "." and
    empty segments drop, a backslash separates (a manifest written on Windows), ``..`` goes up
    (``allowed_sources`` then decides whether it may be read: by default only the manifest's
    folder). UnsafeKeyError above the bucket."""
    if parse_uri(entry)[0] in ("s3", "file") or entry.startswith("/"):
        return entry
    if scheme := _URL_SCHEME.match(entry):  # https://, gs://: never a path under the manifest's folder
        raise UnsafeKeyError(f"{entry}: {scheme.group(1)}:// is not read here; entries are s3:// URIs, local paths "
                             "or keys relative to the manifest's folder")
    if "\x00" in entry:
        raise UnsafeKeyError(f"key {entry!r} is not a relative path under the manifest's folder")
    scheme, bucket, path = parse_uri(base)
    relative = entry.replace("\\", "/")
    if scheme != "s3":
        return os.path.normpath(os.path.join(base, relative))
    parts = [p for p in path.split("/") if p]
    for part in relative.split("/"):
        if part == "..":
            if not parts:
                raise UnsafeKeyError(f"key {entry!r} would resolve outside the bucket s3://{bucket}")
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return f"s3://{bucket}/" + "/".join(parts)


def read_manifest(uri: str, credentials: StorageCredentials = DEFAULT_CHAIN) -> list[SourceEntry]:
    """Rows of a JSONL or CSV manifest. Every problem names the manifest line."""
    try:
        data = retrying(lambda: read_uri(uri, credentials, MAX_MANIFEST_BYTES))
    except TooLargeError as err:
        raise PreflightError(f"manifest {TooLargeError(err.where, err.size, err.limit, 'a manifest')} "
                             f"(split it, or list the folders instead)") from None
    except StorageError as err:
        raise PreflightError(f"manifest {uri}: cannot read: {err}") from None
    try:  # UTF-8 with or without a BOM; UTF-16 with its BOM (a spreadsheet's "Unicode text")
        text = data.decode("utf-16" if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig")
    except UnicodeDecodeError as err:
        line = err.object[:err.start].count(b"\n") + 1  # err.start counts from after a BOM
        raise PreflightError(f"manifest {uri}: not UTF-8 text (line {line}: {err.reason}); save it as UTF-8") from None
    base = split_uri(uri)[0].uri
    name = PurePosixPath(parse_uri(uri)[2]).name
    rows: list[tuple[int, dict]] = []
    if not text.strip():
        raise PreflightError(f"manifest {uri} is empty")
    if name.lower().endswith(".csv"):
        # CR alone ends a line too (Excel for Mac's "CSV (Macintosh)"); blank lines before the header
        # are skipped, and counted in the line numbers
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        body = text.lstrip()
        before = text[:len(text) - len(body)].count("\n")
        # the separator whose header names content and style ("Content,Style": any case): a
        # spreadsheet writes ";" where "," is the decimal mark, or tabs
        header = body.split("\n", 1)[0]
        separator = next((c for c in (",", ";", "\t") if {"content", "style"} <= _csv_names(header, c)), None)
        if separator is None:
            raise PreflightError(f"manifest {uri}: CSV header must name content,style[,output]")
        reader = csv.DictReader(io.StringIO(body), delimiter=separator)
        try:
            rows = [(before + reader.line_num, {k.strip().lower(): (v or "").strip() for k, v in row.items() if k})
                    for row in reader]
        except csv.Error as err:  # a field past csv's limit (131072 characters)
            # line_num counts the lines read before the row that failed
            raise PreflightError(f"manifest {uri} line {before + reader.line_num + 1}: not CSV ({err})") from None
    else:
        # CR, LF or CRLF only (none can be inside a JSON string, where control characters are escaped):
        # splitlines() also breaks at U+2028, U+0085, ... which json.dumps(ensure_ascii=False) leaves there
        for i, line in enumerate(re.split(r"\r\n|\r|\n", text), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PreflightError(f"manifest {uri} line {i}: not JSON ({err.msg})") from None
            except (ValueError, RecursionError) as err:  # 5000 digits; "[" nested past the recursion limit
                raise PreflightError(f"manifest {uri} line {i}: not JSON ({type(err).__name__}: "
                                     f"{str(err)[:80] or 'nested too deep'})") from None
            if not isinstance(row, dict):
                raise PreflightError(f"manifest {uri} line {i}: expected an object with content and style")
            rows.append((i, row))
    entries = []
    for line, row in rows:
        where = f"manifest {name} line {line}"
        content, style, output = row.get("content"), row.get("style"), row.get("output")
        if not isinstance(content, str) or not content or not isinstance(style, str) or not style:
            raise PreflightError(f"{where}: needs non-empty 'content' and 'style'")
        # a bad output name fails its pair alone, as a bad content or style key does: nothing is written
        problem = ""
        if output is not None and not isinstance(output, str):  # true was written "True.jpg"
            problem, output = f"'output' must be a file name (a string), not {json.dumps(output)}", None
        try:
            output = safe_key(output) if output else None
        except UnsafeKeyError as err:
            problem, output = f"{err}; outputs must stay under the output prefix", None
        try:
            resolved = _resolve(content, base), _resolve(style, base)
        except UnsafeKeyError as err:  # kept for the pair's report line, less a URL's password
            resolved, problem = (hide_userinfo(content), hide_userinfo(style)), problem or str(err)
        entries.append(SourceEntry(*resolved, output, where, error=f"{where}: {problem}" if problem else ""))
    if not entries:
        raise PreflightError(f"manifest {uri} has no rows")
    return entries


def _csv_names(header: str, separator: str) -> set[str]:
    """A CSV header line's column names, stripped and lower-cased."""
    return {name.strip().lower() for name in next(csv.reader([header], delimiter=separator), [])}


def _source_kind(source) -> tuple[str | None, str | None, str | None, str]:
    """(manifest, contents, styles, pairing) of a BatchSource, whichever shape it has."""
    return (getattr(source, "manifest", None), getattr(source, "contents", None), getattr(source, "styles", None),
            getattr(source, "pairing", "cross"))


def source_entries(source, credentials: StorageCredentials = DEFAULT_CHAIN) -> list[SourceEntry]:
    """The pairs a source names, in a stable order (style-major for cross, so targets are reused)."""
    manifest, contents_uri, styles_uri, pairing = _source_kind(source)
    if manifest:
        return read_manifest(manifest, credentials)
    try:
        contents = retrying(lambda: list_images(contents_uri, credentials))
        styles = retrying(lambda: list_images(styles_uri, credentials))
    except StorageError as err:
        raise PreflightError(f"source is not listable: {err}") from None
    for uri, found in ((contents_uri, contents), (styles_uri, styles)):
        if not found:
            raise PreflightError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {uri}")
    if pairing == "zip":
        if len(contents) != len(styles):
            raise PreflightError(
                f"pairing 'zip' needs equal counts: {len(contents)} content images under {contents_uri} "
                f"but {len(styles)} style images under {styles_uri}"
            )
        return [SourceEntry(c, s, content_id=ci, style_id=si, error=ce or se)
                for (c, ci, ce), (s, si, se) in zip(contents, styles)]
    return [SourceEntry(c, s, content_id=ci, style_id=si, error=ce or se)
            for s, si, se in styles for c, ci, ce in contents]


def _norm(uri: str, folder: bool = False, resolve: bool = True) -> str:
    """A URI in one comparable spelling: s3://bucket/key, or an absolute local path, with every
    link resolved (``resolve``: where a read of it lands, so a folder link inside an allowed
    folder is judged by its target); "" for one that names nothing (a NUL byte, not a string)."""
    try:
        scheme, bucket, path = parse_uri(uri)  # as the read will take it: '#' and '?' are part of the key
        if scheme == "s3":
            text = f"s3://{bucket}/{path.lstrip('/')}"
        else:
            local = os.path.expanduser(path if scheme == "file" else uri)
            text = os.path.realpath(local) if resolve else os.path.abspath(local)
    except (TypeError, ValueError):
        return ""
    return text.rstrip("/") + "/" if folder else text


def refuse_outputs_over_inputs(plans: list[PairPlan], out: Storage, manifest: str | None = None) -> list[PairPlan]:
    """``plans`` with each pair whose image or sidecar would land on an input of the run (a content,
    a style, the manifest) failed instead: a manifest names its outputs, and "c/a.jpg" written into
    the folder that holds the photos replaced one, then again on every rerun (new bytes, new key)."""
    inputs = {_norm(u): u for p in plans for u in (p.content, p.style)}
    if manifest:
        inputs[_norm(manifest)] = manifest
    inputs.pop("", None)
    # the same file under another spelling: "IMG_1.jpg" is "IMG_1.JPG" on macOS's and Windows' file systems
    files = {f: u for n, u in inputs.items() if not n.startswith("s3://") and (f := _file_id(n))}

    def over_an_input(key: str) -> str | None:
        target = _norm(out.uri_for(key))
        if target in inputs:
            return inputs[target]
        return files.get(_file_id(target)) if files and not target.startswith("s3://") else None

    checked = []
    for p in plans:
        hit = next((h for key in (p.image_key, p.sidecar_key) if key and (h := over_an_input(key))), None)
        if hit is not None and not p.error:
            p = replace(p, sidecar_key="", key="", duplicate_of=-1, error=(
                f"output {out.uri_for(p.image_key)} would replace an input of this run ({hit}); "
                "give its row another output name"))
        checked.append(p)
    return checked


def _file_id(path: str) -> tuple[int, int, int, str] | None:
    """An existing local file's identity as a write by name would replace it: its folder's (device,
    inode), its inode and its case-folded name (a hard link under another name is another entry,
    which the atomic write leaves alone: not the same); None when there is no such file."""
    try:
        folder, st = os.stat(os.path.dirname(path) or "."), os.stat(path)
    except (OSError, ValueError):
        return None
    return folder.st_dev, folder.st_ino, st.st_ino, os.path.basename(path).casefold()


def default_allowed_sources(source) -> list[str]:
    """The source's own prefixes, or the folder of its manifest."""
    manifest, contents, styles, _ = _source_kind(source)
    if manifest:
        return [split_uri(manifest)[0].uri]
    return [u for u in (contents, styles) if u]


def outside_allowed(uri: str, allowed: list[str]) -> str:
    """Why ``uri`` may not be read ("" = it may): under none of the ``allowed`` prefixes/folders
    (none given, or none that names a place: none is allowed). Local paths are compared once links
    are resolved; the refusal names the link's target only for a path that is inside an allowed
    folder as spelled (a link out of it), never otherwise (it would show the machine's layout)."""
    roots = [r for a in allowed if (r := _norm(a, folder=True))]
    target = _norm(uri)
    if target and any(target.startswith(r) for r in roots):
        return ""
    spelled = _norm(uri, resolve=False)
    through_link = spelled and any(spelled.startswith(r) for a in allowed for r in (_norm(a, True, False), *roots) if r)
    leads = f" (it leads to {target})" if through_link and target and not uri.startswith("s3://") else ""
    return f"{uri}{leads} is outside allowed_sources ({', '.join(allowed) or 'none given'})"


def _identities(uris: set[str], known: dict[str, str], io_workers: int,
                credentials: StorageCredentials) -> dict[str, tuple[str, str]]:
    """URI -> (identity, error): from the source listing when known, else from one listing per
    S3 prefix that holds many of them (manifests), else HEAD / sha256 — each lookup retried when
    transient; one that fails for good gives the reason instead of an identity."""
    out = {u: (known[u], "") for u in uris if known.get(u)}
    wanted: dict[str, tuple[Storage, list[tuple[str, str]]]] = {}
    for uri in uris - set(out):
        try:
            storage, key = split_uri(uri, credentials)
        except StorageError as err:
            out[uri] = ("", str(err))
            continue
        wanted.setdefault(storage.uri, (storage, []))[1].append((uri, key))

    def one_folder(item: tuple[Storage, list[tuple[str, str]]]) -> dict[str, tuple[str, str]]:
        storage, keys = item
        listed: dict[str, ObjectInfo] = {}
        if len(keys) > 8 and storage.lists_identities:
            try:
                listed = {info.key: info for info in retrying(lambda: storage.list(flat=True)) if info.identity}
            except StorageError:
                pass  # fall back to one lookup per object
        found = {}
        for uri, key in keys:
            try:
                info = listed.get(key)
                if info and (refused := _refusal(uri, info)):
                    raise refused
                identity = info.identity if info else retrying(lambda: storage.identity(key, MAX_INPUT_BYTES))
                found[uri] = (identity, "") if identity else ("", f"{uri}: has no identity")
            except StorageError as err:
                found[uri] = ("", f"cannot read input: {err}")
        return found

    with ThreadPoolExecutor(max_workers=io_workers) as pool:
        for part in pool.map(one_folder, wanted.values()):
            out.update(part)
    return out


def plan_pairs(
    entries: list[SourceEntry], params: StyleParams, weights_id: str, fmt: str, quality: int = 92,
    io_workers: int = 8, allowed_sources: list[str] | None = None, credentials: StorageCredentials = DEFAULT_CHAIN,
    fold_case: bool = True, tree: bool = False,
) -> list[PairPlan]:
    """Output names and keys for every entry. A pair whose inputs are refused or cannot be
    identified gets ``error`` (and no name): it is reported failed and never run. ``fold_case``:
    output names that differ only in case are one (``Storage.folds_case``: macOS's and Windows'
    folders; Linux's and S3 tell case apart). ``tree``: the output is a folder, where a name may not
    need a folder where another pair's output is a file (``_under_a_file``)."""
    refused: dict[str, str] = {}
    if allowed_sources is not None:
        for uri in {u for e in entries for u in (e.content, e.style)}:
            if why := outside_allowed(uri, allowed_sources):
                refused[uri] = why
    known = {u: i for e in entries for u, i in ((e.content, e.content_id), (e.style, e.style_id)) if i}
    look_up = {u for e in entries if not e.error for u in (e.content, e.style)} - set(refused)
    identities = _identities(look_up, known, io_workers, credentials)
    plans, seen = [], {}
    for i, e in enumerate(entries):
        error = e.error or refused.get(e.content) or refused.get(e.style) or ""
        cid, cerr = identities.get(e.content, ("", ""))
        sid, serr = identities.get(e.style, ("", ""))
        error = error or cerr or serr
        if error:  # the report keeps the name the row asked for (a generated name needs the key)
            requested = output_name(e.content, e.style, "", e.output) if e.output else ""
            plans.append(PairPlan.refused(i, e.content, e.style, cid, sid, error, requested, fmt))
            continue
        key = pair_key(cid, sid, params, weights_id, fmt, quality)
        name = output_name(e.content, e.style, key, e.output)
        if why := name_problem(name):  # this pair alone, before its optimization (only an explicit name can be)
            plans.append(PairPlan.refused(i, e.content, e.style, cid, sid, f"{e.where or e.content}: {why}", "", fmt))
            continue
        # by lower-cased name where "Out" and "out" are one file (macOS's and Windows' folders); not
        # casefold(), which makes "Straße" "strasse", two files on NTFS (its upcase table keeps ß)
        folded = name.lower() if fold_case else name
        first = seen.get(folded)
        if first is not None and first[1] == key:  # the same result asked for twice: made once, under the first name
            plans.append(PairPlan.named(i, e.content, e.style, cid, sid, first[3], key, fmt, duplicate_of=first[0]))
            continue
        if first is not None and first[3] != name:
            plans.append(PairPlan.refused(i, e.content, e.style, cid, sid, (
                f"{e.where or e.content}: output name {name!r} differs only in case from {first[3]!r}, the output "
                f"of {first[2]} (one file in this output folder); give one of them another output name"), name, fmt))
            continue
        if first is not None:  # another result under the same name: only this pair fails
            plans.append(PairPlan.refused(i, e.content, e.style, cid, sid, (
                f"{e.where or e.content}: output name {name!r} is already the output of {first[2]} (other inputs "
                "or parameters); give one of them another output name"), name, fmt))
            continue
        seen[folded] = (i, key, e.where or e.content, name)
        plans.append(PairPlan.named(i, e.content, e.style, cid, sid, name, key, fmt))
    return _under_a_file(plans, entries, fmt) if tree else plans


def _under_a_file(plans: list[PairPlan], entries: list[SourceEntry], fmt: str) -> list[PairPlan]:
    """``plans`` with each pair whose image or sidecar needs a folder where another pair's output
    file is ("o/x.png/y.png" beside "o/x.png") failed at planning, not at its write after the
    optimization."""
    files = {k: p for p in plans if not p.error for k in (p.image_key, p.sidecar_key) if k}
    checked = []
    for p in plans:
        blocked = next(((key, str(folder)) for key in (p.image_key, p.sidecar_key) if key and not p.error
                        for folder in PurePosixPath(key).parents if str(folder) in files), None)
        if blocked is not None:
            key, folder = blocked
            other = files[folder]
            p = PairPlan.refused(p.index, p.content, p.style, p.content_identity, p.style_identity, (
                f"{entries[p.index].where or p.content}: {key} needs a folder {folder} where the output of "
                f"{entries[other.index].where or other.content} is a file; give one of them another output name"),
                p.name, fmt)
        checked.append(p)
    return checked
