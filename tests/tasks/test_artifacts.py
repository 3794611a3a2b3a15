"""A batch run's artifacts through a real Prefect API: images that load, links, keys, progress."""

import io
import json
import re
import urllib.request

import pytest
from PIL import Image

from flows.batch import stylize_batch
from helpers import artifacts_of, md_shown, pattern, to_bytes
from nst_core.params import StyleParams
from tasks.artifacts import RunProgress, artifact_key
from tasks.report import md_text
from tasks.models import BatchSource, OutputSpec, RunOptions

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_api")]

PARAMS = StyleParams(weights="random", image_size=32, iterations=4, scales=1)
WARNING = "RANDOM weights here: not real style transfer"


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
        return resp.read()


def test_s3_run_shows_contact_sheet_loss_curve_links_and_progress(bucket):
    """Old flow: a table and a markdown summary naming s3:// URIs no browser can open, an
    unlabelled sheet, no loss curve, a bare percentage. Now the sheet and loss curve are image
    artifacts with presigned URLs that load, the table links each output and sidecar, a link
    artifact opens the report, and the progress artifact states pairs/s."""
    name, client = bucket
    for i in range(2):
        client.put_object(Bucket=name, Key=f"in/c/c{i}.png", Body=to_bytes(pattern((32, 24), "content", i)))
    client.put_object(Bucket=name, Key="in/s/s0.png", Body=to_bytes(pattern((24, 32), "style")))
    state = stylize_batch(BatchSource(contents=f"s3://{name}/in/c/", styles=f"s3://{name}/in/s/"),
                          OutputSpec(uri=f"s3://{name}/out/", link_expiry_hours=2), PARAMS,
                          RunOptions(labels={"warning": WARNING}), return_state=True)
    assert state.is_completed(), state.message
    report = state.result()
    assert report["contact_sheet"].endswith("-contact.jpg") and report["loss_curve"].endswith("-loss.png")
    arts = artifacts_of(state.state_details.flow_run_id)

    images = {a.description.split(" of ")[0]: a for a in arts["image"]}
    assert set(images) == {"Contact sheet", "Loss curve"}
    for what, art in images.items():
        url = art.data
        assert url.startswith("http://127.0.0.1") and "X-Amz-Expires=7200" in url, url
        assert "valid 2 h" in art.description
        assert Image.open(io.BytesIO(_get(url))).width > 0
    sheet = Image.open(io.BytesIO(_get(images["Contact sheet"].data)))
    assert sheet.height > 2 * 128  # two captioned rows plus the warning

    table = json.loads(arts["table"][0].data)
    assert all(r["output"].startswith("[") and "X-Amz-Signature" in r["output"] for r in table)
    assert all(r["final_loss"] for r in table)
    markdown = {a.description.split(" of ")[0]: a.data for a in arts["markdown"]}  # a link artifact is markdown
    link = markdown["Run report"]
    assert link.startswith(f"[{md_text(report['report'])}](http")
    assert json.loads(_get(link.split("](", 1)[1][:-1]))["flow_run_id"] == report["flow_run_id"]
    progress = arts["progress"][0]
    assert progress.data == 100.0 and "2 of 2 pairs finished" in progress.description
    assert "pairs/s" in progress.description
    # the summary's links are presigned too: its card says until when, as the others do (old: nothing)
    summary_card = next(a for a in arts["markdown"] if a.description.startswith("Summary"))
    assert "valid 2 h" in summary_card.description, summary_card.description
    summary = markdown["Summary"]
    assert WARNING in md_shown(summary) and "Loss curve" in summary and "X-Amz-Signature" in summary
    # old: "2 pairs in 3s: 0.67 pairs/s" beside the card's "2.25 pairs/s": say which time each counts
    assert "2 pairs stylized in " in summary and " from start to report: " in summary
    assert all(a.key is None for v in arts.values() for a in v)  # not a deployment run: unkeyed


