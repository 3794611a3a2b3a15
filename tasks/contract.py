"""The storage contract of a batch run, in one place (DESIGN.md "Storage contract").

Naming
    One pair's result is ``{output}/{name}.{ext}`` and its sidecar ``{output}/{name}.json``.
    ``name`` is ``{content_stem}__{style_stem}__{key8}`` (``key8`` = the first 8 hex digits of
    the pair key), or the manifest row's own ``output`` name (under the output prefix only).

Pair key
    SHA-256 hex of the content and style *identities* (S3 ETag or the file's SHA-256), every
    StyleParams field but ``device`` (it does not change what is asked for), the weights id,
    and the output encoding (``format``, ``quality``). Never computed from an empty identity:
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
    (``final`` is the *best* evaluation: the image written is the lowest-loss one),
    loss_history (<= 100 evaluations, every k-th plus the last), flow_run {id, name},
    labels, created, and the engine's metadata (params, weights_id, device, size,
    evaluations, seconds, versions).

Run report ``{output}/_runs/{flow_run_id}.json`` (``report_key``)
    Written first as {flow_run, flow_run_id, status: "running", started} (the preflight write probe),
    replaced by the report below at the end, or by {status: "crashed", error} when the run stops early.
    flow_run (name), flow_run_id, report, started, finished, source, output, params, run,
    weights_id, devices, totals {pairs, done, skipped, failed}, contact_sheet, chunks?, items
    (one ``ReportItem`` per pair: content, style, status, output, sidecar, error, seconds, losses, note;
    a repeated pair is "skipped" with a note naming the pair it duplicates).

Chunk report ``{output}/_runs/{parent_flow_run_id}/chunk-{chunk_key16}.json`` (``chunk_report_key``)
    flow_run, flow_run_id, worker {host, pid, parent_pid, devices}, items (ReportItem + index + key;
    the parent merges them by the pair key),
    thumbs (base64 JPEG triples).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import PurePosixPath
from urllib.parse import urlparse

from nst_core.params import StyleParams

__all__ = [
    "EXTENSIONS", "RUNS", "HISTORY_POINTS", "PairPlan", "ReportItem", "pair_key", "output_name", "naming_problem", "chunk_key",
    "report_key", "chunk_report_key", "sidecar", "image_record", "loss_history", "done_pairs", "done_in", "totals",
]

#: OutputSpec.format -> file extension.
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
#: Run and chunk reports (and the contact sheet) live under this folder of the output.
RUNS = "_runs"
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


@dataclass
class ReportItem:
    """One pair's line in a run or chunk report."""

    content: str
    style: str
    status: str  # done | skipped | failed
    output: str  # image URI ("" when the pair failed before it had a name)
    sidecar: str = ""  # sidecar URI
    error: str | None = None
    seconds: float | None = None
    losses: dict | None = None
    note: str | None = None  # e.g. why a pair was skipped

    def as_dict(self) -> dict:
        return asdict(self)


def pair_key(content_identity: str, style_identity: str, params: StyleParams, weights_id: str,
             fmt: str, quality: int) -> str:
    """SHA-256 hex over everything that determines a result file."""
    if not content_identity or not style_identity:
        raise ValueError("a pair key needs both input identities")  # never hash an empty identity
    blob = json.dumps(
        {"content": content_identity, "style": style_identity, "weights": weights_id,
         "params": params.model_dump(mode="json", exclude={"device"}),
         "output": {"format": fmt, "quality": quality}},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _stem(uri: str) -> str:
    return _UNSAFE_CHARS.sub("_", PurePosixPath(urlparse(uri).path).stem) or "image"


def output_name(content: str, style: str, key: str, explicit: str | None = None) -> str:
    """The output base name of a pair (no extension); a manifest's explicit name wins."""
    name = explicit or f"{_stem(content)}__{_stem(style)}__{key[:8]}"
    if explicit and PurePosixPath(name).suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"}:
        name = str(PurePosixPath(name).with_suffix(""))
    return name


def naming_problem(plan: PairPlan, fmt: str) -> str:
    """Why a plan's output keys break the naming rule ("" when they follow it): a safe name outside
    ``_runs/``, the image ``{name}.{ext}`` of the run's format, the sidecar ``{name}.json``.
    stylize-chunk checks the plans it is given: anyone who can start a flow run can write them."""
    from .storage import UnsafeKeyError, safe_key

    rule = f"{{name}}.{EXTENSIONS.get(fmt, fmt)} and {{name}}.json under the output, outside {RUNS}/"
    try:
        ok = safe_key(plan.name) == plan.name and plan.name.split("/")[0] != RUNS
    except UnsafeKeyError:
        ok = False
    if not ok or plan.image_key != f"{plan.name}.{EXTENSIONS.get(fmt)}" or plan.sidecar_key != f"{plan.name}.json":
        return f"output keys {plan.image_key!r}, {plan.sidecar_key!r} break the naming rule ({rule})"
    return ""


def chunk_key(pairs: list[PairPlan]) -> str:
    """A chunk's identity from its content (its pair keys and names), not its position: a retried
    parent that re-plans finds the child holding exactly these pairs, or starts a new one."""
    blob = "\n".join(f"{p.key} {p.name}" for p in pairs)
    return hashlib.sha256(blob.encode()).hexdigest()


def report_key(flow_run_id: str) -> str:
    return f"{RUNS}/{flow_run_id}.json"


def chunk_report_key(parent_flow_run_id: str, key: str) -> str:
    return f"{RUNS}/{parent_flow_run_id}/chunk-{key[:16]}.json"


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
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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
               io_workers: int = 8) -> set[int]:
    """Indexes of the plans that are done by the rule above.

    ``listed``: key -> ObjectInfo of everything under the output (one listing); without it,
    ``info`` gives one image's ObjectInfo (or None). ``read_sidecar``: its bytes, or None when missing.
    """
    candidates = [p for p in plans if p.runnable and (
        listed is None or (p.image_key in listed and p.sidecar_key in listed))]

    def check(p: PairPlan) -> bool:
        image = listed[p.image_key] if listed is not None else info(p.image_key)
        if image is None:
            return False
        raw = read_sidecar(p.sidecar_key)
        if raw is None:
            return False
        try:
            meta = json.loads(raw)
            return meta.get("key") == p.key and _image_matches(p, meta, image)
        except (ValueError, AttributeError, TypeError):
            return False  # a damaged sidecar: redo the pair

    if not candidates:
        return set()
    with ThreadPoolExecutor(max_workers=max(1, min(io_workers, len(candidates)))) as pool:
        return {p.index for p, ok in zip(candidates, pool.map(check, candidates)) if ok}


def done_in(storage, plans: list[PairPlan], list_once: bool = True, io_workers: int = 8) -> set[int]:
    """``done_pairs`` against a Storage: one listing of the output (a run), or one HEAD per image
    (a chunk, whose pairs are few). Reads are retried when transient."""
    from .storage import MissingObjectError, retrying

    def read_sidecar(key: str) -> bytes | None:
        try:
            return retrying(lambda: storage.read(key))[0]
        except MissingObjectError:
            return None

    listed = {info.key: info for info in retrying(storage.list)} if list_once else None
    return done_pairs(plans, read_sidecar, listed, lambda k: retrying(lambda: storage.info(k)), io_workers)


def totals(items: list[ReportItem]) -> dict[str, int]:
    return {
        "pairs": len(items),
        "done": sum(i.status == "done" for i in items),
        "skipped": sum(i.status == "skipped" for i in items),
        "failed": sum(i.status == "failed" for i in items),
    }

