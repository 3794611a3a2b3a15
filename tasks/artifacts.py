"""A batch run's results where Prefect users look: the flow run's Artifacts tab and Artifacts page.

- ``write_pictures``: the contact sheet and the loss curve, written under ``{output}/_runs/``
  beside the run report (rendered by tasks/report.py).
- ``RunProgress``: a progress artifact whose description carries pairs/s and the ETA.
- ``publish_artifacts``: image artifacts (contact sheet, loss curve), a table of pairs with
  links to each output and sidecar, a link artifact to the run report, and a summary that links
  the chunk runs. Keys are per deployment (``stylize-batch-nightly-summary``), so scheduled runs
  build a history on the Artifacts page; runs outside a deployment create unkeyed artifacts.

What a browser can open: S3 objects get presigned GET URLs valid ``output.link_expiry_hours``
(default and S3's maximum: 7 days; the descriptions say until when). A local folder has no
URL a browser may load from the UI's http page (``file://`` is blocked there), so its contact
sheet and loss curve are embedded in the image artifacts as ``data:`` URLs (small: JPEG/PNG
thumbnails), and the table names local files as plain paths. Links are signed, and sidecars
read, with the credentials of the output storage they are given (``Storage.credentials``).
"""

from __future__ import annotations

import base64
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

from tasks.contract import DONE, contact_sheet_key, loss_curve_key
from tasks.credentials import DEFAULT_CHAIN, StorageCredentials
from tasks.report import SheetRow, contact_sheet, loss_curve_png, summary_markdown, table_rows

__all__ = ["artifact_key", "browser_url", "image_url", "write_pictures", "RunProgress", "publish_artifacts",
           "MAX_EMBEDDED_BYTES"]

#: A picture larger than this is not embedded as a data: URL (the artifact lives in the API's database).
MAX_EMBEDDED_BYTES = 1_500_000
_KEY_CHARS = re.compile(r"[^a-z0-9-]+")


def artifact_key(kind: str, flow_name: str = "stylize-batch") -> str | None:
    """``{flow}-{deployment}-{kind}`` in the characters Prefect allows (lowercase letters, digits,
    dashes), or None outside a deployment (an ad-hoc run must not mix into a deployment's history)."""
    from prefect.runtime import deployment

    name = deployment.name
    if not name:
        return None
    key = _KEY_CHARS.sub("-", f"{flow_name}-{name}-{kind}".lower()).strip("-")
    return re.sub("-{2,}", "-", key)


def browser_url(uri: str, expiry_hours: int, credentials: StorageCredentials = DEFAULT_CHAIN) -> str | None:
    """A URL a browser can GET for ``uri``: presigned for s3:// (no network call), else None."""
    if not uri or not uri.startswith("s3://"):
        return None
    from tasks.storage import presigned_url

    return presigned_url(uri, int(expiry_hours * 3600), credentials)


def image_url(uri: str, data: bytes, mime: str, expiry_hours: int,
              credentials: StorageCredentials = DEFAULT_CHAIN) -> str | None:
    """Presigned URL for S3; a data: URL for anything else when small enough."""
    url = browser_url(uri, expiry_hours, credentials)
    if url is None and len(data) <= MAX_EMBEDDED_BYTES:
        url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return url


def _read_histories(items: list[dict], io_workers: int, limit: int,
                    credentials: StorageCredentials) -> list[tuple[str, list[int], list[float]]]:
    """(label, evaluations, totals) of up to ``limit`` done pairs, from the report item when it has
    the compact history, else from its sidecar (one read each, concurrently; unreadable ones skipped)."""
    from tasks.storage import StorageError, split_uri

    def one(item: dict):
        hist = item.get("loss_history") or item.get("history")
        if not hist and item.get("sidecar"):
            try:
                storage, key = split_uri(item["sidecar"], credentials)
                hist = json.loads(storage.read(key)[0]).get("loss_history")
            except (StorageError, OSError, ValueError):
                return None
        if not hist or not hist.get("total"):
            return None
        totals = hist["total"]
        evaluations = hist.get("evaluations") or [1 + i * hist.get("every", 1) for i in range(len(totals))]
        return _caption(item, with_loss=False), evaluations, totals

    done = [i for i in items if i.get("status") == DONE][:limit]
    with ThreadPoolExecutor(max_workers=max(1, min(io_workers, 16))) as pool:
        return [c for c in pool.map(one, done) if c]


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _caption(item: dict, with_loss: bool = True) -> str:
    from tasks.report import final_loss

    text = f"{_name(item['content'])} + {_name(item['style'])}"  # ASCII: Pillow's default font has no ×
    loss = final_loss(item) if with_loss else None
    return f"{text}   final loss {loss:.4g}" if loss is not None else text