def test_links_signed_by_a_workers_temporary_credentials_say_when_they_expire(bucket, temporary_credentials):
    """A worker with an IAM role: the cards said "links valid 168 h" of links S3 refuses after
    the role's credentials expire (2 h here). Now the cards give that time, and the links state it."""
    name, client = bucket
    client.put_object(Bucket=name, Key="in/c/c.png", Body=to_bytes(pattern((32, 24), "content")))
    client.put_object(Bucket=name, Key="in/s/s.png", Body=to_bytes(pattern((24, 32), "style")))
    state = stylize_batch(BatchSource(contents=f"s3://{name}/in/c/", styles=f"s3://{name}/in/s/"),
                          OutputSpec(uri=f"s3://{name}/out/"), PARAMS, RunOptions(), return_state=True)
    assert state.is_completed(), state.message
    arts = artifacts_of(state.state_details.flow_run_id)
    until = f"links valid until {temporary_credentials:%Y-%m-%d %H:%M} UTC, when the temporary credentials"
    images = arts["image"]
    assert images and all(until in a.description for a in images)
    assert until in arts["table"][0].description
    for art in images:
        assert "X-Amz-Security-Token=temporary-session-token" in art.data
        assert Image.open(io.BytesIO(_get(art.data))).width > 0
        assert int(art.data.split("X-Amz-Expires=")[1].split("&")[0]) <= 2 * 3600


def _local_run(tmp_path):
    """One pair from local folders into tmp_path/out, random weights, no labels; its final state."""
    (tmp_path / "c").mkdir()
    (tmp_path / "s").mkdir()
    pattern((32, 24), "content").save(tmp_path / "c" / "a.png")
    pattern((24, 32), "style").save(tmp_path / "s" / "b.png")
    state = stylize_batch(BatchSource(contents=str(tmp_path / "c"), styles=str(tmp_path / "s")),
                          OutputSpec(uri=str(tmp_path / "out")), PARAMS, RunOptions(), return_state=True)
    assert state.is_completed(), state.message
    return state


def test_local_folder_pictures_are_embedded(tmp_path):
    """A file:// URL does not load in the UI's page; a local run's pictures are data: URLs."""
    state = _local_run(tmp_path)
    images = artifacts_of(state.state_details.flow_run_id)["image"]
    assert len(images) == 2
    for art in images:
        assert art.data.startswith("data:image/") and "embedded copy of" in art.description
    assert (tmp_path / "out" / "_runs").is_dir() and list((tmp_path / "out" / "_runs").glob("*-loss.png"))
    # Old: a link artifact [/tmp/…/x.json](/tmp/…/x.json), which the UI opened on its own host: a
    # page that is not there. Now the path is shown as text, and said to be on the run's machine.
    markdown = {a.description.split(" of ")[0]: a for a in artifacts_of(state.state_details.flow_run_id)["markdown"]}
    report = markdown["Run report"]
    path = str(tmp_path / "out" / "_runs" / f"{state.state_details.flow_run_id}.json")
    assert "](" not in report.data and f"`{path}`" in report.data, report.data
    assert "on the machine that ran it" in report.description


def test_an_output_prefix_that_looks_like_markdown_makes_no_link_of_its_own(bucket, tmp_path, monkeypatch):
    """The report's link text, an embedded picture's description and a stop's reason went to the UI
    unescaped, where every other name goes through md_text or md_code: an output prefix
    ``runs](https:/evil.example/phish)[x/`` made the report card a link labelled with the bucket
    that opened evil.example (browsers read ``https:/`` as ``https://``)."""
    name, client = bucket
    client.put_object(Bucket=name, Key="in/c/c.png", Body=to_bytes(pattern((32, 24), "content")))
    client.put_object(Bucket=name, Key="in/s/s.png", Body=to_bytes(pattern((24, 32), "style")))
    hostile = "runs](https:/evil.example/phish)[x"
    state = stylize_batch(BatchSource(contents=f"s3://{name}/in/c/", styles=f"s3://{name}/in/s/"),
                          OutputSpec(uri=f"s3://{name}/{hostile}/"), PARAMS, RunOptions(), return_state=True)
    assert state.is_completed(), state.message
    link = next(a.data for a in artifacts_of(state.state_details.flow_run_id)["markdown"]
                if a.description.startswith("Run report"))
    assert "](https:/evil" not in link and link.count("](") == 1, link
    (tmp_path / "c").mkdir()
    (tmp_path / "s").mkdir()
    pattern((32, 24), "content").save(tmp_path / "c" / "a.png")
    pattern((24, 32), "style").save(tmp_path / "s" / "b.png")
    state = stylize_batch(BatchSource(contents=str(tmp_path / "c"), styles=str(tmp_path / "s")),
                          OutputSpec(uri=str(tmp_path / hostile)), PARAMS, RunOptions(), return_state=True)
    assert state.is_completed(), state.message
    for art in artifacts_of(state.state_details.flow_run_id)["image"]:
        outside_code = re.sub(r"`[^`]*`", "", art.description)  # a code span shows its text as is
        assert "embedded copy of `" in art.description and "](" not in outside_code, art.description
    sent = _recording_progress(monkeypatch)
    progress = RunProgress(2, every_s=0.0)
    progress.stopped("cannot read s3://b/[x](https://evil.example)", wait_s=1)
    assert "](https://evil" not in sent[-1][1], sent


