"""A storage endpoint that dies mid-run: the run stops starting pairs, reports the rest "not run:
storage unreachable since HH:MM:SS UTC" and ends Failed within the bound; a rerun finishes them."""

from __future__ import annotations

import dataclasses
import json
import re
import time

import pytest

from flows.batch import stylize_batch
from flows.chunk import stylize_chunk
from tasks.models import BatchSource, OutputSpec, RunOptions

from helpers import artifacts_of, md_shown, pattern, tiny_params, to_bytes

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

#: NST_STORAGE_OUTAGE_S for these tests (the shipped default is 120 s); requests time out after 1 s.
OUTAGE_S = 2.0
SINCE = re.compile(r"storage unreachable since \d\d:\d\d:\d\d UTC")
PARAMS = tiny_params(image_size=16, iterations=1)


def _seed(client, bucket: str, contents: int, styles: int) -> BatchSource:
    for i in range(contents):
        client.put_object(Bucket=bucket, Key=f"in/c/c{i:02d}.png", Body=to_bytes(pattern((24, 24), "content", i)))
    for i in range(styles):
        client.put_object(Bucket=bucket, Key=f"in/s/s{i}.png", Body=to_bytes(pattern((24, 24), "style", i)))
    return BatchSource(contents=f"s3://{bucket}/in/c/", styles=f"s3://{bucket}/in/s/")


def _name(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


def _table_rows(flow_run_id) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["table"])))
    data = found[0].data
    return json.loads(data) if isinstance(data, str) else data


def test_an_endpoint_that_goes_silent_mid_run_ends_it_failed_in_time_and_a_rerun_finishes_the_rest(
        bucket, s3_that_goes_silent, monkeypatch):
    name, client = bucket
    monkeypatch.setenv("NST_STORAGE_OUTAGE_S", str(OUTAGE_S))
    source = _seed(client, name, contents=10, styles=4)  # 40 pairs
    output = OutputSpec(uri=f"s3://{name}/out/")
    s3_that_goes_silent.silent_after = 3  # silent once the third pair's sidecar is written

    state = stylize_batch(source, output, PARAMS, RunOptions(window=2), return_state=True)
    ended = time.monotonic()
    assert s3_that_goes_silent.silenced_at is not None
    # outage_s of failing attempts, the attempts then in flight (1 s timeouts), one try at the report: seconds
    assert ended - s3_that_goes_silent.silenced_at < OUTAGE_S + 12, ended - s3_that_goes_silent.silenced_at
    assert state.is_failed() and SINCE.search(state.message), state.message
    rows = _table_rows(state.state_details.flow_run_id)
    not_run = [r for r in rows if r["status"] == "failed" and SINCE.fullmatch(md_shown(r["error"]).removeprefix("not run: "))]
    assert len(not_run) >= 30, rows
    failed_first = {(_name(r["content"]), _name(r["style"])) for r in rows if r["status"] == "failed"}
    first_id = str(state.state_details.flow_run_id)
    # the progress card says the run stopped, and why (old: "40 of 40 pairs finished, ..., took 9s")
    card = artifacts_of(first_id)["progress"][0].description
    assert "stopped after" in card and SINCE.search(md_shown(card)) and "40 of 40" not in card, card

    s3_that_goes_silent.restore()
    again = stylize_batch(source, output, PARAMS, RunOptions(), return_state=True)
    assert again.is_completed(), again.message
    report = again.result()
    assert report["totals"]["failed"] == 0 and report["totals"]["pairs"] == 40
    assert {(_name(i["content"]), _name(i["style"])) for i in report["items"] if i["status"] == "done"} == failed_first
    assert report["totals"]["skipped"] == 40 - len(failed_first) >= 3
    # the first run could not replace its "running" report; this run marked it crashed
    first = json.loads(client.get_object(Bucket=name, Key=f"out/_runs/{first_id}.json")["Body"].read())
    assert first["status"] == "crashed", first


def test_a_chunk_whose_storage_is_silent_ends_failed_with_the_reason_and_writes_no_report(
        bucket, s3_that_goes_silent, monkeypatch):
    from tasks.plan import plan_pairs, source_entries

    name, client = bucket
    monkeypatch.setenv("NST_STORAGE_OUTAGE_S", str(OUTAGE_S))
    source = _seed(client, name, contents=4, styles=1)
    output = OutputSpec(uri=f"s3://{name}/out/")
    plans = plan_pairs(source_entries(source), tiny_params(), "random(seed=0)", output.format, output.quality)
    # a fifth pair the chunk refuses (outside allowed_sources): refused, not "not run" (old: 5 of 5)
    plans.append(dataclasses.replace(plans[0], index=4, content=f"s3://{name}/elsewhere/x.png"))
    s3_that_goes_silent.silenced_at = time.monotonic()
    started = time.monotonic()
    state = stylize_chunk(plans, output, tiny_params(), RunOptions(allowed_sources=[f"s3://{name}/in/"]),
                          "random(seed=0)", "_runs/parent/chunk-x.json", return_state=True)
    assert time.monotonic() - started < OUTAGE_S + 12
    assert state.is_failed() and SINCE.search(state.message) and "4 of 5 pairs not run" in state.message, state.message
    assert "Contents" not in client.list_objects_v2(Bucket=name, Prefix="out/")  # the parent judges it by its state


