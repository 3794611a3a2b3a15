"""The storage contract of a batch run, in one place (the design card's "Storage contract",
../shared/DESIGN.md): storage keys, the pair key, sidecar fields, write order, the done rule, and
every report body, status and row. Flows and tasks build these through the functions below.

Naming (``image_key``, ``sidecar_key``)
    One pair's result is ``{output}/{name}.{ext}`` and its sidecar ``{output}/{name}.json``.
    ``name`` is ``{content_stem}__{style_stem}__{key8}`` (``key8`` = the first 8 hex digits of
    the pair key), or the manifest row's own ``output`` name (under the output prefix only, never
    under ``_runs/``).

Pair key
    SHA-256 hex of the content and style *identities* (S3 ETag or the file's SHA-256), every
    StyleParams field but ``device`` and ``weights_sha256`` (neither changes the result: the pin
    only checks the weights the id names), a default spelt out recorded as the default (the
    optimizer's own ``learning_rate``, equal ``style_layer_weights``, one ``style_blend_weights``
    value), the weights id, and the output encoding (``format``, ``quality``; png's key records 92,
    as png takes none). Never computed from an empty identity:
    a pair whose input cannot be identified fails at planning with the reason.

Write order
    The image first, the sidecar last. Each write is atomic (local: a temp file under
    ``{output}/.nst-tmp/`` renamed into place; S3: one PutObject), so no partial object is
    ever visible under the output prefix.

Done rule (the only skip rule; stylize-batch and stylize-chunk both use ``done_pairs``)
    A pair is done when its image AND its sidecar exist, the sidecar's stored ``key`` equals
    the planned key, and the sidecar's ``image`` record matches the image that is there: its
    size from the listing (or a HEAD), and on S3 its ETag. A manifest-named output keeps its name
    when the key changes, so an image replaced without its sidecar (a crash between the two
    writes, overlapping runs) is caught here. A sidecar without an ``image`` record (older
    versions) counts only for key-named outputs, whose name changes with the key. Anything else
    is redone, overwriting atomically.

Sidecar fields (``sidecar()``)
    The engine's metadata first, then the contract's fields, which it can never overwrite:
    content, style, output, key, image {size, identity}, identities {content, style}, losses {initial, final}
    (``final`` is the *best* evaluation: the image written is the lowest-loss one, measured on the
    file as it reads back, a lossy format's included),
    loss_history (<= 100 evaluations, every k-th plus the last), flow_run {id, name},
    labels, created, and the engine's metadata (params, weights_id, device, size,
    evaluations, returned: "best evaluation", or "start" where the content it started from, rounded
    to 8 bits, was lower than every evaluation's image rounded alike, seconds, versions).

Run report ``{output}/_runs/{flow_run_id}.json`` (``report_key``)
    Written first as ``running_report`` {flow_run, flow_run_id, status: "running", started,
    process? {boot, pid_ns, pid, started}: the process that runs it, Linux} (the preflight write
    probe), replaced by ``run_report`` at the end, or by ``stopped_report`` {status: "crashed" (the
    run stopped early), "cancelled" or "failed" (refused in preflight), error} without it.
    ``run_report``: flow_run (name), flow_run_id, status: "finished", report, started, finished, source, output, params,
    run, weights_id, devices, totals {pairs, done, skipped, failed}, contact_sheet, loss_curve,
    chunks?, items (one ``ReportItem`` per pair: content, style, status, output, sidecar, error,
    seconds, losses, note; built by ``done_item``, ``skipped_item`` — a repeated pair is skipped
    with a note naming the pair it duplicates — and ``failed_item``). Beside it:
    ``{flow_run_id}-contact.jpg`` (``contact_sheet_key``) and ``{flow_run_id}-loss.png``
    (``loss_curve_key``). A later attempt of the same flow run (Prefect's Retry) writes all three
    as ``{flow_run_id}-attempt-N…`` (``run_stem``; the report says ``attempt``): no attempt
    overwrites an earlier one's record. An attempt that drew no contact sheet (all pairs skipped)
    points at the latest earlier attempt's.

Chunk report ``{output}/_runs/{parent_flow_run_id}/chunk-{chunk_key16}.json`` (``chunk_report_key``,
under the parent that started the chunk run; the chunk key is its content, ``chunk_key``; a later run
of the same content, which had N runs before, reports to ``…-attempt-N.json``: ``attempt_report_key``)
    ``chunk_report``: flow_run, flow_run_id, worker {host, pid, parent_pid, devices}, items
    (ReportItem + index + key + name; the parent merges them by pair key and output name: ``chunk_items``), thumbs
    (``encode_thumbs``: rows of 5 fields, the content, style and result thumbnails as base64
    JPEG, then the pair's content and style URIs).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import PurePosixPath

from nst_core.imageio import FORMAT_EXTENSIONS, FORMATS, QUALITY_FORMATS
from nst_core.params import OPTIMIZER_STEPS, StyleParams, equal_shares

from .storage import TEMP_DIR, StorageHealth, parse_uri

__all__ = [
    "EXTENSIONS", "RUNS", "HISTORY_POINTS", "RUNNING", "CRASHED", "CANCELLED", "FINISHED", "DONE", "SKIPPED", "FAILED",
    "PairPlan", "ReportItem", "ThumbRow", "pair_key", "output_name", "renamed_output", "image_key", "sidecar_key",
    "in_runs", "reserved_folder", "name_problem", "naming_problem", "too_long", "NAME_BYTES", "chunk_key", "report_key",
    "chunk_report_key", "attempt_report_key", "contact_sheet_key", "loss_curve_key", "run_stem", "sidecar",
    "image_record", "loss_history", "done_pairs", "done_in", "totals", "timestamp", "totals_line", "done_item", "skipped_item",
    "failed_item", "running_report", "stopped_report", "run_report", "chunk_report", "repeats_follow_their_first",
    "chunk_items", "item_of", "encode_thumbs", "decode_thumbs", "report_bytes", "left_item", "left_to_another",
    "output_health",
]

#: OutputSpec.format -> the extension its images are written with.
EXTENSIONS = {fmt: exts[0].lstrip(".") for fmt, exts in FORMAT_EXTENSIONS.items()}
#: Run and chunk reports (and the contact sheet) live under this folder of the output.
RUNS = "_runs"
#: A run report's status while the run goes (the write probe), when it stopped without its report,
#: and in the full report (the run reached its end, however its pairs went).
RUNNING, CRASHED, CANCELLED, FINISHED = "running", "crashed", "cancelled", "finished"
#: A pair's status in a report (and a run report's, when preflight refused the run: FAILED).
DONE, SKIPPED, FAILED = "done", "skipped", "failed"
#: At most this many points of a pair's loss history go into its sidecar.
HISTORY_POINTS = 100

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class PairPlan:
    """One planned pair. ``error`` set: it failed at planning (no name, no key) and is not run.
    ``duplicate_of`` >= 0: the same pair (same key, same name) as the plan with that index: it is
    reported skipped and not run again."""

    index: int
    content: str  # URI
    style: str  # URI
    content_identity: str
    style_identity: str
    name: str  # output base key, relative to the output root, no extension
    image_key: str
    sidecar_key: str
    key: str  # the pair key: full SHA-256 hex
    error: str = ""
    duplicate_of: int = -1

    @property
    def runnable(self) -> bool:
        return not self.error and self.duplicate_of < 0

    @classmethod
    def named(cls, index: int, content: str, style: str, content_identity: str, style_identity: str, name: str,
              key: str, fmt: str, duplicate_of: int = -1) -> PairPlan:
        """A plan with its output: ``image_key`` and ``sidecar_key`` from ``name`` and the format."""
        return cls(index, content, style, content_identity, style_identity, name, image_key(name, fmt),
                   sidecar_key(name), key, duplicate_of=duplicate_of)

    @classmethod
    def refused(cls, index: int, content: str, style: str, content_identity: str, style_identity: str,
                error: str, name: str = "", fmt: str = "") -> PairPlan:
        """A plan that failed at planning: no pair key, no sidecar. ``name``: the output its manifest
        row asked for (the report names it, so a user finds the row); never written."""
        return cls(index, content, style, content_identity, style_identity, name,
                   image_key(name, fmt) if name else "", "", "", error=error)


@dataclass
class ReportItem:
    """One pair's line in a run or chunk report."""

    content: str
    style: str
    status: str  # DONE | SKIPPED | FAILED
    output: str  # image URI ("" when the pair failed before it had a name)
    sidecar: str = ""  # sidecar URI
    error: str | None = None
    seconds: float | None = None
    losses: dict | None = None
    note: str | None = None  # e.g. why a pair was skipped

    def as_dict(self) -> dict:
        return asdict(self)


