"""Contact sheet and loss curve rendering (Pillow only)."""

import io
import re

import numpy as np
from PIL import Image

from helpers import pattern, to_bytes
from tasks.report import SheetRow, contact_sheet, loss_curve_png, summary_markdown, table_rows


def _rows():
    shapes = [((64, 16), (16, 64), (48, 48)), ((20, 60), (60, 20), (30, 10))]
    return [SheetRow(to_bytes(pattern(c, "content")), to_bytes(pattern(s, "style")), to_bytes(pattern(r, "other")),
                     caption=f"c{n}.png × s{n}.png   final loss 1.23e+04") for n, (c, s, r) in enumerate(shapes)]


def test_every_cell_is_the_same_size_whatever_the_image_shapes():
    """Old sheet: thumbnails pasted at their own size (a 64x16 content left a strip); now every
    image is fitted into an identical grey cell, so each cell's grey box is cell x cell."""
    cell = 80
    sheet = Image.open(io.BytesIO(contact_sheet(_rows(), cell=cell)))
    assert sheet.width == 3 * cell + 4 * 6
    arr = np.asarray(sheet.convert("RGB")).astype(int)
    grey = np.all(np.abs(arr - 232) <= 6, axis=-1) | ~np.all(np.abs(arr - 250) <= 6, axis=-1)
    # scan the middle row of the first row's cells: each cell spans exactly `cell` non-paper pixels
    y = np.nonzero(grey[:, 6 + cell // 2])[0][0] + cell // 2
    runs, run = [], 0
    for v in grey[y]:
        if v:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    assert [abs(r - cell) <= 2 for r in runs if r > 10] == [True, True, True], runs  # ±2: JPEG edge ringing


def test_rows_have_captions_and_the_warning_is_on_the_sheet():
    plain = Image.open(io.BytesIO(contact_sheet(_rows(), cell=64)))
    warned = Image.open(io.BytesIO(contact_sheet(_rows(), cell=64, warning="RANDOM weights: not real style transfer")))
    assert warned.height > plain.height  # room for the warning lines at the top
    top = np.asarray(warned.convert("RGB"))[:20].astype(int)
    assert ((top[..., 0] > 140) & (top[..., 1] < 80)).sum() > 20  # red text
    # under each row of cells there is dark caption text
    arr = np.asarray(plain.convert("L"))
    first_row_bottom = 6 + 16 + 20 + 64  # pad + header + warning-free top + cell
    strip = arr[first_row_bottom - 16 + 2: first_row_bottom + 2 + 12 - 16 + 16]
    assert (strip < 100).sum() > 30


def test_loss_curve_draws_every_pair_on_a_log_axis():
    curves = [("a × b", [1, 11, 21, 30], [1e6, 1e4, 5e3, 4e3]), ("c × d", [1, 30], [3e5, 2e3]),
              ("empty", [], [])]
    img = Image.open(io.BytesIO(loss_curve_png(curves)))
    assert img.format == "PNG" and img.width == 720 and img.height > 420  # the plot, then the legend
    arr = np.asarray(img.convert("RGB")).astype(int)
    saturated = (arr.max(-1) - arr.min(-1)) > 100  # coloured line pixels, not grey axes/text
    assert saturated.sum() > 200
    none = Image.open(io.BytesIO(loss_curve_png([])))
    assert none.size == (720, 420)


def test_a_pair_left_to_another_run_is_not_shown_as_made():
    """Old: "skipped" with links to an image and sidecar that did not exist (NoSuchKey), and
    nothing in the table or the summary said the pair was not made (only the JSON report's note)."""
    note = "left to run r2 (h pid 9), still making it when this run ended; the next run makes it if it never does"
    items = [{"content": "c/a.png", "style": "s/x.png", "status": "done", "output": "s3://b/o/a__x.jpg",
              "sidecar": "s3://b/o/a__x.json", "seconds": 1.0},
             {"content": "c/b.png", "style": "s/x.png", "status": "skipped", "output": "s3://b/o/b__x.jpg",
              "sidecar": "s3://b/o/b__x.json", "note": note},
             {"content": "c/d.png", "style": "s/x.png", "status": "skipped", "output": "s3://b/o/d__x.jpg",
              "sidecar": "s3://b/o/d__x.json", "note": "already done"}]
    rows = table_rows(items, link=lambda uri: "https://signed/" + uri.rsplit("/", 1)[-1])
    assert rows[1]["output"] == rows[1]["sidecar"] == "" and "left to run r2" in rows[1]["note"]
    assert rows[2]["output"].startswith("[d\\_\\_x.jpg](https://signed/") and rows[0]["note"] == ""
    report = {"flow_run": "r", "report": "s3://b/o/_runs/1.json", "items": items,
              "totals": {"pairs": 3, "done": 1, "skipped": 2, "failed": 0}}
    assert "1 pair left to another run still making it: not made by this run" in summary_markdown(report, {}, [])


def test_table_links_outputs_and_summary_links_chunks():
    items = [{"content": "s3://b/c/a.png", "style": "s3://b/s/x.png", "status": "done", "output": "s3://b/o/a__x.jpg",
              "sidecar": "s3://b/o/a__x.json", "losses": {"final": {"total": 1234.5}}, "seconds": 1.0},
             {"content": "s3://b/c/b.png", "style": "s3://b/s/x.png", "status": "failed", "output": "s3://b/o/b__x.jpg",
              "error": "bad image"}]
    rows = table_rows(items, link=lambda uri: "https://signed/" + uri.rsplit("/", 1)[-1])
    # old: a failed pair's row showed `b__x.jpg` in the output column, as if it had been written
    assert rows[0]["output"] == "[a\\_\\_x.jpg](https://signed/a__x.jpg)" and rows[0]["final_loss"] == "1234"
    assert rows[0]["sidecar"] == "[json](https://signed/a__x.json)" and rows[1]["output"] == ""
    report = {"flow_run": "r", "report": "s3://b/o/_runs/1.json", "totals": {"pairs": 2, "done": 1, "skipped": 0,
                                                                             "failed": 1},
              "contact_sheet": "s3://b/o/_runs/1-contact.jpg", "items": items}
    md = summary_markdown(report, {"report": "https://signed/1.json"},
                          [({"chunk": 0, "flow_run_id": "abc", "state": "Completed", "worker": {"host": "h", "pid": 7},
                             "done": 0, "skipped": 1, "failed": 2}, "http://ui/runs/flow-run/abc")],
                          warning="random weights", rate="1 pairs in 1s")
    # old: "| 0 | [abc](…) | Completed | h pid 7 |": a chunk whose pairs all failed read as fine
    assert "| 0 | [abc](http://ui/runs/flow-run/abc) | Completed | 0 | 1 | 2 | h pid 7 |" in md, md
    assert "[abc](http://ui/runs/flow-run/abc)" in md and "[s3\\://b/o/\\_runs/1.json](https://signed/1.json)" in md
    assert "**Warning:** random weights" in md and "bad image" in md


def test_pairs_left_to_another_run_are_not_called_already_done():
    """Old: a run that waited out NST_CLAIM_WAIT_S on another run's pairs said "2 of 2 already
    done: nothing was stylized", though the other run was still making them (and could fail)."""
    left = "left to run nightly (abc), still making it when this run ended; the next run makes it if it never does"
    items = [{"content": "c0.png", "style": "s.png", "status": "skipped", "output": "/o/a.jpg", "note": left},
             {"content": "c1.png", "style": "s.png", "status": "skipped", "output": "/o/b.jpg", "note": None}]
    report = {"flow_run": "r", "report": "/o/_runs/1.json", "totals": {"pairs": 2, "done": 0, "skipped": 2, "failed": 0},
              "items": items}
    text = summary_markdown(report, {}, [])
    assert "Nothing was stylized: 1 of 2 already done, 1 left to another run still making it." in text, text
    assert "2 of 2 already done" not in text
    report["items"] = items[1:] * 2
    assert "2 of 2 already done: nothing was stylized." in summary_markdown(report, {}, [])


def test_a_retry_summary_names_the_first_attempts_report():
    """Old: "the first one's is `_runs/{flow_run_id}.json`", the placeholder left in the text."""
    report = {"flow_run": "r", "flow_run_id": "6f1c", "attempt": 2, "report": "/o/_runs/6f1c-attempt-2.json",
              "totals": {"pairs": 1, "done": 1, "skipped": 0, "failed": 0}, "items": []}
    text = summary_markdown(report, {}, [])
    assert "`_runs/6f1c.json`" in text and "{" not in text


def test_a_huge_run_keeps_its_summary_and_table_small():
    """10,000 pairs in chunks of one: old summary listed all 10,000 chunk runs (a page the UI
    chokes on); now 100 rows and a count, and the table stops at 500 rows."""
    from tasks.report import MAX_CHUNK_ROWS, MAX_TABLE_ROWS

    items = [{"content": f"c{i}.png", "style": "s.png", "status": "done" if i % 7 else "failed",
              "output": f"/o/c{i}.jpg", "sidecar": f"/o/c{i}.jpg.json", "error": None if i % 7 else "bad",
              "losses": {"final": {"total": 1.0}}} for i in range(10_000)]
    chunks = [({"chunk": i, "flow_run_id": f"id{i}", "state": "Completed" if i % 9 else "Failed"}, None)
              for i in range(10_000)]
    report = {"flow_run": "big", "report": "/o/_runs/x.json", "items": items,
              "totals": {"pairs": 10_000, "done": 8571, "skipped": 0, "failed": 1429}}
    text = summary_markdown(report, {}, chunks)
    assert sum(1 for line in text.splitlines() if line.startswith("| ") and "id" in line) == MAX_CHUNK_ROWS
    assert f"and {10_000 - MAX_CHUNK_ROWS} more chunk runs" in text and len(text) < 50_000
    assert len(table_rows(items)) == MAX_TABLE_ROWS


def test_table_shows_file_names_and_seconds_to_one_decimal():
    """Old table: full s3:// input URIs pushed output, loss, seconds and error off-screen, and seconds
    had every digit. Now the inputs are file names (the report keeps the URIs), seconds one decimal."""
    items = [{"content": "s3://bucket/a/long/prefix/photos/harbour.png", "style": "s3://bucket/styles/waves.jpg",
              "status": "done", "output": "s3://bucket/out/harbour__waves__1234abcd.jpg",
              "sidecar": "s3://bucket/out/harbour__waves__1234abcd.json", "seconds": 12.3456,
              "losses": {"final": {"total": 2.5}}}]
    row = table_rows(items)[0]
    assert row["content"] == "harbour.png" and row["style"] == "waves.jpg"
    assert row["seconds"] == "12.3" and row["output"] == "`harbour__waves__1234abcd.jpg`"
    assert list(row)[:3] == ["status", "content", "style"]


def _curve_image(curves, **kw):
    return np.asarray(Image.open(io.BytesIO(loss_curve_png(curves, **kw))).convert("RGB")).astype(int)


def test_loss_curve_marks_each_scale_and_has_a_legend():
    """Old curve: no legend, and the loss jumped at each scale change with nothing saying why. Now
    a dashed line marks where each scale starts, and a legend names each pair under the plot."""
    evs = list(range(1, 21))
    totals = [100.0 / i for i in range(1, 11)] + [300.0 / i for i in range(1, 11)]  # the jump at scale 2
    scales = [{"size": [90, 68], "evaluations": 10}, {"size": [128, 96], "evaluations": 10}]
    marked = _curve_image([("a.png + b.png", evs, totals, scales), ("c.png + b.png", evs, totals[::-1], scales)])
    plain = _curve_image([("a.png + b.png", evs, totals), ("c.png + b.png", evs, totals[::-1])])
    differs = np.abs(marked - plain).sum(-1) > 60
    columns = np.nonzero(differs[60:330].sum(0) > 150)[0]  # a vertical mark across the plot
    left, right, width = 70, 20, 720
    at_boundary = left + (10.5 - 1) / (20 - 1) * (width - left - right)
    assert len(columns) and all(abs(c - at_boundary) <= 4 for c in columns), (columns, at_boundary)
    saturated = (plain.max(-1) - plain.min(-1)) > 100
    assert saturated[392:].sum() > 40  # coloured legend swatches under the axis


HOSTILE = "x`\n\n# All pairs completed\n\n<img src=x onerror=alert(1)>.png"


def test_hostile_names_and_errors_stay_text_in_the_summary_and_table():
    """Old: file names, errors and run names went into the Markdown raw: a content file named with a
    backtick, newlines and HTML (local folders and S3 allow all three) closed its code span and added
    a heading and an <img> to the summary; a manifest output name `[see](https://evil)` made a
    second link in the table. Now each stays on its line, in a code span or escaped."""
    items = [{"content": f"/in/{HOSTILE}", "style": "/in/s|t.png", "status": "failed", "output": "",
              "error": f"cannot read /in/{HOSTILE}: " + "e" * 1000},
             {"content": "/in/a.png", "style": "/in/s.png", "status": "done",
              "output": "s3://b/o/see [fix](https:__evil.example) now.jpg", "losses": {"final": {"total": 1.0}}}]
    report = {"flow_run": "run`\n# x", "report": "/o/_runs/1.json", "items": items,
              "totals": {"pairs": 2, "done": 1, "skipped": 0, "failed": 1}}
    text = summary_markdown(report, {}, [({"chunk": 0, "flow_run_id": "a", "state": "Completed",
                                           "worker": {"host": "h|<b>", "pid": 1}}, None)], warning="w <b>")
    assert not [line for line in text.splitlines() if line.startswith("# ") and "stylize-batch" not in line]
    outside_code = re.sub(r"(`+)(.+?)(?<!`)\1(?!`)", "", text)  # what is not in a code span renders
    assert not re.search(r"(?<!\\)[<\[]", outside_code), outside_code
    failure = [line for line in text.splitlines() if line.startswith("- ")][-1]
    assert failure.startswith("- ``") and "All pairs completed" in failure and len(failure) < 800
    rows = table_rows(items, link=lambda uri: "https://signed/x")
    assert "\n" not in rows[0]["content"] + rows[0]["error"] and "\\<img" in rows[0]["error"]
    assert len(rows[0]["error"]) < 400 and rows[0]["style"] == "s\\|t.png"
    assert rows[1]["output"] == "[see \\[fix\\]\\(https\\:\\_\\_evil.example\\) now.jpg](https://signed/x)"
    # a table artifact's cells are rendered one by one (not as a GFM table), where a code span keeps
    # a backslash: a local name with "|" is shown as it is; _draft_ is not emphasis
    local = table_rows([{"content": "/in/_draft_.png", "style": "/in/s.png", "status": "done",
                         "output": "/o/a|b__s.jpg"}])[0]
    assert local["output"] == "`a|b__s.jpg`" and local["content"] == "\\_draft\\_.png"


def test_names_that_look_like_links_or_entities_are_shown_as_typed():
    """Old: the UI's GFM renderer (checked in headless Chromium) made links of a content named
    `www.evil-example.com.png`, of a manifest row's `https://evil.example/phish.png` in its error
    and of an e-mail address, and showed `AT&amp;T.png` as `AT&T.png`. Now none of them is left
    bare, and the text shown is the name as typed."""
    from tasks.report import md_text

    from helpers import md_shown

    for name in ("www.evil-example.com.png", "WWW.Evil.png", "see https://evil.example/phish.png",
                 "mailto:a@b.example", "a@b.example.png", "AT&amp;T.png", "x&#60;y.png"):
        shown = md_text(name)
        assert md_shown(shown) == name
        bare = re.sub(r"\\.", "", shown)  # what is left outside backslash escapes
        assert not re.search(r"(?i)www\.|:|@|&", bare), (name, shown)
    assert md_text("harbour.png") == "harbour.png"  # plain names stay readable in the API
    # a table cell is rendered alone: a name that starts like a list item was shown as a list
    for name in ("1. holiday.png", "- draft.png", "+ b.png", "12) c.png"):
        assert md_shown(md_text(name)) == name and md_text(name)[0] in "\\-+1", md_text(name)
        assert not re.match(r"(-|\+|\d+[.)])\s", md_text(name)), md_text(name)
    assert md_text("2026-12-08.png") == "2026-12-08.png" and md_text("-x.png") == "-x.png"


def test_a_long_caption_is_cut_to_the_same_text_in_a_few_measurements():
    """The contact sheet cut a caption one character at a time, measuring each cut: quadratic in
    the name, ~50 s for a 200-row sheet of 250-character names, before the run report was written.
    Now it bisects: the same cut (the old loop is the oracle) in about log2(length) measurements."""
    from PIL import ImageDraw

    from tasks.report import _fit, _font

    def linear(draw, text, font, width):  # the old loop
        if draw.textlength(text, font=font) <= width:
            return text
        keep = len(text)
        while keep > 4:
            keep -= 1
            cut = text[: keep // 2] + "…" + text[len(text) - keep // 2:]
            if draw.textlength(cut, font=font) <= width:
                return cut
        return text[:4]

    draw, font = ImageDraw.Draw(Image.new("RGB", (8, 8))), _font(11)
    names = ["a.png", "chelsea_the_cat__brick_wall__1a2b3c4d.png", "x" * 250 + ".png", "WWW iii " * 30]
    for name in names:
        for width in (1, 20, 60, 180, 400, 5000):
            assert _fit(draw, name, font, width) == linear(draw, name, font, width), (name, width)
    calls = []
    measure = draw.textlength
    draw.textlength = lambda text, font=None: calls.append(text) or measure(text, font=font)
    _fit(draw, "y" * 250 + ".png", font, 180)
    assert len(calls) <= 10, len(calls)  # 1 + ⌈log2 250⌉; the old loop measured ~220 cuts