def test_an_output_that_refuses_writes_stops_the_run_and_says_why(tmp_path, monkeypatch):
    """A disk that fills mid-run. Old: every remaining pair was optimized for nothing (24 of 24
    optimizations, 22 failed) and each failure was an OSError traceback in the log. Now, after
    WRITE_REFUSALS refused writes in a row, the run starts no more pairs and names the reason."""
    import errno
    import os

    from tasks import storage as storage_mod

    for i in range(4):
        (tmp_path / "c").mkdir(exist_ok=True)
        pattern((24, 24), "content", i).save(tmp_path / "c" / f"c{i}.png")
    for i in range(3):
        (tmp_path / "s").mkdir(exist_ok=True)
        pattern((24, 24), "style", i).save(tmp_path / "s" / f"s{i}.png")
    out = tmp_path / "out"
    real_fsync, synced = os.fsync, []

    def fsync(fd):  # the kernel's answer once the disk is full: only for files under the output
        if str(out) in os.readlink(f"/proc/self/fd/{fd}"):
            synced.append(fd)
            if len(synced) > 6:  # the write probe, then a few pairs' images and sidecars
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(storage_mod.os, "fsync", fsync)
    state = stylize_batch(BatchSource(contents=str(tmp_path / "c"), styles=str(tmp_path / "s")),
                          OutputSpec(uri=str(out)), PARAMS, RunOptions(window=2), return_state=True)
    assert state.is_failed(), state.message
    assert "storage refuses writes since" in state.message and "No space left on device" in state.message, state.message
    rows = _table_rows(state.state_details.flow_run_id)
    failed = [md_shown(r["error"]) for r in rows if r["status"] == "failed"]  # the table's markdown escapes
    refused = [e for e in failed if e.startswith(str(out))]  # names the file it could not write, in one line
    stopped = [e for e in failed if e.startswith(("not run: storage refuses writes since", "storage refuses writes since"))]
    assert len(rows) == 12 and len(refused) + len(stopped) == len(failed), failed
    assert all(e.endswith("cannot write: No space left on device") for e in refused), refused
    # WRITE_REFUSALS refusals, and at most the window's other pair: the rest never started
    assert 3 <= len(refused) <= 4 and sum(e.startswith("not run:") for e in stopped) >= 12 - 2 - 4 - 2, failed


def test_an_output_folder_that_stops_answering_ends_the_run_in_bounded_time(tmp_path, monkeypatch):
    """A hard-mounted NFS (or FUSE) output that stops answering blocks a write for ever. Old: the run
    never ended and its report said "running" for good; each later night queued behind it. Now each
    local call is abandoned after NST_LOCAL_IO_TIMEOUT_S as a transient error, and the outage rule
    ends the run."""
    import os
    import threading

    from tasks import storage as storage_mod

    monkeypatch.setenv("NST_LOCAL_IO_TIMEOUT_S", "0.5")
    monkeypatch.setenv("NST_STORAGE_OUTAGE_S", str(OUTAGE_S))
    monkeypatch.setattr(storage_mod, "RETRY_DELAYS", (0.1,))
    for folder, kind, n in (("c", "content", 4), ("s", "style", 2)):
        (tmp_path / folder).mkdir()
        for i in range(n):
            pattern((24, 24), kind, i).save(tmp_path / folder / f"{folder}{i}.png")
    out = tmp_path / "out"
    real_replace, mount_back = os.replace, threading.Event()

    def replace(src, dst):  # the mount stops answering once the first image is written
        if str(dst).endswith(".jpg") and list(out.glob("*.jpg")):
            mount_back.wait(120)
        return real_replace(src, dst)

    monkeypatch.setattr(storage_mod.os, "replace", replace)
    started = time.monotonic()
    try:
        state = stylize_batch(BatchSource(contents=str(tmp_path / "c"), styles=str(tmp_path / "s")),
                              OutputSpec(uri=str(out)), PARAMS, RunOptions(window=2), return_state=True)
    finally:
        mount_back.set()
    assert time.monotonic() - started < 60
    assert state.is_failed(), state.message
    failed = [md_shown(r["error"]) for r in _table_rows(state.state_details.flow_run_id)
              if r["status"] == "failed"]
    assert failed and all("got no answer within 0.5 s" in e or SINCE.search(e) for e in failed), failed