#: StyleParams fields added after results were written, at the values that give those results:
#: left out of the key there, so the upgrade that added them redoes no pair.
_ADDED_LATER = {"tile_size": "auto", "tile_halo": None, "max_memory_gb": None}


#: The quality a png result's key records whatever the run asked: png's encoder takes none, so any
#: value gives the same file. 92 is what the keys written before hold (OutputSpec's default then);
#: a constant, not read from OutputSpec, so that a new default would not change these keys.
_KEY_QUALITY_WITHOUT_ONE = 92


def _key_params(params: StyleParams) -> dict:
    # weights_sha256 only checks the weights weights_id already names (a state_dict's own SHA-256,
    # torchvision's hash-named file): pinning it, or not, is the same result. Kept at None, not
    # left out, so the keys written before stay as they were. So is a default spelt out: the
    # optimizer's own step, equal style layer weights, a pair's one style blend weight (always 1).
    dumped = {**params.model_dump(mode="json", exclude={"device"}), "weights_sha256": None}
    if params.learning_rate == OPTIMIZER_STEPS[params.optimizer]:
        dumped["learning_rate"] = None
    if equal_shares(params.style_layer_weights):
        dumped["style_layer_weights"] = None
    if params.style_blend_weights is not None and len(params.style_blend_weights) == 1:
        dumped["style_blend_weights"] = None
    return {k: v for k, v in dumped.items() if k not in _ADDED_LATER or v != _ADDED_LATER[k]}


