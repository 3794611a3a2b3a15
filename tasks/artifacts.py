"""A batch run's results where Prefect users look: the flow run's Artifacts tab and Artifacts page.

- ``write_pictures``: the contact sheet and the loss curve, written under ``{output}/_runs/``
  beside the run report (rendered by tasks/report.py), with ``run_warning`` across the top.
- ``RunProgress``: a progress artifact whose description carries pairs/s and the ETA; the last
  state is always sent.
- ``publish_artifacts``: image artifacts (contact sheet, loss curve), a table of pairs with
  links to each output and sidecar, a link artifact to the run report, and a summary that links
  the chunk runs. Keys are per deployment (``stylize-batch-nightly-summary``), so scheduled runs
  build a history on the Artifacts page; runs outside a deployment create unkeyed artifacts.
  The UI titles a keyed card with its key, so every description starts with what the artifact
  is, of which run (and attempt), and what it shows, in words.

What a browser can open: S3 objects get presigned GET URLs valid ``output.link_expiry_hours``
(default and S3's maximum: 7 days; the descriptions say until when), or until the temporary
credentials that sign them expire, if sooner (a worker's IAM role: ``links_note``). A local folder has no
URL a browser may load from the UI's http page (``file://`` is blocked there), so its contact
sheet and loss curve are embedded in the image artifacts as ``data:`` URLs (small: JPEG/PNG
thumbnails), and the table names local files as plain paths. Links are signed, and sidecars
read, with the credentials of the output storage they are given (``Storage.credentials``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

from nst_core.errors import hide_userinfo
from tasks.contract import DONE, SKIPPED, contact_sheet_key, loss_curve_key
from tasks.credentials import DEFAULT_CHAIN, StorageCredentials
from tasks.report import (Curve, SheetRow, contact_sheet, file_name, loss_curve_png, md_code, md_text,
                          summary_markdown, table_rows)

__all__ = ["artifact_key", "browser_url", "links_note", "image_url", "write_pictures", "run_warning", "run_label", "RunProgress",
           "publish_artifacts", "MAX_EMBEDDED_BYTES", "RANDOM_WEIGHTS_WARNING"]

#: On the pictures and the summary of every run whose weights id says random (chosen or a fallback).
RANDOM_WEIGHTS_WARNING = ("RANDOM VGG16 weights (weights=random): these images show the pipeline working, "
                          "not real style transfer")

#: A picture larger than this is not embedded as a data: URL (the artifact lives in the API's database).
MAX_EMBEDDED_BYTES = 1_500_000
#: Most pairs a run's loss curve draws (their sidecars are read for it).
CURVES_LIMIT = 200
_KEY_CHARS = re.compile(r"[^a-z0-9-]+")


def artifact_key(kind: str, flow_name: str = "stylize-batch") -> str | None:
    """``{flow}-{deployment}-{kind}`` in the characters Prefect allows (lowercase letters, digits,
    dashes), or None outside a deployment (an ad-hoc run must not mix into a deployment's history).
    A deployment name those characters cannot spell as is gets 6 hex digits of its hash after it."""
    from prefect.runtime import deployment

    name = deployment.name
    if not name:
        return None
    spelled = re.sub("-{2,}", "-", _KEY_CHARS.sub("-", name.lower())).strip("-")
    if spelled != name:  # "Nightly" and "nightly!" (or 夜間 and 毎日) must not share one history
        spelled = f"{spelled}-{hashlib.sha256(name.encode()).hexdigest()[:6]}".strip("-")
    return f"{flow_name}-{spelled}-{kind}"


def browser_url(uri: str, expiry_hours: int, credentials: StorageCredentials = DEFAULT_CHAIN) -> str | None:
    """A URL a browser can GET for ``uri``: presigned for s3:// (signed here; no request to S3), else None."""
    if not uri or not uri.startswith("s3://"):
        return None
    from tasks.storage import presigned_url

    return presigned_url(uri, int(expiry_hours * 3600), credentials)


def links_note(expiry_hours: int, credentials: StorageCredentials = DEFAULT_CHAIN) -> str:
    """Until when the presigned links of ``credentials`` open: the hours asked, or less where the
    temporary credentials that sign them (an IAM role's) expire first (``storage.presigned_url``)."""
    from tasks.storage import signing_expiry

    until = datetime.now(timezone.utc) + timedelta(hours=expiry_hours)
    temporary, expiry = signing_expiry(credentials)
    if expiry is not None and expiry < until:
        return (f"links valid until {expiry:%Y-%m-%d %H:%M} UTC, when the temporary credentials that signed them "
                f"expire ({expiry_hours} h asked)")
    note = f"links valid {expiry_hours} h, until {until:%Y-%m-%d %H:%M} UTC"
    return note + (", unless the temporary credentials (a session token) that signed them expire first"
                   if temporary and expiry is None else "")


def image_url(uri: str, data: bytes, mime: str, expiry_hours: int,
              credentials: StorageCredentials = DEFAULT_CHAIN) -> str | None:
    """Presigned URL for S3; a data: URL for anything else when small enough."""
    url = browser_url(uri, expiry_hours, credentials)
    if url is None and len(data) <= MAX_EMBEDDED_BYTES:
        url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return url


def run_warning(weights_id: str, labels: dict[str, str] | None = None) -> str | None:
    """What the pictures and the summary must say first: the run's ``warning`` label (the demo's
    fallback explains itself), else the random-weights warning for any run on random weights."""
    given = (labels or {}).get("warning")
    return given or (RANDOM_WEIGHTS_WARNING if weights_id.startswith("random") else None)


def _read_histories(items: list[dict], io_workers: int, limit: int, credentials: StorageCredentials) -> list[Curve]:
    """The loss curves of up to ``limit`` pairs done by this run (or, when it did none, of the pairs
    it skipped as already done: their results exist), from each sidecar's ``loss_history`` and
    ``scales`` (one read each, concurrently; unreadable ones skipped). The first read that fails
    for the storage's sake (a timeout, a dropped connection) ends the reading: an endpoint that went
    silent at the end of a run cost each of 200 reads its 60 s timeout, 13-25 minutes in all."""
    from tasks.storage import StorageError, is_transient, split_uri

    storage_down = threading.Event()

    def one(item: dict):
        hist, scales = item.get("loss_history") or item.get("history"), ()
        if not hist and item.get("sidecar"):
            if storage_down.is_set():
                return None
            try:
                storage, key = split_uri(item["sidecar"], credentials)
                meta = json.loads(storage.read(key)[0])
                hist, scales = meta.get("loss_history"), meta.get("scales") or ()
            except (StorageError, OSError, ValueError, AttributeError) as err:
                if is_transient(err):
                    storage_down.set()
                return None
        if not hist or not hist.get("total"):
            return None
        totals = hist["total"]
        evaluations = hist.get("evaluations") or [1 + i * hist.get("every", 1) for i in range(len(totals))]
        return Curve(_caption(item, with_loss=False), evaluations, totals, list(scales))

    done = [i for i in items if i.get("status") == DONE] or [i for i in items if i.get("status") == SKIPPED]
    with ThreadPoolExecutor(max_workers=max(1, min(io_workers, 16))) as pool:
        return [c for c in pool.map(one, done[:limit]) if c]


def _caption(item: dict, with_loss: bool = True) -> str:
    from tasks.report import final_loss

    text = f"{file_name(item['content'])} + {file_name(item['style'])}"  # ASCII: Pillow's default font has no ×
    loss = final_loss(item) if with_loss else None
    return f"{text}   final loss {loss:.4g}" if loss is not None else text


def write_pictures(out, run_id: str, items: list[dict], thumbs: list[tuple[bytes, bytes, bytes]],
                   thumb_items: list[dict] | None = None, warning: str | None = None, io_workers: int = 8,
                   curves_limit: int = CURVES_LIMIT, attempt: int = 1) -> dict[str, str | None]:
    """Contact sheet (``contact_sheet_key``) and loss curve (``loss_curve_key``) of attempt
    ``attempt`` of run ``run_id``.

    ``thumb_items[i]`` is the report item ``thumbs[i]`` shows (its caption: file names and final
    loss); a ``ThumbRow`` without one is matched to its done item by content and style; rows
    with neither are left uncaptioned rather than guessed. An attempt that stylized nothing (a
    Retry of a finished run) has no thumbnails: it points at the latest earlier attempt's sheet.
    Returns their URIs (None when there is nothing to show) to record in the report.
    """
    from tasks.storage import StorageError, retrying

    uris: dict[str, str | None] = {"contact_sheet": None, "loss_curve": None}
    if thumbs:
        given = list(thumb_items or [])
        by_pair = {(i.get("content"), i.get("style")): i for i in items if i.get("status") == DONE}

        def caption(n: int, row) -> str:
            item = given[n] if n < len(given) else by_pair.get((getattr(row, "content", ""), getattr(row, "style", "")))
            return _caption(item) if item else ""

        rows = [SheetRow(*t[:3], caption=caption(n, t)) for n, t in enumerate(thumbs)]
        sheet = _drawn("contact sheet", lambda: contact_sheet(rows, warning=warning))
        if sheet is not None:
            uris["contact_sheet"] = _write_picture(out, contact_sheet_key(run_id, attempt), sheet, "image/jpeg",
                                                   "contact sheet")
    else:
        for earlier in range(attempt - 1, 0, -1):
            try:
                if retrying(lambda: out.info(contact_sheet_key(run_id, earlier))) is not None:
                    uris["contact_sheet"] = out.uri_for(contact_sheet_key(run_id, earlier))
                    break
            except (StorageError, OSError):
                break  # no picture is better than a failed run
    curves = _read_histories(items, io_workers, curves_limit, out.credentials)
    if curves:
        key = loss_curve_key(run_id, attempt)
        random = warning and "random" in warning.lower()
        title = f"total loss per evaluation, {len(curves)} pair(s)" + (" (RANDOM weights)" if random else "")
        curve = _drawn("loss curve", lambda: loss_curve_png(curves, title=title))
        if curve is not None:
            uris["loss_curve"] = _write_picture(out, key, curve, "image/png", "loss curve")
    return uris


def _drawn(what: str, draw) -> bytes | None:
    """``draw()``, or None with a warning when drawing fails on something no test foresaw (a
    caption, a loss Pillow cannot plot): a picture is a view of the pairs, never worth the run."""
    try:
        return draw()
    except Exception as err:  # noqa: BLE001 - whatever the picture met, the report is written without it
        _run_logger().warning("%s not drawn (%s: %s); the run report goes on without it", what,
                              type(err).__name__, err)
        return None


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger (its lines show on the run's page in the UI), else this module's."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def _write_picture(out, key: str, data: bytes, content_type: str, what: str) -> str | None:
    """Write one of the run's pictures; its URI, or None with a warning when the storage refuses it
    (a full disk, storage that gave up): a picture is a view of the pairs, never worth the report."""
    from tasks.storage import StorageError, retrying

    try:
        retrying(lambda: out.write(key, data, content_type))
    except (StorageError, OSError) as err:
        _run_logger().warning("%s not written (%s: %s); the run report goes on without it", what,
                              type(err).__name__, err)
        return None
    return out.uri_for(key)


#: How long a stopping run waits for its progress card's last update (RunProgress.stopped), at most
#: twice: for the lock, then for the API. Small, because `nst` exits at once 10 s after Ctrl-C or
#: SIGTERM (flows/cli.py), and the run marks its report stopped and asks whether it was cancelled first.
STOP_UPDATE_WAIT_S = 2.0


class RunProgress:
    """The run's progress artifact: the pairs finished out of those to run (plus how many were
    already done), with pairs/s and the ETA in its description.

    Updates within ``every_s`` of the last one sent are held back (a 10,000-pair run makes a few
    hundred API calls, not 10,000), and the latest one held is sent when the interval ends, so the
    card never stays behind when a chunk's pairs arrive at once. ``close`` drops a pending one.
    """

    def __init__(self, total: int, every_s: float = 2.0, pairs: int | None = None, already: int = 0,
                 run_name: str | None = None):
        from prefect.artifacts import create_progress_artifact

        self.total, self.every_s = total, every_s
        self.pairs, self.already = (total + already if pairs is None else pairs), already
        self.prefix = f"Progress of run {run_name}: " if run_name else ""  # run_label: Markdown already
        self.started = time.monotonic()
        self._last = 0.0
        self._held: int | None = None
        self.finished = 0  # the last count given to update
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._stop: tuple[float, str] | None = None  # the card's last word once the run stopped
        try:
            self.id = create_progress_artifact(0.0, key=artifact_key("progress"),
                                               description=self.prefix + self.describe(0))
        except Exception as err:  # a progress card must never fail a run: the run goes on without one
            logging.getLogger(__name__).warning("could not create the progress artifact: %s", hide_userinfo(str(err)))
            self.id = None

    def describe(self, finished: int, now: float | None = None) -> str:
        if self.total == 0:
            rest = self.pairs - self.already  # refused or unreadable at planning, or a repeat of another pair
            if not self.already:
                return f"nothing to run: {rest} of {self.pairs} pairs failed at planning or repeat another (see the report)"
            return f"{self.already} of {self.pairs} already done, nothing to run" + (
                f"; {rest} failed at planning or repeat another" if rest else "")
        elapsed = max((now or time.monotonic()) - self.started, 1e-6)
        rate = finished / elapsed
        text = f"{finished} of {self.total} pairs finished, {rate:.2f} pairs/s"
        if 0 < finished < self.total and rate > 0:
            eta = datetime.now(timezone.utc) + timedelta(seconds=(self.total - finished) / rate)
            text += f", ETA {eta:%H:%M:%S} UTC (in {_duration((self.total - finished) / rate)})"
        elif finished >= self.total:
            text += f", took {_duration(elapsed)}"
        return text + (f"; {self.already} of {self.pairs} already done" if self.already else "")

    def update(self, finished: int, final: bool = False) -> None:
        if self._stop is not None:  # a pair that finishes after the stop changes nothing
            return
        with self._lock:
            self.finished = finished
            wait = self._last + self.every_s - time.monotonic()
            if final or wait <= 0:
                self._cancel()
                self._send(finished, final)
            else:
                self._held = finished
                if self._timer is None:  # send the latest held state when the interval ends
                    self._timer = threading.Timer(wait, self._flush)
                    self._timer.daemon = True
                    self._timer.start()

    def close(self) -> None:
        with self._lock:
            self._cancel()

    def stopped(self, why: str, wait_s: float = STOP_UPDATE_WAIT_S, found: int = 0) -> None:
        """The last update of a run that stopped before its pairs finished (Ctrl-C, a cancel, an
        error): what it finished and why, no rate or ETA, which would say it still runs. ``found``:
        pairs found made in storage at the stop, not yet counted. Waits at most ``wait_s`` for the
        lock (a held-back update may be posting under it) and as long for the API."""
        if self._lock.acquire(timeout=wait_s):  # else the holder is posting: nothing pending to drop
            try:
                self._cancel()
            finally:
                self._lock.release()
        finished = min(self.total, self.finished + found)
        text = f"stopped after {finished} of {self.total} pairs ({md_text(why)})"  # an error: it may name inputs
        text += f"; {self.already} of {self.pairs} already done" if self.already else ""
        self._stop = (100.0 * finished / self.total if self.total else 100.0, text)
        post = threading.Thread(target=self._post, args=self._stop, daemon=True)
        post.start()
        post.join(wait_s)

    def _flush(self) -> None:
        with self._lock:
            self._timer = None
            if self._held is not None:
                self._send(self._held, False)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._held = None

    def _send(self, finished: int, final: bool) -> None:
        now = time.monotonic()
        self._last = now
        self._post(100.0 if final or self.total == 0 else 100.0 * finished / self.total, self.describe(finished, now))
        if self._stop is not None:  # the run stopped while this one was in the API: say so again, after it
            self._post(*self._stop)

    def _post(self, pct: float, description: str) -> None:
        from prefect.artifacts import update_progress_artifact

        if self.id is None:
            return
        try:
            update_progress_artifact(self.id, pct, description=self.prefix + description)
        except Exception as err:  # a progress card must never fail a run
            logging.getLogger(__name__).warning("could not update the progress artifact: %s", hide_userinfo(str(err)))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _ui_url(path: str) -> str | None:
    from prefect.settings import get_current_settings

    ui = get_current_settings().ui_url  # derived from PREFECT_API_URL, its user:password@ and all
    return f"{hide_userinfo(ui).rstrip('/')}/{path}" if ui else None


def run_label(name: str | None, attempt: int = 1) -> str:
    """How descriptions name a run: its name, and which attempt (Prefect's Retry runs the same
    flow run again, and all its attempts' artifacts show on the one run page)."""
    return f"{md_text(name)} (attempt {attempt})" if attempt > 1 else md_text(name)


def publish_artifacts(report: dict, out, expiry_hours: int, warning: str | None = None,
                      seconds: float | None = None, unwritten: str = "") -> dict[str, object]:
    """Create the run's artifacts from its report dict (the one written to ``report["report"]``;
    ``unwritten``: why it could not be, and the cards say so instead of linking it).

    Returns the artifact ids by kind (tests read them back through the API).
    """
    from prefect.artifacts import (create_image_artifact, create_link_artifact, create_markdown_artifact,
                                   create_table_artifact)
    from tasks.storage import StorageError, split_uri

    expiry_note = links_note(expiry_hours, out.credentials) if out.uri.startswith("s3://") else ""
    attempt = report.get("attempt", 1)
    run = run_label(report.get("flow_run"), attempt)
    ids: dict[str, object] = {}
    credentials = out.credentials

    def link(uri: str) -> str | None:
        return browser_url(uri, expiry_hours, credentials)

    links: dict[str, str | None] = {"report": link(report["report"])}
    counts = report["totals"]
    # with none made here, write_pictures drew the curves of the pairs earlier runs made (their sidecars)
    whose = "each pair" if counts.get("done") else "the pairs earlier runs made (all skipped in this one)"
    shows = {
        "contact_sheet": ("Contact sheet", "content, style and result of the pairs this run stylized (not those "
                                           "it skipped), captioned with the file names and the final loss"),
        "loss_curve": ("Loss curve", f"total loss per evaluation of {whose} (the first {CURVES_LIMIT} at most), "
                                     "log scale; a dashed line marks where each finer scale starts"),
    }
    for kind, mime in (("contact_sheet", "image/jpeg"), ("loss_curve", "image/png")):
        uri = report.get(kind)
        if not uri:
            continue
        try:
            storage, key = split_uri(uri, credentials)
            url = image_url(uri, storage.read(key)[0], mime, expiry_hours, credentials)
        except (StorageError, OSError):
            url = None
        links[kind] = link(uri)
        if url:
            what, shown = shows[kind]
            if kind == "contact_sheet" and attempt > 1 and f"-attempt-{attempt}-" not in uri:  # it drew none
                drawn_by = int(m.group(1)) if (m := re.search(r"-attempt-(\d+)-", uri)) else 1
                # that sheet holds the pairs that attempt made, not this one's: "each pair" misled
                shown = (f"content, style and result of the pairs attempt {drawn_by} stylized, captioned with the "
                         "file names and the final loss; " +
                         ("this attempt's pairs came back from chunk runs without thumbnails" if counts.get("done")
                          else "this attempt stylized nothing"))
            how = expiry_note if url.startswith("http") else f"embedded copy of {md_code(uri)}"
            ids[kind] = create_image_artifact(url, key=artifact_key(kind.replace("_", "-")),
                                              description=f"{what} of run {run}: {shown} ({how}).")

    items = report.get("items", [])
    rows = table_rows(items, link=link)
    which = f"; the first {len(rows)} of {len(items)} (the run report has all)" if len(rows) < len(items) else ""
    table_note = f" ({expiry_note})" if report["report"].startswith("s3://") else ""
    ids["table"] = create_table_artifact(
        rows, key=artifact_key("pairs"),
        description=f"Pairs of run {run}: status, file names, output and sidecar, final loss, seconds and error "
                    f"of each pair{which}{table_note}.")
    what = f"Run report of run {run}: the JSON record of every pair (inputs, outputs, losses, errors) and of the run's settings"
    if unwritten:  # its key holds the run's "running" probe, or nothing: no link to it as the record
        links["report"] = None
        ids["report"] = create_markdown_artifact(
            f"Not written ({md_text(unwritten)}): {md_code(report['report'])} holds this run's \"running\" record "
            "if its first write went through, which the next run on this output marks crashed. The pairs are in "
            "the table.",
            key=artifact_key("report"), description=f"Run report of run {run}: not written, the storage failed.")
    elif links["report"]:
        # the UI renders it as [link_text](link): a bracket in the output prefix would make its own link
        ids["report"] = create_link_artifact(links["report"], link_text=md_text(report["report"]), key=artifact_key("report"),
                                             description=f"{what} ({expiry_note}).")
    else:  # a local path: as a link, the UI would open it on its own host, where it is not
        ids["report"] = create_markdown_artifact(md_code(report["report"]), key=artifact_key("report"),
                                                 description=f"{what}: a file on the machine that ran it.")
    chunk_links = [(c, _ui_url(f"runs/flow-run/{c['flow_run_id']}")) for c in report.get("chunks", [])]
    rate = None
    if seconds and counts.get("done"):
        # the whole run, planning and reports included: the progress card's rate counts the pairs' own
        # time and failed pairs too, so the two differ; each says what it counts
        rate = (f"{counts['done']} pairs stylized in {_duration(seconds)} from start to report: "
                f"{counts['done'] / seconds:.2f} pairs/s")
    ids["summary"] = create_markdown_artifact(
        summary_markdown(report, links, chunk_links, warning, rate, unwritten), key=artifact_key("summary"),
        description=f"Summary of run {run}: totals, pairs/s, links to the report and pictures, chunk runs and "
                    f"failures{table_note}.")
    return ids
