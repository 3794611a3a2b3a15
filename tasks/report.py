"""Pictures and text of a finished batch run: contact sheet, loss curve, summary, table rows.

Pure rendering (Pillow, no matplotlib): bytes and strings in, bytes and strings out. Reading
the report and creating Prefect artifacts is tasks/artifacts.py's job; the report's schema
is tasks/contract.py's.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from .contract import FAILED, left_to_another, report_key

__all__ = ["SheetRow", "Curve", "contact_sheet", "loss_curve_png", "summary_markdown", "table_rows", "final_loss",
           "file_name", "MAX_TABLE_ROWS", "MAX_CHUNK_ROWS"]

_INK, _MUTED, _PAPER, _WARN = (40, 40, 40), (110, 110, 110), (250, 250, 250), (180, 20, 20)


@dataclass(frozen=True)
class SheetRow:
    """One contact-sheet row: content, style and result thumbnails (encoded images) and a caption."""

    content: bytes
    style: bytes
    result: bytes
    caption: str = ""


@dataclass(frozen=True)
class Curve:
    """One pair's total loss per evaluation (a sidecar's compact ``loss_history``) and its scales
    (the sidecar's ``scales``: ``[{"size": [w, h], "evaluations": n, ...}, ...]``, coarse to fine)."""

    label: str
    evaluations: list[int]
    totals: list[float]
    scales: list[dict] = ()

    def scale_starts(self) -> list[tuple[float, str]]:
        """(x between the last evaluation of a scale and the first of the next, "scale k/S (w×h)")
        for every scale after the first."""
        marks, done = [], 0
        for k, scale in enumerate(self.scales[:-1]):
            done += int(scale.get("evaluations") or 0)
            w, h = self.scales[k + 1].get("size") or ("?", "?")
            marks.append((done + 0.5, f"scale {k + 2}/{len(self.scales)} ({w}x{h})"))
        return marks

    def first_scale(self) -> str:
        """ "scale 1/S (w×h)" with several scales, else "". """
        if len(self.scales) < 2:
            return ""
        w, h = self.scales[0].get("size") or ("?", "?")
        return f"scale 1/{len(self.scales)} ({w}x{h})"


def file_name(uri: str) -> str:
    """The last part of a URI or path: what a person recognizes in a table or a caption."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def final_loss(item: dict) -> float | None:
    """The item's final (best) total loss, if it has one."""
    total = ((item.get("losses") or {}).get("final") or {}).get("total")
    return total if isinstance(total, (int, float)) and math.isfinite(total) else None


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut with an ellipsis in the middle so it fits ``width`` pixels (file names keep their ends)."""
    # on one line: Pillow refuses to measure a "\n" (local names and S3 keys may hold one), and that
    # ValueError failed the run after all its pairs were made, every time such a pair was made
    text = text.replace("\n", " ")
    if draw.textlength(text, font=font) <= width:
        return text

    def cut(keep: int) -> str:
        return text[: keep // 2] + "…" + text[len(text) - keep // 2:]

    # the most characters kept that fit, by bisection: measuring one cut per character kept was
    # quadratic in the caption (a 200-row sheet of 250-character names took ~50 s)
    lo, hi = 3, len(text) - 1  # cut(lo) fits or lo is 3; cut(hi + 1) does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if draw.textlength(cut(mid), font=font) <= width:
            lo = mid
        else:
            hi = mid - 1
    return cut(lo) if lo >= 4 else text[:4]


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def contact_sheet(rows: list[SheetRow], cell: int = 128, warning: str | None = None) -> bytes:
    """content | style | result, one row per pair, every cell ``cell`` x ``cell`` px, as JPEG bytes.

    Each thumbnail is scaled to fit its cell and centred on it, so cells line up whatever the
    images' shapes. A caption line under each row names the pair (file names, final loss); a
    ``warning`` (e.g. random weights) is printed across the top in red.
    """
    pad, head, caption_h = 6, 20, 16
    width = 3 * cell + 4 * pad
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    small, bold = _font(11), _font(13)
    warn_lines = _wrap(probe, f"WARNING: {warning}", bold, width - 2 * pad) if warning else []
    top = pad + len(warn_lines) * 16 + head
    row_h = cell + caption_h + pad
    sheet = Image.new("RGB", (width, top + len(rows) * row_h + pad), _PAPER)
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(warn_lines):
        draw.text((pad, pad + 16 * i), line, fill=_WARN, font=bold)
    for col, label in enumerate(("content", "style", "result")):
        draw.text((pad + col * (cell + pad), top - head + 3), label, fill=_MUTED, font=small)
    for r, row in enumerate(rows):
        y0 = top + r * row_h
        for c, data in enumerate((row.content, row.style, row.result)):
            x0 = pad + c * (cell + pad)
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=(232, 232, 232))
            img = Image.open(io.BytesIO(data)).convert("RGB")
            scale = min(cell / img.width, cell / img.height)  # fit the cell, up or down
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
            sheet.paste(img, (x0 + (cell - img.width) // 2, y0 + (cell - img.height) // 2))
        if row.caption:
            draw.text((pad, y0 + cell + 2), _fit(draw, row.caption, small, width - 2 * pad), fill=_INK, font=small)
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def loss_curve_png(curves: list, title: str = "total loss per evaluation",
                   size: tuple[int, int] = (720, 420), legend_rows: int = 8) -> bytes:
    """All pairs' total loss against evaluation number, one polyline each, on a log10 axis, as PNG bytes.

    ``curves``: ``Curve``s (or ``(label, evaluations, totals[, scales])`` tuples). Log scale because
    the first evaluations are often 10-100x the last; non-positive or non-finite values are left
    out of a line. With several scales the loss jumps where a finer scale starts (a new image size,
    a new sum): a dashed line marks each start and a line is not drawn across it. A legend under
    the plot names the first ``legend_rows`` pairs in their colours; ``size`` is the plot's, the
    legend adds its height.
    """
    curves = [c if isinstance(c, Curve) else Curve(*c) for c in curves]
    w, h = size
    left, right, top, bottom = 70, 20, 34, 44
    font = _font(12)
    lines = [(c, [(e, math.log10(t)) for e, t in zip(c.evaluations, c.totals)
                  if isinstance(t, (int, float)) and t > 0 and math.isfinite(t)]) for c in curves]
    lines = [(c, p) for c, p in lines if p]
    shown = lines[:legend_rows]
    legend_h = (len(shown) + (len(lines) > len(shown))) * 16 + 8 if lines else 0
    img = Image.new("RGB", (w, h + legend_h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 10), title, fill=_INK, font=_font(14))
    if not lines:
        draw.text((left, h // 2), "no loss history recorded", fill=_MUTED, font=font)
        return _png(img)
    xs = [x for _, p in lines for x, _ in p]
    ys = [y for _, p in lines for _, y in p]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    lo, hi = min(ys), max(ys)
    pad = max(hi - lo, 0.02) * 0.08  # fit the data, not whole decades: late curves are often flat
    y0, y1 = lo - pad, hi + pad

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    draw.rectangle((left, top, w - right, h - bottom), outline=_MUTED)
    for value in (lo, (lo + hi) / 2, hi) if hi - lo < 1 else range(math.ceil(y0), math.floor(y1) + 1):
        _, y = at(x0, value)
        draw.line((left, y, w - right, y), fill=(225, 225, 225))
        draw.text((6, y - 7), f"{10 ** value:.3g}", fill=_MUTED, font=font)
    for x in {x0, (x0 + x1) // 2, x1}:
        px, _ = at(x, y0)
        draw.text((px - 8, h - bottom + 6), str(int(x)), fill=_MUTED, font=font)
    draw.text(((w - left) // 2, h - 18), "evaluation", fill=_MUTED, font=font)
    first = next((c.first_scale() for c, _ in lines if c.first_scale()), "")
    _scale_marks(draw, first, [m for c, _ in lines for m in c.scale_starts()], at, (left, w - right),
                 (top, h - bottom), font)
    for i, (curve, p) in enumerate(lines):
        colour = _colour(i)
        cuts = [x for x, _ in curve.scale_starts()]
        for part in _split(p, cuts):
            if len(part) == 1:
                x, y = at(*part[0])
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
            else:
                draw.line([at(x, y) for x, y in part], fill=colour, width=2)
    draw.text((w - right - 120, 10), f"{len(lines)} pair(s), log scale", fill=_MUTED, font=font)
    for row, (curve, _) in enumerate(shown):
        y = h + 4 + 16 * row
        draw.rectangle((left, y + 3, left + 18, y + 10), fill=_colour(row))
        draw.text((left + 26, y), curve.label, fill=_INK, font=font)
    if len(lines) > len(shown):
        draw.text((left + 26, h + 4 + 16 * len(shown)), f"... and {len(lines) - len(shown)} more pairs",
                  fill=_MUTED, font=font)
    return _png(img)


def _colour(i: int) -> tuple[int, int, int]:
    return tuple(int(255 * c) for c in _hsv((i * 0.61803) % 1.0, 0.75, 0.8))


def _split(points: list[tuple[float, float]], cuts: list[float]) -> list[list[tuple[float, float]]]:
    """``points`` in pieces, one per scale: no line joins the last evaluation of a scale to the first
    of the next (their losses are sums over different image sizes)."""
    parts: list[list[tuple[float, float]]] = [[]]
    bounds = iter(sorted(cuts) + [math.inf])
    cut = next(bounds)
    for x, y in points:
        while x > cut:
            cut = next(bounds)
            if parts[-1]:
                parts.append([])
        parts[-1].append((x, y))
    return [part for part in parts if part]


def _scale_marks(draw: ImageDraw.ImageDraw, first: str, marks: list[tuple[float, str]], at,
                 across: tuple[float, float], span: tuple[float, float], font, most: int = 12) -> None:
    """A dashed vertical line where each scale starts, labelled once per position (pairs of one run
    usually share them; an early stop moves a pair's); ``first`` labels the first scale. Labels
    take two rows in turn so that neighbours do not overlap."""
    seen: dict[float, str] = {}
    for x, label in marks:
        seen.setdefault(round(x, 1), label)
    labels = [(across[0], first)] if first else []
    for x, label in sorted(seen.items())[:most]:
        px, _ = at(x, 0)
        y = span[0]
        while y < span[1]:
            draw.line((px, y, px, min(y + 6, span[1])), fill=(120, 120, 160), width=1)
            y += 9
        labels.append((px, label))
    if len(labels) > 7:
        return  # too many to read: the lines say enough
    for row, (px, label) in enumerate(labels):
        width = draw.textlength(label, font=font)
        x = px + 4 if px + 4 + width <= across[1] else px - 4 - width
        draw.text((x, span[0] + 3 + 14 * (row % 2)), label, fill=_MUTED, font=font)


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    import colorsys

    return colorsys.hsv_to_rgb(h, s, v)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


#: Characters that make Markdown structure mid-line: code spans, links, HTML, table cells,
#: emphasis and strikethrough (`_draft_.png` would show "draft" in italics); and those the UI's GFM
#: renderer makes links or entities of: it linked a bare `https://…` or `a@b.c` in a name or an
#: error, and showed a file named `AT&amp;T.png` as `AT&T.png`.
_MD_SPECIAL = re.compile(r"([\\`*_~\[\]()<>|#!&:@])")
#: The dot of a `www.` GFM would make a link of (`www.evil.example.png`).
_MD_WWW = re.compile(r"(?i)(www)\.")
#: What starts a list at the start of a line (a table cell is rendered alone): `- a.png`, `+ a`,
#: `1. holiday.png`, `2) b`: the marker's last character, to escape.
_MD_LIST = re.compile(r"^(-|\+|\d{1,9}[.)])(?=\s|$)")
#: An error in the summary or table is cut to this many characters; the run report keeps it whole.
MAX_SHOWN_ERROR = 300


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def md_text(text: object, limit: int | None = None) -> str:
    """``text`` (a file name, an error, a run name: anything a user or an input chose) as Markdown that
    renders as that text on one line: no heading, link, HTML or table cell of its own."""
    line = _one_line(text)
    if limit is not None and len(line) > limit:
        line = line[:limit - 1] + "…"
    line = _MD_WWW.sub(r"\1\\.", _MD_SPECIAL.sub(r"\\\1", line))
    return _MD_LIST.sub(lambda m: f"{m.group(1)[:-1]}\\{m.group(1)[-1]}", line)


def md_code(text: object, table: bool = False) -> str:
    """``text`` in a code span on one line: fenced by more backticks than it holds in a row. In a
    GFM table (the summary's) a `|` ends the cell even in a code span, unless escaped; a table
    artifact's cells are rendered one by one, not as a GFM table, so they take ``table=False``."""
    line = _one_line(text).replace("|", "\\|") if table else _one_line(text)
    fence = "`" * (1 + max((len(run) for run in re.findall("`+", line)), default=0))
    pad = " " if line.startswith("`") or line.endswith("`") else ""
    return f"{fence}{pad}{line}{pad}{fence}"


def _md_link(text: str, url: str | None, table: bool = False) -> str:
    return f"[{md_text(text)}]({url})" if url else md_code(text, table)


#: Rows of the pairs table artifact and of the summary's chunk-run table; the report has them all.
MAX_TABLE_ROWS = 500
MAX_CHUNK_ROWS = 100


def table_rows(items: list[dict], link=None, limit: int = MAX_TABLE_ROWS) -> list[dict]:
    """Rows for the Prefect table artifact (capped: the report file has them all): status, content
    and style file names, output and sidecar, final loss, seconds (one decimal), error, note.

    ``link(uri)`` returns a URL a browser can open (presigned for S3) or None; outputs and
    sidecars are then Markdown links, which the UI's table renders.
    """
    rows = []
    for item in items[:limit]:
        loss, seconds = final_loss(item), item.get("seconds")
        # a failed pair's names are what it would have written; a pair left to another run is not made yet
        written = item.get("status") != FAILED and not _left(item)
        output, sidecar = (item.get("output") or "", item.get("sidecar") or "") if written else ("", "")
        out_url = link(output) if (link and output) else None
        side_url = link(sidecar) if (link and sidecar) else None
        rows.append({  # file names, so that the table fits a screen; the report has the full URIs
            "status": item.get("status"),
            "content": md_text(file_name(item.get("content") or "")),
            "style": md_text(file_name(item.get("style") or "")),
            "output": _md_link(file_name(output) or output, out_url) if output else "",
            "sidecar": _md_link("json", side_url) if side_url else "",
            "final_loss": f"{loss:.4g}" if loss is not None else "",
            "seconds": f"{seconds:.1f}" if isinstance(seconds, (int, float)) else "",
            "error": md_text(item.get("error") or "", MAX_SHOWN_ERROR),
            "note": md_text(item.get("note") or "", MAX_SHOWN_ERROR),
        })
    return rows


def _left(item: dict) -> bool:
    """A pair left to another run still making it (skipped, not made)."""
    return left_to_another(item.get("status"), item.get("note"))


def summary_markdown(report: dict, links: dict[str, str | None], chunk_links: list[tuple[dict, str | None]],
                     warning: str | None = None, rate: str | None = None, unwritten: str = "") -> str:
    """The run's summary: totals, links to the report (``unwritten``: why there is none), contact
    sheet and loss curve, chunk runs, failures."""
    counts = report["totals"]
    attempt = report.get("attempt", 1)
    lines = [f"# stylize-batch {md_code(report.get('flow_run'))}" + (f", attempt {attempt}" if attempt > 1 else ""), ""]
    if warning:
        lines += [f"> **Warning:** {md_text(warning)}", ""]
    if attempt > 1:
        lines += [f"Attempt {attempt} of this flow run (a Retry): each attempt keeps its own report; "
                  f"the first one's is `{report_key(report.get('flow_run_id', ''))}`.", ""]
    left = sum(_left(i) for i in report.get("items", []))
    if counts["pairs"] and not counts["done"] and counts["skipped"] == counts["pairs"]:
        lines += [f"Nothing was stylized: {counts['skipped'] - left} of {counts['pairs']} already done, {left} left to "
                  "another run still making it." if left else
                  f"{counts['skipped']} of {counts['pairs']} already done: nothing was stylized.", ""]
    elif left:  # counted as skipped: say they are not made
        lines += [f"{left} pair{'s' if left > 1 else ''} left to another run still making {'them' if left > 1 else 'it'}: "
                  "not made by this run (the next run makes any it never does; see the table's note).", ""]
    lines += [
        "| pairs | done | skipped | failed |", "|---|---|---|---|",
        f"| {counts['pairs']} | {counts['done']} | {counts['skipped']} | {counts['failed']} |", "",
    ]
    if rate:
        lines += [rate, ""]
    lines.append(f"- Run report: not written ({md_text(unwritten)})" if unwritten else
                 f"- Run report: {_md_link(report['report'], links.get('report'))}")
    if report.get("contact_sheet"):
        lines.append(f"- Contact sheet: {_md_link(report['contact_sheet'], links.get('contact_sheet'))}")
    if report.get("loss_curve"):
        lines.append(f"- Loss curve: {_md_link(report['loss_curve'], links.get('loss_curve'))}")
    if chunk_links:
        lines += ["", "## Chunk runs", "", "| chunk | flow run | state | done | skipped | failed | worker |",
                  "|---|---|---|---|---|---|---|"]
        for chunk, url in chunk_links[:MAX_CHUNK_ROWS]:
            worker = chunk.get("worker") or {}
            where = f"{worker.get('host', '')} pid {worker.get('pid', '')}".strip() if worker else ""
            # a chunk whose pairs all failed is still Completed: its counts say so
            counts = " | ".join(str(chunk.get(k, "")) for k in ("done", "skipped", "failed"))
            lines.append(f"| {chunk.get('chunk')} | {_md_link(str(chunk.get('flow_run_id')), url, table=True)} | "
                         f"{md_text(chunk.get('state'))} | {counts} | {md_text(where)} |")
        if len(chunk_links) > MAX_CHUNK_ROWS:  # 10,000 pairs in chunks of 1 must not make a 10,000-row page
            not_completed = [c for c, _ in chunk_links[MAX_CHUNK_ROWS:] if c.get("state") != "Completed"]
            lines += ["", f"… and {len(chunk_links) - MAX_CHUNK_ROWS} more chunk runs "
                          f"({len(not_completed)} of them not Completed; all are in the report)"]
    failures = [i for i in report.get("items", []) if i.get("status") == FAILED]
    if failures:
        lines += ["", "## Failures", ""] + [f"- {md_code(f['content'])} × {md_code(f['style'])}: "
                                            f"{md_text(f.get('error'), MAX_SHOWN_ERROR)}"
                                            for f in failures[:20]]
        if len(failures) > 20:
            lines.append(f"- … and {len(failures) - 20} more (see the report)")
    return "\n".join(lines)