def pair_key(content_identity: str, style_identity: str, params: StyleParams, weights_id: str,
             fmt: str, quality: int) -> str:
    """SHA-256 hex over everything that determines a result file."""
    if not content_identity or not style_identity:
        raise ValueError("a pair key needs both input identities")  # never hash an empty identity
    blob = json.dumps(
        {"content": content_identity, "style": style_identity, "weights": weights_id,
         "params": _key_params(params),
         "output": {"format": fmt, "quality": quality if fmt in QUALITY_FORMATS else _KEY_QUALITY_WITHOUT_ONE}},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _stem(uri: str) -> str:
    return _UNSAFE_CHARS.sub("_", PurePosixPath(parse_uri(uri)[2]).stem) or "image"


def renamed_output(explicit: str | None, fmt: str) -> str | None:
    """The file a manifest's output name with an image extension is written as, where that differs
    from the name (``output_name`` drops the extension and ``image_key`` adds the run's ``fmt``'s:
    ``x.jpg`` in a png run is ``x.png``, ``x.jpeg`` in a jpeg run ``x.jpg``, ``x.PNG`` ``x.png``), else None."""
    if not explicit or PurePosixPath(explicit).suffix.lower() not in FORMATS:
        return None
    written = image_key(output_name("", "", "", explicit), fmt)
    return written if written != explicit else None


def output_name(content: str, style: str, key: str, explicit: str | None = None) -> str:
    """The output base name of a pair (no extension); a manifest's explicit name wins.

    A derived name too long for a file system (``too_long``) keeps the first ``_STEM_CUT``
    characters of each stem; names that fit are never changed (a rerun finds its results by name)."""
    if explicit:
        return str(PurePosixPath(explicit).with_suffix("")) if PurePosixPath(explicit).suffix.lower() in FORMATS \
            else explicit
    c, s = _stem(content), _stem(style)
    if too_long(f"{c}__{s}__{key[:8]}"):
        c, s = c[:_STEM_CUT], s[:_STEM_CUT]
    return f"{c}__{s}__{key[:8]}"


#: Bytes of a name before its extension: "{name}.json" and "{name}.webp" within the 255 bytes a
#: file system (ext4, XFS, APFS, NTFS) allows a file name.
NAME_BYTES = 250
#: Stems of a too-long derived name are cut to this: 2 x 119 + "__" x 2 + 8 hex = 250.
_STEM_CUT = (NAME_BYTES - 4 - 8) // 2


def too_long(name: str) -> str:
    """Why an output name's file names would not fit a file system ("" when they fit)."""
    longest = max(name.split("/"), key=lambda part: len(part.encode()))
    n = len(longest.encode())
    shown = name if len(name) <= 40 else f"{name[:40]}..."
    return f"output name {shown!r} has a {n}-byte file name; at most {NAME_BYTES} fit" if n > NAME_BYTES else ""


def image_key(name: str, fmt: str) -> str:
    """The result image of output name ``name`` in OutputSpec.format ``fmt``."""
    return f"{name}.{EXTENSIONS[fmt]}"


def sidecar_key(name: str) -> str:
    return f"{name}.json"


def in_runs(key: str) -> bool:
    """True for a key under ``_runs/``, where reports live and no pair may write."""
    return key.split("/")[0] == RUNS


def reserved_folder(name: str) -> str:
    """The folder of the output an output name may not be in ("" if none): ``_runs/`` (reports),
    ``.nst-tmp/`` (temp files, which every run's clean-up removes)."""
    first = name.split("/")[0]
    # in any case: where "_RUNS" and "_runs" are one folder (macOS's, Windows') it is that folder
    return first if first.lower() in (RUNS, TEMP_DIR) else ""


#: Bytes an output name may have in all: S3 keys hold at most 1024 bytes, prefix and extension included.
NAME_TOTAL_BYTES = 960


def name_problem(name: str) -> str:
    """Why pairs may not be written under output name ``name`` ("" when they may): the checks the
    plan makes before any optimization, which stylize-chunk makes again on the plans it is given."""
    from .storage import OLD_TEMP_PREFIX, UnsafeKeyError, safe_key

    try:
        unsafe = safe_key(name) != name
    except UnsafeKeyError:
        unsafe = True
    if unsafe:  # `..png` is the name "." once its extension is dropped
        return f"output name {name!r} is no file name under the output (a name ends in '.' or '..' without its extension)"
    if folder := reserved_folder(name):
        return f"output names may not start with {folder}/ ({'run reports' if folder == RUNS else 'temp files'} live there)"
    if name.rsplit("/", 1)[-1].startswith(OLD_TEMP_PREFIX):  # written, then never found done again (local lists)
        return f"output name {name!r}: names starting with {OLD_TEMP_PREFIX} are temp files, which listings skip"
    if len(name.encode()) > NAME_TOTAL_BYTES:  # S3 refused it at the write, after the optimization
        return f"output name {name[:40]!r}... has {len(name.encode())} bytes; at most {NAME_TOTAL_BYTES} fit"
    return too_long(name)


def naming_problem(plan: PairPlan, fmt: str) -> str:
    """Why a plan's output keys break the naming rule ("" when they follow it): a name ``name_problem``
    passes, the image ``{name}.{ext}`` of the run's format, the sidecar ``{name}.json``.
    stylize-chunk checks the plans it is given: anyone who can start a flow run can write them."""
    rule = f"{{name}}.{EXTENSIONS.get(fmt, fmt)} and {{name}}.json under the output, outside {RUNS}/ and {TEMP_DIR}/"
    if why := name_problem(plan.name):
        return f"{why}: it breaks the naming rule ({rule})"
    if plan.image_key != image_key(plan.name, fmt) or plan.sidecar_key != sidecar_key(plan.name):
        return f"output keys {plan.image_key!r}, {plan.sidecar_key!r} break the naming rule ({rule})"
    return ""


def chunk_key(pairs: list[PairPlan], output_uri: str, redo: bool = False) -> str:
    """A chunk's identity from its content alone: the output it writes to and its pairs' keys
    (which cover the inputs, every parameter, the weights and the encoding) and names; never its
    parent or its position. Any parent that plans the same pairs finds the chunk runs holding them.
    ``redo`` (skip_existing off) is a content of its own: a run that skips done pairs does not make
    them again for a parent asked to."""
    blob = "\n".join([output_uri.rstrip("/"), *(f"{p.key} {p.name}" for p in pairs), *(["redo"] if redo else [])])
    return hashlib.sha256(blob.encode()).hexdigest()


def run_stem(flow_run_id: str, attempt: int = 1) -> str:
    """The name a run attempt's files share under ``_runs/``: the flow run id, and ``{id}-attempt-N``
    for its N-th attempt (Prefect's Retry runs the same flow run id again), so that a later attempt
    never overwrites an earlier one's record."""
    return flow_run_id if attempt <= 1 else f"{flow_run_id}-attempt-{attempt}"


def report_key(flow_run_id: str, attempt: int = 1) -> str:
    return f"{RUNS}/{run_stem(flow_run_id, attempt)}.json"


def contact_sheet_key(flow_run_id: str, attempt: int = 1) -> str:
    return f"{RUNS}/{run_stem(flow_run_id, attempt)}-contact.jpg"


def loss_curve_key(flow_run_id: str, attempt: int = 1) -> str:
    return f"{RUNS}/{run_stem(flow_run_id, attempt)}-loss.png"


def chunk_report_key(parent_flow_run_id: str, key: str) -> str:
    """``key``: the chunk's identity (``chunk_key``)."""
    return f"{RUNS}/{parent_flow_run_id}/chunk-{key[:16]}.json"


def attempt_report_key(report: str, attempt: int) -> str:
    """The report key of the ``attempt``-th later run of a chunk whose first run reports to ``report``."""
    return report if attempt == 0 else report.removesuffix(".json") + f"-attempt-{attempt}.json"


def timestamp(when: datetime | None = None) -> str:
    """The UTC time stamps of reports and sidecars (now, by default)."""
    return (when or datetime.now(timezone.utc)).isoformat(timespec="seconds")


def loss_history(history: list[dict[str, float]], points: int = HISTORY_POINTS) -> dict:
    """Every k-th evaluation's total loss (and always the last), at most ``points`` values."""
    if not history:
        return {"every": 1, "total": []}
    every = max(1, -(-len(history) // points))
    picked = list(range(0, len(history), every))
    if picked[-1] != len(history) - 1:  # always end on the last evaluation
        picked = (picked[:-1] if len(picked) == points else picked) + [len(history) - 1]
    return {"every": every, "evaluations": [i + 1 for i in picked],
            "total": [round(history[i]["total"], 6) for i in picked]}


def sidecar(plan: PairPlan, output_uri: str, result, labels: dict[str, str], flow_run: dict,
            seconds: dict | None = None, image: dict | None = None) -> dict:
    """The JSON written beside a result (written last: see the done rule). ``image``: {size,
    identity} of the image as written. The engine's metadata comes first so that none of its
    keys can overwrite a field of the contract."""
    return {
        **result.metadata,
        "content": plan.content,
        "style": plan.style,
        "output": output_uri,
        "key": plan.key,
        "image": image or {},
        "identities": {"content": plan.content_identity, "style": plan.style_identity},
        "losses": result.losses,  # "final" is the best (lowest total) evaluation: the image written
        "loss_history": loss_history(result.history),
        "seconds": {**result.metadata.get("seconds", {}), **(seconds or {})},
        "flow_run": flow_run,
        "labels": labels,
        "created": timestamp(),
    }


def image_record(data: bytes, identity: str) -> dict:
    """What the sidecar stores about its image: the size and the identity the write returned."""
    return {"size": len(data), "identity": identity}


def _image_matches(plan: PairPlan, meta: dict, listed) -> bool:
    """The sidecar's image record against the image there now (``listed``: an ObjectInfo)."""
    record = meta.get("image")
    if not record:  # written by an older version: trust it only where the name carries the key
        return plan.name.endswith(f"__{plan.key[:8]}")
    if record.get("size") != listed.size:
        return False
    # S3 lists ETags; a local listing has none (hashing every file would slow a skip-all rerun): size only
    return not (listed.identity and record.get("identity")) or listed.identity == record["identity"]


def done_pairs(plans: list[PairPlan], read_sidecar: Callable[[str], bytes | None],
               listed: dict | None = None, info: Callable[[str], object] | None = None,
               io_workers: int = 8, made_by: set[str] | None = None, fold_case: bool = False) -> set[int]:
    """Indexes of the plans that are done by the rule above.

    ``listed``: key -> ObjectInfo of everything under the output (one listing); without it,
    ``info`` gives one image's ObjectInfo (or None). ``read_sidecar``: its bytes, or None when missing.
    ``made_by``: only sidecars these flow runs wrote count. ``fold_case``: the output holds "Out"
    and "out" as one file, so a plan's key is looked up in ``listed`` by its lower case.
    """
    if listed is not None and fold_case:
        listed = {key.lower(): found for key, found in listed.items()}
    look = str.lower if fold_case else str
    candidates = [p for p in plans if p.runnable and (
        listed is None or (look(p.image_key) in listed and look(p.sidecar_key) in listed))]

    def check(p: PairPlan) -> bool:
        image = listed[look(p.image_key)] if listed is not None else info(p.image_key)
        if image is None:
            return False
        raw = read_sidecar(p.sidecar_key)
        if raw is None:
            return False
        try:
            meta = json.loads(raw)
            if made_by is not None and (meta.get("flow_run") or {}).get("id") not in made_by:
                return False
            return meta.get("key") == p.key and _image_matches(p, meta, image)
        except (ValueError, AttributeError, TypeError):
            return False  # a damaged sidecar: redo the pair

    if not candidates:
        return set()
    if io_workers <= 1:  # in the caller's thread: no pool worker for the interpreter to join at exit
        return {p.index for p in candidates if check(p)}
    with ThreadPoolExecutor(max_workers=max(1, min(io_workers, len(candidates)))) as pool:
        return {p.index for p, ok in zip(candidates, pool.map(check, candidates)) if ok}


def done_in(storage, plans: list[PairPlan], list_once: bool = True, io_workers: int = 8, health=None,
            made_by: set[str] | None = None) -> set[int]:
    """``done_pairs`` against a Storage: one listing of the output (a run), or one HEAD per image
    (a chunk, whose pairs are few). Reads are retried when transient; ``health``: the run's
    StorageHealth (raises StorageUnreachableError once the storage is declared unreachable)."""
    from .storage import MissingObjectError, retrying

    def read_sidecar(key: str) -> bytes | None:
        try:
            return retrying(lambda: storage.read(key), health=health)[0]
        except MissingObjectError:
            return None

    listed = {info.key: info for info in retrying(storage.list, health=health)} if list_once else None
    fold_case = list_once and retrying(storage.folds_case, health=health)
    return done_pairs(plans, read_sidecar, listed, lambda k: retrying(lambda: storage.info(k), health=health),
                      io_workers, made_by, fold_case)


def output_health(storage) -> StorageHealth:
    """The StorageHealth of a run (or chunk run) writing to ``storage``: evidence of an outage gone
    stale is checked with one exists of ``_runs``."""
    return StorageHealth(probe=lambda: storage.exists(RUNS))


def totals(items: list[ReportItem]) -> dict[str, int]:
    return {
        "pairs": len(items),
        "done": sum(i.status == DONE for i in items),
        "skipped": sum(i.status == SKIPPED for i in items),
        "failed": sum(i.status == FAILED for i in items),
    }


def totals_line(counts: dict[str, int]) -> str:
    """``totals`` as a run's or a chunk run's state says them: "2 done, 0 skipped, 1 failed of 3 pairs"."""
    return f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed of {counts['pairs']} pairs"


_TOTALS_LINE = re.compile(r"(\d+) done, (\d+) skipped, (\d+) failed of (\d+) pairs")


def parse_totals_line(message: str) -> dict[str, int] | None:
    """The ``totals`` a state message starting with ``totals_line`` gives, else None."""
    found = _TOTALS_LINE.match(message or "")
    return dict(zip(("done", "skipped", "failed", "pairs"), map(int, found.groups()))) if found else None


# --- report items -------------------------------------------------------------------------------------

def done_item(plan: PairPlan, storage, **measured) -> ReportItem:
    """A pair whose image and sidecar are written; ``measured``: seconds, losses."""
    return ReportItem(plan.content, plan.style, DONE, storage.uri_for(plan.image_key),
                      storage.uri_for(plan.sidecar_key), **measured)


def skipped_item(plan: PairPlan, storage, duplicate_of: PairPlan | None = None, note: str | None = None) -> ReportItem:
    """A pair not run: done by the done rule, or (``duplicate_of``) the same result as an earlier
    pair; ``note``: why, where the report should say it."""
    if duplicate_of is not None:
        note = (f"duplicate of pair {duplicate_of.index} ({duplicate_of.content} x {duplicate_of.style}): "
                "the same result, made once")
    return ReportItem(plan.content, plan.style, SKIPPED, storage.uri_for(plan.image_key),
                      storage.uri_for(plan.sidecar_key), note=note)


#: How a pair left to another run (``tasks.claims``) begins its note: skipped, but not made.
LEFT_TO = "left to "
#: How the error of a pair a storage outage kept from starting begins.
NOT_RUN = "not run: "


def left_item(plan: PairPlan, storage, holder: str) -> ReportItem:
    """A pair another live run on the output still held when this run stopped waiting for it."""
    return skipped_item(plan, storage, note=f"{LEFT_TO}{holder}, still making it when this run ended; the next "
                                            "run makes it if it never does")


def left_to_another(status: str | None, note: str | None) -> bool:
    """Whether a report item with ``status`` and ``note`` is a pair left to another run (``left_item``):
    skipped, but not made."""
    return status == SKIPPED and (note or "").startswith(LEFT_TO)


def repeats_follow_their_first(items: dict[int, ReportItem], plans: list[PairPlan], storage) -> dict[int, ReportItem]:
    """``items`` (by plan index) with each repeated pair (``duplicate_of``) given its first pair's outcome
    once the run has settled every pair: skipped, naming the result, when the first is done or
    skipped; failed, with the first's reason, when it failed (a first that never started because
    the run stopped fails too: "run interrupted before the pair started"). Before the run a
    repeat is only assumed made once (``skipped_item``). A first without an item leaves none for
    its repeat either (defensive: the pipeline and the chunk watcher give every pair one)."""
    out = dict(items)
    for p in plans:
        if p.duplicate_of < 0:
            continue
        first = items.get(p.duplicate_of)
        if first is None:
            out.pop(p.index, None)
        elif first.status == FAILED:
            out[p.index] = failed_item(p, f"duplicate of pair {p.duplicate_of} ({first.content} x {first.style}), "
                                          f"which failed: {first.error}", storage)
        elif left_to_another(first.status, first.note):  # not made either
            out[p.index] = skipped_item(p, storage, note=first.note)
    return out


def failed_item(plan: PairPlan, error: str, storage=None) -> ReportItem:
    """A pair that failed, with the reason (and its output URIs when it had a name; a pair that
    failed at planning has only the image its manifest row asked for)."""
    output = storage.uri_for(plan.image_key) if storage is not None and plan.image_key else ""
    sidecar_uri = storage.uri_for(plan.sidecar_key) if storage is not None and plan.sidecar_key else ""
    return ReportItem(plan.content, plan.style, FAILED, output, sidecar_uri, error=error)


# --- report bodies -----------------------------------------------------------------------------------

def report_bytes(report: dict, indent: int | None = None) -> bytes:
    """A report (run or chunk) as written: JSON, UTF-8 (``application/json``)."""
    return json.dumps(report, indent=indent).encode()


def running_report(run: dict, started: datetime | None = None, process: dict | None = None,
                   api: str | None = None) -> dict:
    """The write probe: ``run`` is {id, name}; ``process``: the process that runs it, where known
    (``flows.orphans.this_process``: a later run on its machine can tell it is gone); ``api``: the
    Prefect API that knows the run (``flows.orphans.api_identity``: a run on another API cannot
    tell the run is gone by asking its own)."""
    report = {"flow_run": run["name"], "flow_run_id": run["id"], "status": RUNNING, "started": timestamp(started)}
    return {**report, **({"process": process} if process else {}), **({"api": api} if api else {})}


def stopped_report(run: dict, status: str, error: str, items: list[ReportItem] | None = None) -> dict:
    """What replaces the write probe of a run that ends without its report: CRASHED (interrupted,
    killed, an unhandled error), CANCELLED (the UI's Cancel) or FAILED (refused in preflight, where
    the probe cannot be deleted). ``items``: a run stopped after its plan says what became of
    each pair (with totals), as its full report would."""
    report = {"flow_run": run.get("name"), "flow_run_id": run["id"], "status": status, "error": error,
              "finished": timestamp()}
    if items is not None:
        report |= {"totals": totals(items), "items": [i.as_dict() for i in items]}
    return report


def run_report(run: dict, report_uri: str, started: datetime, inputs: dict, weights_id: str, devices: list[str],
               items: list[ReportItem], pictures: dict, chunks: list[dict]) -> dict:
    """The full run report. ``inputs``: the flow's pydantic arguments by name (source, output,
    params, run); ``pictures``: {contact_sheet, loss_curve} URIs; ``chunks``: one line per chunk run."""
    return {
        "flow_run": run["name"],
        "flow_run_id": run["id"],
        "status": FINISHED,  # ran to its end; totals say how its pairs went
        "attempt": run.get("attempt", 1),
        "report": report_uri,
        "started": timestamp(started),
        "finished": timestamp(),
        **{name: model.model_dump(mode="json") for name, model in inputs.items()},
        "weights_id": weights_id,
        "devices": devices,
        "totals": totals(items),
        **pictures,
        **({"chunks": chunks} if chunks else {}),
        "items": [i.as_dict() for i in items],
    }


def chunk_report(run: dict, worker: dict, plans: list[PairPlan], items: list[ReportItem],
                 thumbs: list[tuple[bytes, bytes, bytes]], thumb_items: list[ReportItem]) -> dict:
    """A chunk's report: ``items[i]`` is ``plans[i]``'s; ``thumbs[n]`` shows ``thumb_items[n]``'s pair."""
    return {
        "flow_run": run["name"],
        "flow_run_id": run["id"],
        "worker": worker,
        "items": [{"index": p.index, "key": p.key, "name": p.name, **item.as_dict()} for p, item in zip(plans, items)],
        "thumbs": encode_thumbs(thumbs, thumb_items),
    }


def chunk_items(report: dict | None) -> dict[tuple[str, str], ReportItem]:
    """A chunk report's items by (pair key, output name): merged by what the pair is, never by
    position. One key can have two names (the same bytes under two file names; two manifest rows
    naming two outputs): each keeps its own line. A report written before names were recorded
    has them as "" (``item_of`` falls back to the key alone)."""
    return {(item.get("key"), item.get("name", "")): ReportItem(
        **{k: v for k, v in item.items() if k not in ("index", "key", "name")})
        for item in (report or {}).get("items", [])}


def item_of(items: dict[tuple[str, str], ReportItem], plan: PairPlan) -> ReportItem | None:
    """``plan``'s item among ``chunk_items``, or None."""
    return items.get((plan.key, plan.name)) or items.get((plan.key, ""))


# --- contact-sheet rows ------------------------------------------------------------------------------

class ThumbRow(tuple):
    """A contact-sheet row's (content, style, result) thumbnail bytes, plus the pair it shows
    (its content and style URIs) when it travelled without its report item (a chunk report)."""

    def __new__(cls, images, content: str = "", style: str = ""):
        row = super().__new__(cls, images)
        row.content, row.style = content, style
        return row


def encode_thumbs(thumbs: list[tuple[bytes, bytes, bytes]], items: list[ReportItem] = ()) -> list[list[str]]:
    """Rows of 5 fields: the three thumbnails in base64, then the content and style URIs of
    ``items[n]`` (its pair: the parent captions the contact sheet from them; left out without one)."""
    return [[*(base64.b64encode(t).decode() for t in row[:3]),
             *((items[n].content, items[n].style) if n < len(items) else ())] for n, row in enumerate(thumbs)]


def decode_thumbs(rows: list[list[str]]) -> list[ThumbRow]:
    return [ThumbRow(tuple(base64.b64decode(t) for t in row[:3]), *row[3:5]) for row in rows]