def write_pictures(out, run_id: str, items: list[dict], thumbs: list[tuple[bytes, bytes, bytes]],
                   thumb_items: list[dict] | None = None, warning: str | None = None, io_workers: int = 8,
                   curves_limit: int = 200) -> dict[str, str | None]:
    """Contact sheet (``contact_sheet_key``) and loss curve (``loss_curve_key``) of run ``run_id``.

    ``thumb_items[i]`` is the report item ``thumbs[i]`` shows (its caption: file names and final
    loss); a ``ThumbRow`` without one is matched to its done item by content and style; rows
    with neither are left uncaptioned rather than guessed. Returns their URIs (None when there
    was nothing to draw) to record in the report.
    """
    from tasks.storage import retrying

    uris: dict[str, str | None] = {"contact_sheet": None, "loss_curve": None}
    if thumbs:
        given = list(thumb_items or [])
        by_pair = {(i.get("content"), i.get("style")): i for i in items if i.get("status") == DONE}

        def caption(n: int, row) -> str:
            item = given[n] if n < len(given) else by_pair.get((getattr(row, "content", ""), getattr(row, "style", "")))
            return _caption(item) if item else ""

        rows = [SheetRow(*t[:3], caption=caption(n, t)) for n, t in enumerate(thumbs)]
        key = contact_sheet_key(run_id)
        data = contact_sheet(rows, warning=warning)
        retrying(lambda: out.write(key, data, "image/jpeg"))
        uris["contact_sheet"] = out.uri_for(key)
    curves = _read_histories(items, io_workers, curves_limit, out.credentials)
    if curves:
        key = loss_curve_key(run_id)
        title = f"total loss per evaluation, {len(curves)} pair(s)" + (" (random weights)" if warning else "")
        data = loss_curve_png(curves, title=title)
        retrying(lambda: out.write(key, data, "image/png"))
        uris["loss_curve"] = out.uri_for(key)
    return uris


class RunProgress:
    """The run's progress artifact: percent done, with pairs/s and the ETA in its description.

    Updates are throttled (a 10,000-pair run makes a few hundred API calls, not 10,000).
    """

    def __init__(self, total: int, every_s: float = 2.0):
        from prefect.artifacts import create_progress_artifact

        self.total, self.every_s = total, every_s
        self.started = time.monotonic()
        self._last = 0.0
        self.id = create_progress_artifact(0.0, key=artifact_key("progress"),
                                           description=f"0 of {total} pairs finished")

    def describe(self, finished: int, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.started, 1e-6)
        rate = finished / elapsed
        text = f"{finished} of {self.total} pairs finished, {rate:.2f} pairs/s"
        if 0 < finished < self.total and rate > 0:
            eta = datetime.now(timezone.utc) + timedelta(seconds=(self.total - finished) / rate)
            text += f", ETA {eta:%H:%M:%S} UTC (in {_duration((self.total - finished) / rate)})"
        elif finished >= self.total:
            text += f", took {_duration(elapsed)}"
        return text

    def update(self, finished: int, final: bool = False) -> None:
        from prefect.artifacts import update_progress_artifact

        now = time.monotonic()
        if not final and now - self._last < self.every_s:
            return
        self._last = now
        pct = 100.0 * finished / max(self.total, 1)
        update_progress_artifact(self.id, 100.0 if final else pct, description=self.describe(finished, now))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _ui_url(path: str) -> str | None:
    from prefect.settings import get_current_settings

    ui = get_current_settings().ui_url
    return f"{ui.rstrip('/')}/{path}" if ui else None


def publish_artifacts(report: dict, out, expiry_hours: int, warning: str | None = None,
                      seconds: float | None = None) -> dict[str, object]:
    """Create the run's artifacts from its report dict (the one written to ``report["report"]``).

    Returns the artifact ids by kind (tests read them back through the API).
    """
    from prefect.artifacts import (create_image_artifact, create_link_artifact, create_markdown_artifact,
                                   create_table_artifact)
    from tasks.storage import StorageError, split_uri

    until = datetime.now(timezone.utc) + timedelta(hours=expiry_hours)
    expiry_note = f"links valid {expiry_hours} h, until {until:%Y-%m-%d %H:%M} UTC"
    run_name = report.get("flow_run")
    ids: dict[str, object] = {}
    credentials = out.credentials

    def link(uri: str) -> str | None:
        return browser_url(uri, expiry_hours, credentials)

    links: dict[str, str | None] = {"report": link(report["report"])}

    for kind, mime, what in (("contact_sheet", "image/jpeg", "Contact sheet"), ("loss_curve", "image/png", "Loss curve")):
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
            how = expiry_note if url.startswith("http") else f"embedded copy of {uri}"
            ids[kind] = create_image_artifact(url, key=artifact_key(kind.replace("_", "-")),
                                              description=f"{what} of {run_name} ({how})")

    items = report.get("items", [])
    rows = table_rows(items, link=link)
    which = f"first {len(rows)} of {len(items)} pairs (all are in the run report)" if len(rows) < len(items) else "pairs"
    ids["table"] = create_table_artifact(rows, key=artifact_key("pairs"),
                                         description=f"{which.capitalize()} of {run_name}: outputs and sidecars "
                                                     f"({expiry_note})" if report["report"].startswith("s3://")
                                         else f"{which.capitalize()} of {run_name}")
    ids["report"] = create_link_artifact(links["report"] or report["report"], link_text=report["report"],
                                         key=artifact_key("report"),
                                         description=f"Run report of {run_name}"
                                         + (f" ({expiry_note})" if links["report"] else ""))
    chunk_links = [(c, _ui_url(f"runs/flow-run/{c['flow_run_id']}")) for c in report.get("chunks", [])]
    counts = report["totals"]
    rate = None
    if seconds and counts.get("done"):
        rate = f"{counts['done']} pairs in {_duration(seconds)}: {counts['done'] / seconds:.2f} pairs/s"
    ids["summary"] = create_markdown_artifact(summary_markdown(report, links, chunk_links, warning, rate),
                                              key=artifact_key("summary"), description=f"Summary of {run_name}")
    return ids
