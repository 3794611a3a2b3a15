"""Run report, contact sheet and Prefect artifacts of a batch run."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

__all__ = ["PairItem", "totals", "contact_sheet", "summary_markdown", "table_rows"]


@dataclass
class PairItem:
    """One line of the run report."""

    content: str
    style: str
    status: str  # done | skipped | failed
    output: str
    error: str | None = None
    seconds: float | None = None
    losses: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def totals(items: list[PairItem]) -> dict[str, int]:
    return {
        "pairs": len(items),
        "done": sum(i.status == "done" for i in items),
        "skipped": sum(i.status == "skipped" for i in items),
        "failed": sum(i.status == "failed" for i in items),
    }


def contact_sheet(rows: list[tuple[bytes, bytes, bytes]], cell: int = 96) -> bytes:
    """content | style | result thumbnails, one row per pair, as JPEG bytes."""
    pad = 4
    sheet = Image.new("RGB", (3 * (cell + pad) + pad, len(rows) * (cell + pad) + pad + 16), (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    for col, label in enumerate(("content", "style", "result")):
        draw.text((pad + col * (cell + pad), 2), label, fill=(60, 60, 60))
    for r, thumbs in enumerate(rows):
        for c, data in enumerate(thumbs):
            img = Image.open(io.BytesIO(data))
            x = pad + c * (cell + pad) + (cell - img.width) // 2
            y = 16 + pad + r * (cell + pad) + (cell - img.height) // 2
            sheet.paste(img, (x, y))
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def table_rows(items: list[PairItem], limit: int = 500) -> list[dict]:
    """Rows for the Prefect table artifact (capped: the report file has them all)."""
    rows = []
    for item in items[:limit]:
        final = (item.losses or {}).get("final", {})
        rows.append({
            "content": item.content, "style": item.style, "status": item.status, "output": item.output,
            "final_loss": round(final["total"], 6) if "total" in final else None,
            "seconds": item.seconds, "error": item.error or "",
        })
    return rows


def summary_markdown(run_name: str, counts: dict, report_uri: str, sheet_uri: str | None,
                     failures: list[PairItem], warning: str | None = None) -> str:
    lines = [f"# stylize-batch `{run_name}`", ""]
    if warning:
        lines += [f"> **Warning:** {warning}", ""]
    lines += [
        "| pairs | done | skipped | failed |", "|---|---|---|---|",
        f"| {counts['pairs']} | {counts['done']} | {counts['skipped']} | {counts['failed']} |", "",
        f"Report: `{report_uri}`",
    ]
    if sheet_uri:
        lines.append(f"Contact sheet: [{sheet_uri}]({sheet_uri})")
    if failures:
        lines += ["", "## Failures", ""] + [f"- `{f.content}` × `{f.style}`: {f.error}" for f in failures[:20]]
        if len(failures) > 20:
            lines.append(f"- … and {len(failures) - 20} more (see the report)")
    return "\n".join(lines)