def test_keys_follow_the_deployment_name(monkeypatch):
    assert artifact_key("summary") is None
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__NAME", "nightly")
    assert artifact_key("summary") == "stylize-batch-nightly-summary"
    # Old: "Nightly Run_2" and "nightly-run-2" (and 夜間 and 毎日, both "stylize-batch-summary") got one
    # key: two deployments' runs mixed in one history. A name the key cannot spell gets a short hash.
    keys = set()
    for name in ("Nightly Run_2", "nightly run 2", "nightly-run-2", "夜間", "毎日"):
        monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__NAME", name)
        keys.add(artifact_key("summary"))
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", artifact_key("contact-sheet")), artifact_key("contact-sheet")
    assert len(keys) == 5 and "stylize-batch-nightly-run-2-summary" in keys, keys


def test_progress_description_has_rate_and_eta(monkeypatch):
    import tasks.artifacts as artifacts

    monkeypatch.setattr("prefect.artifacts.create_progress_artifact", lambda *a, **k: "id")
    progress = RunProgress(10)
    progress.started -= 20.0
    text = progress.describe(4)
    assert text.startswith("4 of 10 pairs finished, 0.20 pairs/s, ETA ") and "(in 30s)" in text
    assert "took" in progress.describe(10)
    assert artifacts._duration(3725) == "1h02m"


def test_fan_out_contact_sheet_rows_are_captioned_from_the_chunk_reports(tmp_path, monkeypatch):
    """fan_out: workers. Old code: a chunk report's thumbnails carried no pair identity and the
    parent passed no thumb_items, so every contact-sheet row was uncaptioned. Now each row
    travels with its content and style URIs and finds its report item (file names, final loss)."""
    import tasks.artifacts as artifacts
    from tasks.contract import decode_thumbs, encode_thumbs
    from tasks.contract import ReportItem
    from tasks.storage import open_storage

    thumb = to_bytes(pattern((16, 16), "content"))
    chunk_items = [ReportItem(f"s3://b/c/{n}.png", "s3://b/s/x.png", "done", f"s3://b/o/{n}.jpg",
                              losses={"final": {"total": 10.0 + n}}) for n in (7, 3)]
    report = json.loads(json.dumps({"thumbs": encode_thumbs([(thumb, thumb, thumb)] * 2, chunk_items)}))
    rows = decode_thumbs(report["thumbs"])
    assert [tuple(r) for r in rows] == [(thumb, thumb, thumb)] * 2
    parent_items = [i.as_dict() for i in reversed(chunk_items)]  # the parent's report: plan order
    seen = {}
    monkeypatch.setattr(artifacts, "contact_sheet", lambda rows, warning=None: seen.setdefault("rows", rows) and b"x")
    artifacts.write_pictures(open_storage(str(tmp_path)), "run", parent_items, rows, None)
    assert [r.caption for r in seen["rows"]] == ["7.png + x.png   final loss 17", "3.png + x.png   final loss 13"]


def test_a_file_name_with_a_newline_is_captioned_on_one_line(tmp_path):
    """Local names and S3 keys may hold a newline. Old: Pillow refused to measure the caption, and the
    ValueError failed the run after all its pairs were made (no report pictures, exit 1), on every
    run that made such a pair."""
    from PIL import Image as PILImage

    import tasks.artifacts as artifacts
    from tasks.storage import open_storage

    thumb = to_bytes(pattern((16, 16), "content"))
    items = [{"content": "/in/two\nlines.png", "style": "/in/s.png", "status": "done", "output": "/o/x.png",
              "losses": {"final": {"total": 1.0}}}]
    uris = artifacts.write_pictures(open_storage(str(tmp_path)), "run", items, [(thumb, thumb, thumb)], items)
    assert uris["contact_sheet"] is not None
    assert PILImage.open(uris["contact_sheet"]).height > 16


def test_a_picture_that_cannot_be_drawn_is_left_out_with_a_warning(tmp_path, monkeypatch, caplog):
    """Whatever a picture meets while it is drawn, the run report is written without it."""
    import tasks.artifacts as artifacts
    from tasks.storage import open_storage

    def fail(*args, **kwargs):
        raise ValueError("a caption Pillow cannot draw")

    monkeypatch.setattr(artifacts, "contact_sheet", fail)
    thumb = to_bytes(pattern((16, 16), "content"))
    items = [{"content": "/in/c.png", "style": "/in/s.png", "status": "done", "output": "/o/x.png"}]
    uris = artifacts.write_pictures(open_storage(str(tmp_path)), "run", items, [(thumb, thumb, thumb)], items)
    assert uris["contact_sheet"] is None
    assert "contact sheet not drawn (ValueError: a caption Pillow cannot draw)" in caplog.text


def _recording_progress(monkeypatch):
    sent = []
    monkeypatch.setattr("prefect.artifacts.create_progress_artifact", lambda *a, **k: "id")
    monkeypatch.setattr("prefect.artifacts.update_progress_artifact",
                        lambda artifact_id, progress, description=None, **k: sent.append((progress, description)))
    return sent


def test_progress_always_sends_the_last_state(monkeypatch):
    """Old card: updates within 2 s were dropped and the last one never sent, so when a chunk's
    pairs arrived at once the card stayed behind ("1 of 8" after 2 pairs) until the run ended.
    Now the last state is sent as soon as the interval allows, without waiting for another update."""
    import time

    sent = _recording_progress(monkeypatch)
    progress = RunProgress(8, every_s=0.3)
    for finished in (1, 2):  # one chunk of two pairs, merged at once
        progress.update(finished)
    deadline = time.monotonic() + 5
    while not (sent and sent[-1][1].startswith("2 of 8")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sent[-1][0] == 25.0 and sent[-1][1].startswith("2 of 8 pairs finished"), sent
    progress.close()


def test_a_stopping_run_waits_a_bounded_time_for_a_hung_progress_api(monkeypatch):
    """RunProgress.stopped waits at most wait_s for the lock and as long for its own post, even while
    another update hangs in the API holding the lock (old: until that request gave up)."""
    import threading
    import time

    released = threading.Event()
    monkeypatch.setattr("prefect.artifacts.create_progress_artifact", lambda *a, **k: "id")
    monkeypatch.setattr("prefect.artifacts.update_progress_artifact", lambda *a, **k: released.wait(20))
    progress = RunProgress(8, every_s=0.0)
    threading.Thread(target=progress.update, args=(1,), daemon=True).start()  # posts under the lock, hangs
    time.sleep(0.2)
    started = time.monotonic()
    progress.stopped("KeyboardInterrupt", wait_s=0.3)
    waited = time.monotonic() - started
    released.set()
    assert waited < 5, waited  # about 0.6 s; the hung request would have held it 20 s


def test_a_hung_update_that_lands_after_the_stop_does_not_leave_the_card_saying_the_run_goes_on(monkeypatch):
    """An update hung in the API while the run stops lands after the "stopped" text: the card's
    last text must still say stopped (old: "1 of 8 pairs finished, …, ETA …" for ever)."""
    import threading
    import time

    released = threading.Event()
    sent: list[str] = []

    def post(_id, pct, description):
        if not sent and "stopped" not in description:
            released.wait(20)  # the first update hangs until the stop has posted
        sent.append(description)

    monkeypatch.setattr("prefect.artifacts.create_progress_artifact", lambda *a, **k: "id")
    monkeypatch.setattr("prefect.artifacts.update_progress_artifact", post)
    progress = RunProgress(8, every_s=0.0)
    hung = threading.Thread(target=progress.update, args=(1,), daemon=True)
    hung.start()
    time.sleep(0.2)
    progress.stopped("KeyboardInterrupt", wait_s=0.3)
    released.set()
    hung.join(5)
    progress.update(2)  # a pair that finishes after the stop changes nothing either
    assert sent and "stopped after 1 of 8 pairs (KeyboardInterrupt)" in sent[-1], sent


def test_progress_of_a_run_with_nothing_to_do_says_so(monkeypatch):
    """Old card of an all-skipped run: "0 of 0 pairs finished, 0.00 pairs/s, took 0s"."""
    sent = _recording_progress(monkeypatch)
    progress = RunProgress(0, pairs=8, already=8)
    progress.update(0, final=True)
    assert sent[-1][0] == 100.0 and sent[-1][1].startswith("8 of 8 already done"), sent
    partly = RunProgress(3, pairs=8, already=5)
    partly.update(3, final=True)
    assert sent[-1][1].startswith("3 of 3 pairs finished") and "5 of 8 already done" in sent[-1][1], sent
    # every pair failed at planning (inputs refused, unreadable): old "0 of 5 already done, nothing to
    # run" at 100%, as if all were fine; the run itself ended Failed "5 of 5 pairs failed"
    refused = RunProgress(0, pairs=5, already=0)
    refused.update(0, final=True)
    assert sent[-1][1] == "nothing to run: 5 of 5 pairs failed at planning or repeat another (see the report)", sent
    mixed = RunProgress(0, pairs=5, already=3)
    mixed.update(0, final=True)
    assert sent[-1][1] == "3 of 5 already done, nothing to run; 2 failed at planning or repeat another", sent


HUMAN_TITLES = ("Contact sheet", "Loss curve", "Pairs", "Run report", "Summary", "Progress")


def test_the_loss_curve_of_a_run_that_made_nothing_says_it_shows_earlier_runs_pairs(tmp_path):
    """A run whose pairs were all done draws its loss curve from the pairs earlier runs made (their
    sidecars); its card said "total loss per evaluation of each pair", as if of this run's."""
    _local_run(tmp_path)
    state = stylize_batch(BatchSource(contents=str(tmp_path / "c"), styles=str(tmp_path / "s")),
                          OutputSpec(uri=str(tmp_path / "out")), PARAMS, RunOptions(), return_state=True)
    assert state.is_completed() and state.result()["totals"]["skipped"] == 1, state.message
    curve = next(a for a in artifacts_of(state.state_details.flow_run_id)["image"] if a.description.startswith("Loss"))
    assert "of the pairs earlier runs made (all skipped in this one)" in curve.description, curve.description


def test_an_attempt_whose_pairs_came_back_without_thumbnails_does_not_say_it_stylized_nothing(tmp_path):
    """A Retry (attempt 2) whose pairs came back from chunk runs without thumbnails (a worker that
    died after writing them: merged from their sidecars) shows attempt 1's contact sheet; its card
    said "this one stylized nothing" though the report counts pairs done."""
    from prefect import flow

    from tasks.artifacts import publish_artifacts
    from tasks.contract import contact_sheet_key
    from tasks.storage import LocalStorage

    out = LocalStorage(tmp_path / "out")
    out.write(contact_sheet_key("run-1", 1), to_bytes(pattern((64, 64)), "JPEG"), "image/jpeg")
    report = {"flow_run": "retried", "flow_run_id": "run-1", "attempt": 2, "report": str(tmp_path / "r.json"),
              "totals": {"pairs": 1, "done": 1, "skipped": 0, "failed": 0}, "items": [],
              "contact_sheet": out.uri_for(contact_sheet_key("run-1", 1))}

    @flow
    def publish():
        return publish_artifacts(report, out, 2)

    state = publish(return_state=True)
    (card,) = artifacts_of(state.state_details.flow_run_id)["image"]
    assert "stylized nothing" not in card.description and "without thumbnails" in card.description, card
    # a Retry of a finished run (attempt 3) shows attempt 2's sheet. Old: "content, style and result of
    # each pair", while that sheet holds only the pairs attempt 2 made
    out.write(contact_sheet_key("run-1", 2), to_bytes(pattern((64, 64)), "JPEG"), "image/jpeg")
    report.update(attempt=3, totals={"pairs": 3, "done": 0, "skipped": 3, "failed": 0},
                  contact_sheet=out.uri_for(contact_sheet_key("run-1", 2)))

    @flow
    def publish_again():
        return publish_artifacts(report, out, 3)

    state = publish_again(return_state=True)
    (card,) = artifacts_of(state.state_details.flow_run_id)["image"]
    assert "each pair" not in card.description, card.description
    assert "the pairs attempt 2 stylized" in card.description and "this attempt stylized nothing" in card.description


def test_a_report_the_outage_kept_from_being_written_is_not_linked_as_the_record(tmp_path):
    """Old: after an outage whose report write failed, the report card linked the key that still
    held the run's "running" probe (or nothing), described as "the JSON record of every pair", and
    the summary linked it too."""
    from prefect import flow

    from tasks.artifacts import publish_artifacts
    from tasks.storage import LocalStorage

    out = LocalStorage(tmp_path / "out")
    report = {"flow_run": "outage", "flow_run_id": "run-9", "report": str(tmp_path / "out" / "_runs" / "run-9.json"),
              "totals": {"pairs": 1, "done": 0, "skipped": 0, "failed": 1},
              "items": [{"content": "c.png", "style": "s.png", "status": "failed", "output": "", "error": "not run"}]}

    @flow
    def publish():
        return publish_artifacts(report, out, 2, unwritten="storage unreachable since 10:00:00 UTC")

    state = publish(return_state=True)
    arts = artifacts_of(state.state_details.flow_run_id)
    card = next(a for a in arts["markdown"] if a.description.startswith("Run report"))
    assert "JSON record of every pair" not in card.description and "not written" in card.description, card.description
    assert "storage unreachable since 10:00:00 UTC" in md_shown(card.data) and "crashed" in card.data, card.data
    summary = next(a for a in arts["markdown"] if a.description.startswith("Summary")).data
    assert "- Run report: not written (storage unreachable since 10:00:00 UTC)" in md_shown(summary), summary


def test_every_artifact_is_described_for_a_person_and_random_weights_are_on_the_pictures(tmp_path):
    """Artifact cards are titled with their machine keys (stylize-batch-on-demand-contact-sheet), so
    each description starts with what it is, of which run, and what it shows. Old: the progress card
    had only its numbers, and weights="random" chosen in the form put no warning on the contact sheet
    (only the demo's fallback did); now every random-weights run says so on its pictures."""
    import numpy as np

    state = _local_run(tmp_path)
    report = state.result()
    arts = [a for kind in artifacts_of(state.state_details.flow_run_id).values() for a in kind]
    assert len(arts) == 6
    for art in arts:
        title, _, rest = art.description.partition(" of run ")
        assert title in HUMAN_TITLES and rest.startswith(f"{report['flow_run']}: ") and len(rest.split()) >= 5, \
            art.description
    sheet = np.asarray(Image.open(tmp_path / "out" / "_runs" / f"{report['flow_run_id']}-contact.jpg").convert("RGB"))
    top = sheet[:24].astype(int)
    assert ((top[..., 0] > 140) & (top[..., 1] < 80)).sum() > 20  # the red warning line
    summary = next(a for a in arts if a.description.startswith("Summary")).data
    assert "random" in summary.lower() and "Warning" in summary


def test_reading_loss_curves_stops_at_the_first_read_the_storage_fails(monkeypatch):
    """An endpoint that goes silent as the run ends: each of up to 200 sidecar reads waited out its
    60 s read timeout, 13-25 minutes before the run could end. The first transient failure ends it."""
    import threading
    import time

    from tasks import artifacts
    from tasks import storage as storage_mod
    from tasks.storage import StorageError

    reads, lock = [], threading.Lock()

    class Silent:
        def read(self, key):
            with lock:
                reads.append(key)
            time.sleep(0.2)  # the timeout
            raise StorageError(f"s3://b/out/{key}: ReadTimeoutError", transient=True)

    monkeypatch.setattr(storage_mod, "split_uri", lambda uri, credentials=None: (Silent(), uri.rsplit("/", 1)[1]))
    items = [{"status": "done", "content": f"c{i}.png", "style": "s.png", "sidecar": f"s3://b/out/c{i}.json"}
             for i in range(50)]
    assert artifacts._read_histories(items, 4, 200, None) == []
    assert len(reads) <= 4, len(reads)  # those in flight when the first failed; old: all 50


def test_chunk_run_links_carry_no_password_of_the_api_url():
    """A parent run by `prefect worker start` has PREFECT_API_URL as configured, user:password@ and
    all; Prefect derives its UI URL from it, and the summary's chunk-run links carried the password."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    from tasks.artifacts import _ui_url

    with temporary_settings(updates={PREFECT_API_URL: "http://alice:s3cret@prefect.internal:4200/api"},
                            restore_defaults={PREFECT_UI_URL}):
        link = _ui_url("runs/flow-run/c0ffee")
    assert link == "http://prefect.internal:4200/runs/flow-run/c0ffee"
