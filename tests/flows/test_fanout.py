"""fan_out: workers — chunk identities from content, a deadline on waiting, children cancelled with the parent."""

from __future__ import annotations

import json
import socket

import pytest
from pydantic import ValidationError

from flows import batch, fanout
from flows.batch import stylize_batch
from flows.fanout import cancel_children, plan_chunks
from flows.chunk import stylize_chunk
from tasks.contract import PairPlan
from tasks.models import BatchSource, OutputSpec, RunOptions
from tasks.plan import plan_pairs, source_entries

from helpers import artifacts_of, md_shown, pattern, tiny_params


def plan(i: int) -> PairPlan:
    return PairPlan(i, f"c{i}", "s", "cid", "sid", f"n{i}", f"n{i}.jpg", f"n{i}.json", f"key{i}")


def test_a_retried_parent_never_reuses_a_chunk_for_other_pairs():
    """Re-planning after some chunks finished shifts pairs between chunk positions; a key made from
    the position (the old way) would hand new pairs to an old child, which never runs them."""
    todo = [plan(i) for i in range(10)]
    first = dict(plan_chunks(todo, 4, "s3://b/out/"))
    retried = dict(plan_chunks(todo, 4, "s3://b/out/", done={0, 1, 2, 3}))  # chunk 0 finished before the retry
    for key, pairs in retried.items():
        assert key not in first or [p.index for p in first[key]] == [p.index for p in pairs]
    assert sorted(p.index for pairs in retried.values() for p in pairs) == list(range(4, 10))
    assert dict(plan_chunks(todo, 4, "s3://b/out/")).keys() == first.keys()  # the same plan finds the same children


def test_a_chunk_is_keyed_by_its_content_and_output_never_by_its_parent():
    """Any parent that plans the same pairs into the same output names the same chunks (so a new
    parent finds the running chunk runs of a dead one); another output prefix is other work."""
    import inspect

    todo = [plan(i) for i in range(4)]
    assert "parent_id" not in inspect.signature(plan_chunks).parameters
    keys = [key for key, _ in plan_chunks(todo, 2, "s3://b/out/")]
    assert keys == [key for key, _ in plan_chunks(list(todo), 2, "s3://b/out/")]
    assert not set(keys) & {key for key, _ in plan_chunks(todo, 2, "s3://b/other/")}
    # old: a run with skip_existing off adopted a live chunk run that skips done pairs, and redid none
    assert not set(keys) & {key for key, _ in plan_chunks(todo, 2, "s3://b/out/", redo=True)}
    renamed = [todo[0], PairPlan(1, "c1", "s", "cid", "sid", "renamed", "renamed.jpg", "renamed.json", "key1")]
    assert [key for key, _ in plan_chunks(renamed, 2, "s3://b/out/")] != keys[:1]


@pytest.fixture
def chunk_deployment_without_worker(prefect_api):
    """stylize-chunk deployed on a process pool that no worker polls."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    pool = f"nst-test-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        flow_id = client.create_flow(stylize_chunk)
        client.create_deployment(flow_id=flow_id, name=pool, work_pool_name=pool,
                                 entrypoint="flows/chunk.py:stylize_chunk")
    return f"stylize-chunk/{pool}"


@pytest.mark.slow
def test_no_gpu_worker_ends_failed_with_the_reason_and_cancels_the_chunks(tmp_path, monkeypatch,
                                                                       chunk_deployment_without_worker):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    monkeypatch.setattr(fanout, "POLL_S", 0.2)
    (tmp_path / "c").mkdir()
    (tmp_path / "s").mkdir()
    for i in range(3):
        pattern((24, 24), "content", i).save(tmp_path / "c" / f"c{i}.png")
    pattern((24, 24), "style").save(tmp_path / "s" / "s.png")
    state = stylize_batch(BatchSource(contents=str(tmp_path / "c"), styles=str(tmp_path / "s")),
                          OutputSpec(uri=str(tmp_path / "out")), tiny_params(),
                          RunOptions(fan_out="workers", chunk_size=2, chunk_timeout_s=3,
                                     chunk_deployment=chunk_deployment_without_worker), return_state=True)
    assert state.is_failed() and state.message.startswith("3 of 3 pairs failed")
    run_id = str(state.state_details.flow_run_id)
    report = json.loads((tmp_path / "out" / "_runs" / f"{run_id}.json").read_text())
    errors = {i["error"] for i in report["items"]}
    assert all("not started within 3 s (still Scheduled" in e for e in errors), errors
    assert all("is a worker polling" in e and "--limit" in e for e in errors)
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"nst-parent:{run_id}"])))
    assert len(children) == 2 and all(c.state.name in ("Cancelling", "Cancelled") for c in children)
    assert all(c.parameters["run"]["devices"] == ["auto"] for c in children)  # the parent's devices stay home
    allowed = [str(tmp_path / "c"), str(tmp_path / "s")]
    assert all(c.parameters["run"]["allowed_sources"] == allowed for c in children)  # resolved, not empty


def test_a_fan_out_parent_without_a_gpu_accepts_device_cuda(tmp_path, chunk_deployment_without_worker):
    """The parent runs on the control pool (no GPU) and only checks the weights; the chunk runs
    compute on the GPU pool. Old: device "cuda" (offered in the run form) failed every fan-out run
    at preflight with "CUDA is not available"; the weights are now checked on the CPU."""
    from flows.batch import preflight
    from tasks.compute import expand_devices

    (tmp_path / "c").mkdir()
    (tmp_path / "s").mkdir()
    pattern((24, 24), "content").save(tmp_path / "c" / "c.png")
    pattern((24, 24), "style").save(tmp_path / "s" / "s.png")
    params = tiny_params().model_copy(update={"device": "cuda"})
    entries, _ = preflight(BatchSource(contents=str(tmp_path / "c"), styles=str(tmp_path / "s")),
                           OutputSpec(uri=str(tmp_path / "out")), params, expand_devices(["auto"], "cuda"),
                           chunk_deployment=chunk_deployment_without_worker)
    assert entries

def test_a_chunk_deployment_the_api_lacks_is_refused_at_preflight(tmp_path, chunk_deployment_without_worker):
    """Old: the whole plan was listed and checked first, then run_deployment's ObjectNotFound
    ended the run with a traceback. Now preflight refuses it in one line naming what exists."""
    (tmp_path / "c").mkdir()
    (tmp_path / "s").mkdir()
    pattern((24, 24), "content").save(tmp_path / "c" / "c.png")
    pattern((24, 24), "style").save(tmp_path / "s" / "s.png")
    state = stylize_batch(BatchSource(contents=str(tmp_path / "c"), styles=str(tmp_path / "s")),
                          OutputSpec(uri=str(tmp_path / "out")), tiny_params(),
                          RunOptions(fan_out="workers", chunk_deployment="stylize-chunk/nope"), return_state=True)
    assert state.is_failed() and state.message.startswith("preflight failed:"), state.message
    assert "stylize-chunk/nope" in state.message and chunk_deployment_without_worker in state.message
    assert "\n" not in state.message and not list((tmp_path / "out").glob("*.json"))
    # a name that is not flow/deployment is refused with the parameters (Prefect raised a ValueError
    # past preflight, leaving the run's report saying "running")
    with pytest.raises(ValidationError, match="chunk_deployment"):
        RunOptions(fan_out="workers", chunk_deployment="stylize-chunk")


def test_cancel_children_cancels_that_parents_chunk_runs_only(prefect_api):
    """The helper alone; cancelling a real parent run: the e2e test at the end of this file. A queued
    chunk run (no process to stop) ends Cancelled at once; a running one is set Cancelling for its
    worker to stop. Old: queued ones were set Cancelling too, which Prefect's server turned into
    Cancelled with no message (so another parent could not tell a parent had stopped them)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Running, Scheduled

    assert batch._on_cancel in stylize_batch.on_cancellation_hooks
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(stylize_chunk)
        del flow_id
        kids = [client.create_flow_run(stylize_chunk, tags=["nst-parent:p-123"], state=Scheduled()) for _ in range(2)]
        running = client.create_flow_run(stylize_chunk, tags=["nst-parent:p-123"], state=Running())
        other = client.create_flow_run(stylize_chunk, tags=["nst-parent:someone-else"], state=Scheduled())
        assert cancel_children("p-123") == 3
        states = [client.read_flow_run(k.id).state for k in kids]
        assert all(s.name == "Cancelled" and s.message.startswith(fanout.PARENT_STOPPED) for s in states), states
        assert client.read_flow_run(running.id).state.name == "Cancelling"
        assert client.read_flow_run(other.id).state.name == "Scheduled"


def test_a_chunk_without_a_readable_report_is_judged_by_its_sidecars(tmp_path):
    from flows.fanout import merge_chunk
    from tasks.storage import open_storage

    out = open_storage(str(tmp_path))
    written, lost = plan(0), plan(1)
    out.write(written.image_key, b"img")
    out.write(written.sidecar_key, json.dumps({"key": written.key, "image": {"size": 3}}).encode())
    items = merge_chunk(3, [written, lost], "Crashed", "worker died", None, out)
    assert items[0].status == "done" and items[0].sidecar.endswith("n0.json")
    assert items[1].status == "failed" and items[1].error == "chunk 3 ended Crashed: worker died"


def test_a_run_that_redoes_counts_only_what_its_own_chunk_run_made(tmp_path, monkeypatch):
    """skip_existing off, a chunk run OOM-killed before it touched its pairs: old, the sidecars of
    last week's run under the same keys counted as made by this run: every pair "done", linking
    old files, the run Completed."""
    from flows.fanout import merge_chunk
    from tasks.storage import open_storage

    out = open_storage(str(tmp_path))
    old, made = plan(0), plan(1)
    for p, run_id in ((old, "last-week"), (made, "chunk-run-7")):
        out.write(p.image_key, b"img")
        out.write(p.sidecar_key, json.dumps({"key": p.key, "image": {"size": 3}, "flow_run": {"id": run_id}}).encode())
    items = merge_chunk(3, [old, made], "Crashed", "worker died", None, out, made_by={"chunk-run-7", "chunk-run-1"})
    assert items[0].status == "failed" and items[0].error == "chunk 3 ended Crashed: worker died"
    assert items[1].status == "done"

    # through the watcher: a redo run's chunk, restarted once (its first run wrote plan 1's sidecar)
    import logging

    monkeypatch.setattr(fanout, "get_run_logger", lambda: logging.getLogger("test"))
    chunk = fanout.Chunk(3, [old, made], "_runs/x/gone.json", "chunk-run-8", earlier_runs=["chunk-run-7"])
    watcher = fanout.ChunkWatcher(None, [chunk], out, RunOptions(skip_existing=False), lambda *a: None, 2)
    watcher.settle(chunk, "Crashed", "worker died")
    assert [watcher.result.items[i].status for i in (0, 1)] == ["failed", "done"]



def test_two_pairs_with_one_pair_key_each_keep_their_own_line_when_a_chunk_is_merged(tmp_path):
    """The same bytes under two names (a.png, a_copy.png), or two manifest rows naming two outputs
    for one pair: one pair key, two outputs, both run in one chunk. Merged by key alone, the second
    item overwrote the first: both lines showed a_copy's content, output and failure."""
    from flows.fanout import merge_chunk
    from tasks.contract import chunk_report, done_item, failed_item
    from tasks.storage import open_storage

    out = open_storage(str(tmp_path))
    a = PairPlan.named(0, "file:///c/a.png", "file:///s/s.png", "c", "s", "a__s", "k" * 64, "jpeg")
    copy = PairPlan.named(1, "file:///c/a_copy.png", "file:///s/s.png", "c", "s", "a_copy__s", "k" * 64, "jpeg")
    report = json.loads(json.dumps(chunk_report({"id": "r", "name": "r"}, {}, [a, copy],
                                                [done_item(a, out), failed_item(copy, "boom", out)], [], [])))
    items = merge_chunk(0, [a, copy], "Completed", "", report, out)
    assert (items[0].content, items[0].status) == (a.content, "done")
    assert (items[1].content, items[1].status, items[1].error) == (copy.content, "failed", "boom")

# --- more than 200 chunk runs: Prefect's API answers 422 to a page over 200 ---------------------------

def test_cancel_children_pages_past_200_and_leaves_finished_ones_alone(prefect_api):
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.states import Completed, Scheduled

    parent = f"p-{uuid.uuid4().hex[:8]}"
    tag = f"nst-parent:{parent}"
    with get_client(sync_client=True) as client:
        for _ in range(201):
            client.create_flow_run(stylize_chunk, tags=[tag], state=Scheduled())
        done = client.create_flow_run(stylize_chunk, tags=[tag], state=Completed())
        assert cancel_children(parent) == 201
        runs = []
        while page := client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])),
                                            limit=200, offset=len(runs)):
            runs += page
        assert len(runs) == 202
        assert client.read_flow_run(done.id).state.name == "Completed"
        assert all(r.state.name in ("Cancelling", "Cancelled") for r in runs if r.id != done.id)


def test_polling_more_than_200_chunk_runs_reads_them_all(prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    with get_client(sync_client=True) as client:
        ids = [str(client.create_flow_run(stylize_chunk, state=Scheduled()).id) for _ in range(201)]
        runs = fanout.read_children(client, ids)
    assert sorted(str(r.id) for r in runs) == sorted(ids)


# --- a retried parent: chunks from the full plan, by position ----------------------------------------

def test_a_retried_parent_keeps_every_chunk_key_of_pairs_still_in_flight():
    plans = [plan(i) for i in range(12)]
    first = dict(plan_chunks(plans, 4, "out"))
    assert len(first) == 3
    retried = dict(plan_chunks(plans, 4, "out", done={0, 5}))  # 2 of 12 pairs finished before the retry
    assert retried.keys() == first.keys()  # every old child (maybe still running) is found again by its key
    for key, pairs in retried.items():
        assert [p.index for p in pairs] == [p.index for p in first[key]]
    all_done = dict(plan_chunks(plans, 4, "out", done={0, 1, 2, 3}))
    assert all_done.keys() == first.keys() - {next(iter(first))}  # a chunk whose pairs are all done is not started


def test_every_chunk_run_fits_the_parameter_size_prefects_server_accepts():
    """A chunk run's pairs travel in its parameters, and Prefect's server refuses a flow run whose
    parameters exceed 524,288 bytes of JSON (server.api.max_parameter_size's default): at the
    largest chunk_size the form allows, about 1,000 S3 pairs, the parent failed with a 422 naming
    700 KB. Such a chunk is cut further by size; a chunk within the limit keeps its key."""
    from prefect._internal.schemas.validators import validate_parameter_size

    big = RunOptions.model_fields["chunk_size"].metadata[-1].le
    bucket = "s3://nightly-dataset-eu-west-1/"
    plans = [PairPlan(i, f"{bucket}contents/2026/12/{'x' * 60}-{i:06d}.jpg", f"{bucket}styles/{'y' * 40}.png",
                      "etag-" + "0" * 40, "etag-" + "1" * 40, f"stylized/{'x' * 60}-{i:06d}__{'y' * 40}",
                      f"stylized/{'x' * 60}-{i:06d}__{'y' * 40}.jpg", f"stylized/{'x' * 60}-{i:06d}__{'y' * 40}.json",
                      f"{i:064x}") for i in range(3000)]
    output = OutputSpec(uri=f"{bucket}stylized/")
    chunks = plan_chunks(plans, big, output.uri)
    assert len(chunks) > 1
    assert [p.index for _, pairs in chunks for p in pairs] == list(range(3000))  # every pair once, in order
    for key, pairs in chunks:
        validate_parameter_size(fanout.chunk_parameters(pairs, output, tiny_params(), RunOptions(), "w" * 64, key),
                                524_288)
    small = plans[:50]  # what a default chunk holds: one chunk, keyed as before
    assert [k for k, _ in plan_chunks(small, 50, output.uri)] == [fanout.chunk_key(small, output.uri)]


def test_a_chunk_run_that_ended_is_never_returned_for_its_content(chunk_deployment_without_worker):
    """Last night's run of the same chunk (Completed, maybe with failed pairs; or Cancelled) is never
    found again by an idempotency key: the pairs that are not done need a new run, reporting elsewhere."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Completed

    tag = fanout.content_tag("abc")
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(chunk_deployment_without_worker)
        old = client.create_flow_run_from_deployment(deployment.id, idempotency_key=f"{tag}:0", tags=[tag],
                                                     parameters={"report_key": "_runs/p/chunk-abc.json"})
        client.set_flow_run_state(old.id, Completed(), force=True)
        # the next key taken by a run without the tag (as after old runs were deleted): skipped as well
        taken = client.create_flow_run_from_deployment(deployment.id, idempotency_key=f"{tag}:1",
                                                       parameters={"report_key": "_runs/q/chunk-abc.json"})
        client.set_flow_run_state(taken.id, Cancelled(), force=True)
        child = fanout.start_chunk(client, chunk_deployment_without_worker, "abc",
                                   {"report_key": "_runs/p/chunk-abc.json"}, "chunk-0000", ["nst-parent:p"])
        assert str(child.id) not in (str(old.id), str(taken.id))
        assert client.read_flow_run(child.id).state.name == "Scheduled"
        assert child.parameters["report_key"] == "_runs/p/chunk-abc-attempt-2.json"  # not the old run's report
        assert {tag, "nst-parent:p"} <= set(child.tags)


# --- the parent stops (Ctrl-C, crash): its chunk runs stop too -----------------------------------------

class FakeClock:
    """Stands in for the ``time`` module in flows.fanout: sleeping advances the clock and runs ``on_sleep``."""

    def __init__(self, on_sleep=None, step=1.0):
        self.now, self.step, self.on_sleep, self.sleeps = 1000.0, step, on_sleep, 0

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps += 1
        self.now += self.step
        if self.on_sleep:
            self.on_sleep(self)


def _folders(tmp_path, contents=3):
    (tmp_path / "c").mkdir()
    (tmp_path / "s").mkdir()
    for i in range(contents):
        pattern((24, 24), "content", i).save(tmp_path / "c" / f"c{i}.png")
    pattern((24, 24), "style").save(tmp_path / "s" / "s.png")
    return BatchSource(contents=str(tmp_path / "c"), styles=str(tmp_path / "s")), OutputSpec(uri=str(tmp_path / "out"))


def _children(parent_id: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        return sorted(client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"nst-parent:{parent_id}"]))),
            key=lambda r: r.name)


@pytest.mark.slow
def test_ctrl_c_while_waiting_cancels_the_chunk_runs(tmp_path, monkeypatch, chunk_deployment_without_worker):
    source, output = _folders(tmp_path)

    def interrupt(clock):
        raise KeyboardInterrupt

    monkeypatch.setattr(fanout, "time", FakeClock(interrupt))
    with pytest.raises(KeyboardInterrupt):
        stylize_batch(source, output, tiny_params(),
                      RunOptions(fan_out="workers", chunk_size=2, chunk_deployment=chunk_deployment_without_worker))
    parents = {_parent_id(c) for c in _recent_chunks(chunk_deployment_without_worker)}
    assert len(parents) == 1
    kids = _children(parents.pop())
    assert len(kids) == 2 and all(k.state.name in ("Cancelling", "Cancelled") for k in kids), [k.state for k in kids]


@pytest.mark.slow
def test_a_chunk_run_works_on_the_places_its_parent_was_given_from_any_working_folder(
        tmp_path, monkeypatch, chunk_deployment_without_worker):
    """`nst batch --contents c --styles s --output out --weights w.pth --fan-out workers`: a chunk
    run works in its worker's folder (the deployment's, nst serve's), not the parent's. Relative
    places went to it as typed: every pair refused as outside allowed_sources, or made in the
    worker's folder while the parent found nothing there, and the weights file missing."""
    import torch

    from nst_core.vgg import load_extractor

    here, worker_folder = tmp_path / "here", tmp_path / "worker"
    here.mkdir()
    worker_folder.mkdir()
    _folders(here, contents=2)
    torch.save(load_extractor("random", layers=["relu5_1"], seed=3).layers.state_dict(), here / "w.pth")
    sent = {}

    def worker(clock):  # the GPU worker: takes the chunk run with its parameters as the API has them
        kids = [k for k in _recent_chunks(chunk_deployment_without_worker) if str(here) in json.dumps(k.parameters)]
        if kids:
            sent.update(kids[0].parameters)
            raise KeyboardInterrupt  # the parent stops here: the chunk run is the worker's now

    monkeypatch.chdir(here)
    monkeypatch.setattr(fanout, "time", FakeClock(worker))
    with pytest.raises(KeyboardInterrupt):
        stylize_batch(BatchSource(contents="c", styles="s"), OutputSpec(uri="out"), tiny_params(weights="w.pth"),
                      RunOptions(fan_out="workers", chunk_size=2, chunk_deployment=chunk_deployment_without_worker))
    monkeypatch.chdir(worker_folder)
    result = stylize_chunk(**sent)
    assert result["done"] == 2, result
    assert len(list((here / "out").glob("*.jpg"))) == 2
    assert list(worker_folder.iterdir()) == []


def _parent_id(chunk_run) -> str:
    """The parent a chunk run was started by (its nst-parent tag; the API keeps tags sorted)."""
    return next(t for t in chunk_run.tags if t.startswith("nst-parent:")).split(":", 1)[1]


def _recent_chunks(deployment_name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=[deployment_name.split("/", 1)[1]])), limit=200)


# --- deadlines: a chunk is timed from its own start; queued chunks wait while others run ---------------

@pytest.mark.slow
def test_a_queued_chunk_is_timed_from_its_own_start(tmp_path, monkeypatch, chunk_deployment_without_worker):
    """One worker: chunk 1 waits while chunk 0 runs. The whole run outlasts chunk_timeout_s, no chunk does."""
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running

    source, output = _folders(tmp_path)

    def worker(clock):  # one chunk at a time, 60 s each, on a fake clock
        kids = _recent_chunks(chunk_deployment_without_worker)
        if not kids:
            return
        kids = _children(_parent_id(kids[0]))
        t = clock.sleeps * clock.step
        with get_client(sync_client=True) as client:
            for n, when in ((0, 0), (1, 60)):
                if t >= when and kids[n].state.name == "Scheduled":
                    client.set_flow_run_state(kids[n].id, Running(), force=True)
                if t >= when + 60 and kids[n].state.name == "Running":
                    client.set_flow_run_state(kids[n].id, Completed(), force=True)

    monkeypatch.setattr(fanout, "time", FakeClock(worker, step=10.0))
    state = stylize_batch(source, output, tiny_params(),
                          RunOptions(fan_out="workers", chunk_size=2, chunk_timeout_s=90,
                                     chunk_deployment=chunk_deployment_without_worker), return_state=True)
    run_id = str(state.state_details.flow_run_id)
    report = json.loads((tmp_path / "out" / "_runs" / f"{run_id}.json").read_text())
    errors = [i["error"] for i in report["items"]]
    # the chunks "completed" without writing anything, so their pairs fail, but none was cancelled
    assert all("ended Completed" in e for e in errors), errors
    assert all(k.state.name == "Completed" for k in _children(run_id))


def test_a_stopping_parent_marks_its_report_before_it_cancels_its_chunk_runs(tmp_path, monkeypatch,
                                                                              chunk_deployment_without_worker):
    """The UI's Cancel gives the parent 30 s after SIGTERM; cancelling a nightly's 200 chunk runs is
    200 API calls. Old: the chunk runs were cancelled first, and a parent killed meanwhile left its
    report "running" and its card's ETA. Now the report and card first, then the chunk runs."""
    import flows.batch as batch_mod

    source, output = _folders(tmp_path, contents=2)
    seen = []

    def cancel(parent_id, message="", keep=frozenset()):
        report = json.loads((tmp_path / "out" / "_runs" / f"{parent_id}.json").read_text())
        seen.append(report.get("status"))
        return real(parent_id, message, keep)

    def interrupt(clock):
        raise KeyboardInterrupt

    real = fanout.cancel_children
    monkeypatch.setattr(fanout, "cancel_children", cancel)
    monkeypatch.setattr(batch_mod, "cancel_children", cancel)
    monkeypatch.setattr(fanout, "time", FakeClock(interrupt))
    with pytest.raises(KeyboardInterrupt):
        stylize_batch(source, output, tiny_params(),
                      RunOptions(fan_out="workers", chunk_size=1, chunk_deployment=chunk_deployment_without_worker))
    assert seen and seen[0] == "crashed", seen


@pytest.mark.slow
@pytest.mark.parametrize("pooled", [True, False])
def test_chunks_queued_behind_another_runs_busy_chunks_wait_for_them(tmp_path, monkeypatch, pooled,
                                                                     chunk_deployment_without_worker):
    """The nightly's chunks queue behind an overrunning job's on the one GPU pool (or, served by `nst
    serve`, a deployment without a pool, behind another batch run's chunks in its one slot): nothing
    of this run moves for longer than the start limit, but the worker is busy. Old: every chunk was
    cancelled, "not started within ... is a worker polling the work pool?", and the night's pairs failed."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Pending, Running, Scheduled

    source, output = _folders(tmp_path, contents=2)
    dep = chunk_deployment_without_worker
    if not pooled:
        with get_client(sync_client=True) as client:
            name = f"served-{uuid.uuid4().hex[:8]}"
            client.create_deployment(flow_id=client.create_flow(stylize_chunk), name=name,
                                     entrypoint="flows/chunk.py:stylize_chunk")
        dep = f"stylize-chunk/{name}"
    # keys of their own: an idempotency key of an earlier test's runs would give those runs back
    foreign = [_chunk_run(dep, uuid.uuid4().hex * 2, "another-job", f"_runs/x/chunk-{n}.json", Scheduled())
               for n in range(3)]
    client = get_client(sync_client=True).__enter__()

    def worker(clock):  # the other job's chunks, 25 s each (the start limit is 10 s); then ours
        n = int(clock.now - 1000) // 25
        if n < len(foreign):
            if n:
                client.set_flow_run_state(foreign[n - 1].id, Completed(), force=True)
            client.set_flow_run_state(foreign[n].id, Running(), force=True)
            return
        client.set_flow_run_state(foreign[-1].id, Completed(), force=True)
        for kid in _recent_chunks(dep):
            if kid.state.name == "Scheduled":
                client.set_flow_run_state(kid.id, Running(), force=True)
            elif kid.state.name == "Running":
                client.set_flow_run_state(kid.id, Completed(), force=True)

    monkeypatch.setattr(fanout, "START_TIMEOUT_S", 10.0)
    monkeypatch.setattr(fanout, "time", FakeClock(worker, step=2.0))
    state = stylize_batch(source, output, tiny_params(),
                          RunOptions(fan_out="workers", chunk_size=1, chunk_deployment=dep), return_state=True)
    report = json.loads((tmp_path / "out" / "_runs" / f"{state.state_details.flow_run_id}.json").read_text())
    errors = [i["error"] for i in report["items"]]
    # the chunks "completed" without writing anything, so their pairs fail, but none was cancelled
    assert len(errors) == 2 and all("ended Completed" in e for e in errors), errors
    # a run left Running longer than chunk_timeout_s (its worker died) is no movement: the wait stays
    # bounded (here 3 s of wall time for it to count as stuck, then the 3 s start limit)
    stuck = _chunk_run(dep, uuid.uuid4().hex * 2, "dead-job", "_runs/y/chunk-0.json", Running())
    # and one left Pending (its worker died as it took it: Prefect gives it no start time)
    _chunk_run(dep, uuid.uuid4().hex * 2, "dead-job", "_runs/y/chunk-1.json", Pending())
    monkeypatch.setattr(fanout, "time", FakeClock(step=2.0))
    state = stylize_batch(source, OutputSpec(uri=str(tmp_path / "out2")), tiny_params(),
                          RunOptions(fan_out="workers", chunk_size=1, chunk_deployment=dep, chunk_timeout_s=3),
                          return_state=True)
    client.__exit__(None, None, None)
    report = json.loads((tmp_path / "out2" / "_runs" / f"{state.state_details.flow_run_id}.json").read_text())
    assert all("not started within 3 s" in i["error"] for i in report["items"]), report["items"]
    assert stuck.id not in {k.id for k in _children(str(state.state_details.flow_run_id))}


@pytest.mark.slow
def test_a_chunk_running_past_its_deadline_is_cancelled_with_that_reason(tmp_path, monkeypatch,
                                                                        chunk_deployment_without_worker):
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    source, output = _folders(tmp_path, contents=2)

    def start(clock):
        kids = _recent_chunks(chunk_deployment_without_worker)
        if kids:
            with get_client(sync_client=True) as client:
                for k in _children(_parent_id(kids[0])):
                    if k.state.name == "Scheduled":
                        client.set_flow_run_state(k.id, Running(), force=True)

    monkeypatch.setattr(fanout, "time", FakeClock(start, step=10.0))
    state = stylize_batch(source, output, tiny_params(),
                          RunOptions(fan_out="workers", chunk_size=2, chunk_timeout_s=50,
                                     chunk_deployment=chunk_deployment_without_worker), return_state=True)
    assert state.is_failed()
    run_id = str(state.state_details.flow_run_id)
    report = json.loads((tmp_path / "out" / "_runs" / f"{run_id}.json").read_text())
    assert all("ran longer than chunk_timeout_s=50 s" in i["error"] for i in report["items"]), report["items"]


def test_serve_refuses_a_limit_that_deadlocks_fan_out(monkeypatch):
    """`nst serve --limit 1`: the batch run takes the only slot and its chunks never start."""
    from flows import serve
    from nst_core.errors import NSTError

    monkeypatch.setattr(serve, "check_names_are_free", lambda names: pytest.fail("refused before any API call"))
    with pytest.raises(NSTError, match="--limit must be at least 2"):
        serve.serve_deployments(limit=1)


def test_a_chunk_checks_what_its_parameters_ask_for(tmp_path, prefect_api):
    """stylize-chunk can be started by anyone who can start a flow run: it refuses inputs outside
    allowed_sources (none given: nothing is allowed) and output keys that break the naming rule."""
    from tasks import pair

    source, output = _folders(tmp_path, contents=1)
    content, style = str(tmp_path / "c" / "c0.png"), str(tmp_path / "s" / "s.png")
    (tmp_path / "secret.png").write_bytes((tmp_path / "c" / "c0.png").read_bytes())

    def p(i, content=content, name=None, image=None, sidecar=None):
        name = name or f"c0__s__{i:08d}"
        return PairPlan(i, content, style, "cid", "sid", name, image or f"{name}.jpg", sidecar or f"{name}.json",
                        f"{i:08d}" + "0" * 56)

    pairs = [p(0, content=str(tmp_path / "secret.png")), p(1, name="_runs/x"), p(2, image="other.jpg"),
             p(3, sidecar="../escape.json")]
    fetched = []
    real = pair.read_object
    pair.read_object, restore = (lambda uri, *creds: fetched.append(uri) or real(uri, *creds)), pair.read_object
    try:
        result = stylize_chunk(pairs, output, tiny_params(), RunOptions(allowed_sources=[str(tmp_path / "c"),
                                                                                         str(tmp_path / "s")]),
                               "random(seed=0)", "_runs/parent/chunk-x.json")
        unconfined = stylize_chunk([p(4)], output, tiny_params(), RunOptions(), "random(seed=0)",
                                   "_runs/parent/chunk-y.json")
    finally:
        pair.read_object = restore
    report = json.loads((tmp_path / "out" / "_runs" / "parent" / "chunk-x.json").read_text())
    errors = [i["error"] for i in report["items"]]
    assert all(i["status"] == "failed" for i in report["items"]) and result["done"] == 0, errors
    assert "outside allowed_sources" in errors[0]
    assert all("naming rule" in e for e in errors[1:]), errors
    assert unconfined["done"] == 0 and fetched == []
    assert not (tmp_path / "escape.json").exists()


def test_a_chunk_on_a_worker_without_its_devices_fails_each_pair_naming_the_worker_and_device(tmp_path, prefect_api):
    """Old: a pair leased to the missing device failed with torch's "Invalid device argument", the
    others ran on the device that exists; nothing said the worker lacked one."""
    source, output = _folders(tmp_path, contents=2)
    plans = plan_pairs(source_entries(source), tiny_params(), "random(seed=0)", output.format, output.quality)
    run = RunOptions(devices=["cpu", "cuda:7"], allowed_sources=[str(tmp_path)])
    state = stylize_chunk(plans, output, tiny_params(), run, "random(seed=0)", "_runs/parent/chunk-d.json",
                          return_state=True)
    report = json.loads((tmp_path / "out" / "_runs" / "parent" / "chunk-d.json").read_text())
    errors = [i["error"] for i in report["items"]]
    assert state.result()["done"] == 0 and len(errors) == 2, errors
    assert all(f"worker {socket.gethostname()}: device 'cuda:7' requested but" in e for e in errors), errors
    # Old: a plain Completed() with no message: the chunk's run page was green and said nothing of
    # the failures. Now the state says the counts, as the batch run's does.
    assert state.is_completed() and state.message.startswith("0 done, 0 skipped, 2 failed of 2 pairs"), state.message
    assert "chunk-d.json" in state.message


@pytest.mark.slow
def test_a_transient_api_error_while_polling_is_retried(tmp_path, monkeypatch, chunk_deployment_without_worker):
    """The first two polls fail (a read timeout from the API); the parent polls again and merges the
    chunks once they end, instead of crashing or cancelling them."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.states import Completed

    source, output = _folders(tmp_path, contents=2)
    real_read, failures = fanout.read_children, []

    def flaky_read(client, ids):
        if len(failures) < 2:
            failures.append(ids)
            raise httpx.ReadTimeout("the API did not answer")
        return real_read(client, ids)

    def finish(clock):  # a worker that completes every chunk after the failed polls
        kids = _recent_chunks(chunk_deployment_without_worker)
        if len(failures) == 2 and kids:
            with get_client(sync_client=True) as client:
                for k in _children(_parent_id(kids[0])):
                    if not k.state.is_final():  # with the message a chunk's own Completed carries
                        client.set_flow_run_state(k.id, Completed(message="1 done, 0 skipped, 0 failed of 1 pairs"),
                                                  force=True)

    monkeypatch.setattr(fanout, "read_children", flaky_read)
    monkeypatch.setattr(fanout, "time", FakeClock(finish))
    state = stylize_batch(source, output, tiny_params(),
                          RunOptions(fan_out="workers", chunk_size=1, chunk_deployment=chunk_deployment_without_worker),
                          return_state=True)
    assert len(failures) == 2
    run_id = str(state.state_details.flow_run_id)
    report = json.loads((tmp_path / "out" / "_runs" / f"{run_id}.json").read_text())
    # the chunks "completed" without writing anything (no worker ran them): judged as such, not cancelled
    # old: "chunk 0 ended Completed: 1 done, 0 skipped, 0 failed of 1 pairs" as the reason it failed
    assert all(i["error"] == f"chunk {n} ended Completed without a result for this pair"
               for n, i in enumerate(report["items"])), report["items"]
    assert all(k.state.name == "Completed" for k in _children(run_id))


# --- the UI's Cancel on a parent run: its on_cancellation hook cancels the chunk runs ------------------

@pytest.mark.slow
@pytest.mark.e2e
def test_cancelling_a_parent_run_through_the_api_cancels_its_chunk_runs(tmp_path, chunk_deployment_without_worker):
    """stylize-batch served by `nst serve` (a Prefect Runner) in its own process, with two chunk runs
    on a pool no worker polls: one marked Running (as if a worker had it), one queued. The parent
    is set Cancelling through the API, as the UI's Cancel does. The runner stops the parent's
    process (whose flow body cancels what it started on its way out) and then runs the parent's
    on_cancellation hook, which cancels the chunk runs again under its own message. The running
    chunk's state history must show that message: proof that the hook ran and did its job
    (Prefect's runner calls hooks with keywords: a hook whose parameters are not named flow,
    flow_run, state fails there, and only there)."""
    import os
    import subprocess
    import sys
    import time
    import uuid
    from pathlib import Path

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelling, Running

    from helpers import stop_process

    root = Path(__file__).resolve().parents[2]
    name = f"cancel-{uuid.uuid4().hex[:8]}"
    source, output = _folders(tmp_path, contents=4)  # two chunks of two pairs
    run = RunOptions(fan_out="workers", chunk_size=2, chunk_deployment=chunk_deployment_without_worker)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PYTHONPATH": str(root)}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--name", name], cwd=root, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(what, predicate, deadline_s):
        end = time.monotonic() + deadline_s
        while not (found := predicate()):
            assert proc.poll() is None, f"the runner exited ({proc.returncode}): {log.read_text()[-3000:]}"
            assert time.monotonic() < end, f"timed out waiting for {what}: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        return found

    try:
        with get_client(sync_client=True) as client:
            def served():
                try:
                    return client.read_deployment_by_name(f"stylize-batch/{name}")
                except Exception:
                    return None

            deployment = wait_for("the served deployment", served, 120)
            parent = client.create_flow_run_from_deployment(deployment.id, parameters={
                "source": source.model_dump(mode="json"), "output": output.model_dump(mode="json"),
                "params": tiny_params().model_dump(mode="json"), "run": run.model_dump(mode="json")})

            def chunks_started():
                state = client.read_flow_run(parent.id).state
                assert not state.is_final(), f"the parent ended {state.name}: {state.message}"
                return len(_children(str(parent.id))) == 2

            wait_for("the parent to start its two chunk runs", chunks_started, 180)
            assert client.read_flow_run(parent.id).state.type == StateType.RUNNING
            running, queued = _children(str(parent.id))
            client.set_flow_run_state(running.id, Running(), force=True)  # a worker picked this one up
            # ... and made its first pair (image, then sidecar) before the cancel; the parent collects a
            # chunk's pairs only when the whole chunk ends
            made = PairPlan(**running.parameters["pairs"][0])
            image = b"an image the chunk run wrote"
            (Path(output.uri) / made.image_key).write_bytes(image)
            (Path(output.uri) / made.sidecar_key).write_text(json.dumps({"key": made.key, "image": {"size": len(image)}}))

            answer = client.set_flow_run_state(parent.id, Cancelling(message="cancelled in the UI"))
            assert answer.status == SetStateStatus.ACCEPT, answer

            def cancelled_by_the_hook():
                return any("parent stylize-batch run was cancelled" in (s.message or "")
                           for s in client.read_flow_run_states(running.id))

            wait_for("the parent's on_cancellation hook to cancel the running chunk", cancelled_by_the_hook, 60)
            wait_for("the parent to end Cancelled", lambda: client.read_flow_run(parent.id).state.is_cancelled(), 60)
            assert all(client.read_flow_run(k.id).state.name in ("Cancelling", "Cancelled") for k in (running, queued))
        # its report says what the UI says, with the cancel's message (old: "crashed", "TerminationSignal")
        report = json.loads((Path(output.uri) / "_runs" / f"{parent.id}.json").read_text())
        assert (report["status"], report["error"]) == ("cancelled", "cancelled: cancelled in the UI"), report
        # with what became of each pair (old: nothing but the status); the pair the chunk run made is
        # done, found in storage at the stop (old: "failed", though its image and sidecar were there)
        assert report["totals"] == {"pairs": 4, "done": 1, "skipped": 0, "failed": 3}, report
        assert [i["output"] for i in report["items"] if i["status"] == "done"] == [str(Path(output.uri) / made.image_key)]
        assert {i.get("error") for i in report["items"] if i["status"] == "failed"} == {
            "the run stopped before the pair finished (cancelled: cancelled in the UI)"}, report["items"]
        # and so does its progress card (old: its last rate and ETA, as if it still ran)
        card = md_shown(artifacts_of(str(parent.id))["progress"][0].description)
        assert ": stopped after 1 of 4 pairs (cancelled: cancelled in the UI)" in card, card  # the one made
    finally:
        stop_process(proc, timeout=30)


# --- a new parent adopts the chunk runs of a dead one (kill -9: no hook ran) ----------------------------

def _complete_every_chunk(deployment_name: str):
    """A fake GPU worker (a FakeClock's on_sleep): the deployment's unfinished chunk runs complete,
    writing nothing."""
    from prefect.client.orchestration import get_client
    from prefect.states import Completed

    def on_sleep(clock):
        with get_client(sync_client=True) as client:
            for run in _recent_chunks(deployment_name):
                if not run.state.is_final():
                    client.set_flow_run_state(run.id, Completed(), force=True)

    return on_sleep


def _tagged(tag: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))


def _chunk_run(deployment_name: str, key: str, parent: str, report_key: str, state):
    """The first run of chunk content ``key``, started by ``parent`` as start_chunk would, set to ``state``."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name)
        run = client.create_flow_run_from_deployment(
            deployment.id, tags=[f"nst-parent:{parent}", fanout.content_tag(key)],
            idempotency_key=f"{fanout.content_tag(key)}:0", parameters={"report_key": report_key})
        client.set_flow_run_state(run.id, state, force=True)
    return run


@pytest.mark.slow
def test_a_new_parent_adopts_a_running_chunk_of_a_dead_one_and_reruns_a_finished_ones_pairs(
        tmp_path, monkeypatch, chunk_deployment_without_worker):
    """Chunk 0 is still running for a parent that died (its tag names that parent); chunk 1 ran last
    night and completed (its failed pairs need another try). The new parent waits for chunk 0's run and
    merges it instead of starting another, and starts a new run for chunk 1."""
    from prefect.states import Completed, Running

    from tasks.plan import plan_pairs, source_entries

    source, output = _folders(tmp_path, contents=4)
    params = tiny_params()
    plans = plan_pairs(source_entries(source), params, "random(seed=0)", output.format, output.quality)
    (key0, _), (key1, _) = plan_chunks(plans, 2, output.uri)
    orphan = _chunk_run(chunk_deployment_without_worker, key0, "dead", "_runs/dead/chunk-0.json", Running())
    last_night = _chunk_run(chunk_deployment_without_worker, key1, "yesterday", "_runs/yesterday/c.json", Completed())

    monkeypatch.setattr(fanout, "time", FakeClock(_complete_every_chunk(chunk_deployment_without_worker)))
    state = stylize_batch(source, output, params, RunOptions(fan_out="workers", chunk_size=2,
                                                             chunk_deployment=chunk_deployment_without_worker),
                          return_state=True)
    run_id = str(state.state_details.flow_run_id)
    report = json.loads((tmp_path / "out" / "_runs" / f"{run_id}.json").read_text())
    ran = {c["chunk"]: c["flow_run_id"] for c in report["chunks"]}
    assert ran[0] == str(orphan.id)  # adopted: merged, not doubled
    assert ran[1] != str(last_night.id)  # a finished run is never taken for the pairs still to do
    assert [str(r.id) for r in _tagged(fanout.content_tag(key0))] == [str(orphan.id)]
    assert len(_tagged(fanout.content_tag(key1))) == 2
    assert fanout.parent_tag(run_id) in [t for r in _tagged(fanout.content_tag(key0)) for t in r.tags]


@pytest.mark.slow
def test_a_parent_whose_chunk_lost_storage_cancels_the_others_and_ends_failed_with_the_reason(
        tmp_path, monkeypatch, chunk_deployment_without_worker):
    """A chunk run ends Failed with "storage unreachable since …" (it could not write its report): the
    parent does not wait for the others (each would wait out the outage on its own, one after another),
    cancels them, reports every pair with the reason and ends Failed, without reading storage for them."""
    from prefect.client.orchestration import get_client
    from prefect.states import Failed, Running

    source, output = _folders(tmp_path, contents=4)
    reads = []

    def chunk0_loses_storage(clock):
        kids = _recent_chunks(chunk_deployment_without_worker)
        if not kids:
            return
        kids = _children(_parent_id(kids[0]))
        with get_client(sync_client=True) as client:
            for n, kid in enumerate(kids):
                if kid.state.name == "Scheduled":
                    client.set_flow_run_state(kid.id, Running(), force=True)
                elif n == 0 and clock.sleeps >= 2 and kid.state.name == "Running":
                    client.set_flow_run_state(kid.id, Failed(
                        message="storage unreachable since 12:34:56 UTC: 2 of 2 pairs not run"), force=True)

    monkeypatch.setattr(fanout, "time", FakeClock(chunk0_loses_storage))
    monkeypatch.setattr(fanout.ChunkWatcher, "_read_report", lambda self, key: reads.append(key))
    state = stylize_batch(source, output, tiny_params(),
                          RunOptions(fan_out="workers", chunk_size=2, chunk_timeout_s=30,
                                     chunk_deployment=chunk_deployment_without_worker), return_state=True)
    assert state.is_failed() and "storage unreachable since 12:34:56 UTC" in state.message, state.message
    run_id = str(state.state_details.flow_run_id)
    report = json.loads((tmp_path / "out" / "_runs" / f"{run_id}.json").read_text())
    assert [i["status"] for i in report["items"]] == ["failed"] * 4
    assert all("storage unreachable since 12:34:56 UTC" in i["error"] for i in report["items"]), report["items"]
    assert reads == []
    kids = _children(run_id)
    assert [k.state.name for k in kids][0] == "Failed" and kids[1].state.name in ("Cancelling", "Cancelled")


def test_after_an_outage_a_completed_chunk_keeps_its_done_pairs_and_progress_counts_only_finished_ones(
        tmp_path, monkeypatch):
    """Chunk A ends Failed with "storage unreachable" (no report), then chunk B ends Completed with
    its 2 pairs done. Old: once the outage was declared every later chunk's pairs were reported
    "failed: not run" (B's made pairs too), and the progress card read "stopped after 4 of 4 pairs"
    at 100% for pairs never run."""
    import logging

    from tasks.storage import open_storage

    monkeypatch.setattr(fanout, "get_run_logger", lambda: logging.getLogger("test"))
    a = fanout.Chunk(0, [plan(0), plan(1)], "_runs/x/a.json", "run-a")
    b = fanout.Chunk(1, [plan(2), plan(3)], "_runs/x/b.json", "run-b")
    c = fanout.Chunk(2, [plan(4)], "_runs/x/c.json", "run-c")
    d = fanout.Chunk(3, [plan(5), plan(6)], "_runs/x/d.json", "run-d")
    progress = []
    watcher = fanout.ChunkWatcher(None, [a, b, c, d], open_storage(str(tmp_path)), RunOptions(),
                                  lambda finished, total: progress.append(finished), 7)
    watcher.settle(a, "Failed", "storage unreachable since 10:00:00 UTC: 2 of 2 pairs not run")
    watcher.settle(b, "Completed", "2 done, 0 skipped, 0 failed of 2 pairs (chunk report: /o/_runs/x/b.json)")
    alone = fanout.ChunkWatcher(None, [c], open_storage(str(tmp_path)), RunOptions(), lambda *a: None, 1)
    alone.settle(c, "Cancelled", "the parent stylize-batch run x cancelled it: cancelled by its parent: storage "
                                 "unreachable since 10:00:00 UTC")  # another parent's outage, seen from its machine
    assert alone.health.unreachable_since() is None
    c.settled = False
    watcher.settle(c, "Cancelled", "cancelled by its parent: storage unreachable since 10:00:00 UTC")
    # a skip may be a pair left to another run, not made: not called done, nor "already done"
    watcher.settle(d, "Completed", "1 done, 1 skipped, 0 failed of 2 pairs (chunk report: /o/_runs/x/d.json)")
    items = watcher.result.items
    assert [items[i].status for i in range(7)] == ["failed", "failed", "done", "done", "failed", "failed", "failed"]
    assert items[5].error.startswith("not known: ") and "1 done, 1 skipped" in items[5].error
    assert items[2].output.endswith(plan(2).image_key)
    assert items[0].error.startswith("chunk 0 ended Failed: storage unreachable since 10:00:00 UTC")
    assert "not known" in items[4].error and "chunk 2 ended Cancelled" in items[4].error, items[4].error
    assert progress == [1, 2]  # B's pairs; A's and C's are not known to have finished
    assert [(r["chunk"], r["done"], r["failed"]) for r in watcher.result.chunks] == [
        (0, 0, 2), (1, 2, 0), (2, 0, 1), (3, 0, 2)]


def test_a_chunks_row_counts_its_whole_slice_as_the_chunk_run_does(tmp_path, monkeypatch):
    """A rerun after one bad input was fixed: the chunk run is given its 4-pair slice, 3 of them
    done, and its page says "1 done, 3 skipped, 0 failed of 4 pairs". Old: the parent's summary row
    for it read 1 | 0 | 0, three pairs short, so the two pages could not be matched."""
    import logging

    from tasks.storage import open_storage

    monkeypatch.setattr(fanout, "get_run_logger", lambda: logging.getLogger("test"))
    out = open_storage(str(tmp_path))
    chunk = fanout.Chunk(0, [plan(3)], "_runs/x/a.json", "run-a", already_done=3)
    out.write(chunk.report_key, json.dumps({"items": [
        {"key": plan(3).key, "name": plan(3).name, "content": plan(3).content, "style": plan(3).style,
         "status": "done", "output": out.uri_for(plan(3).image_key)},
    ]}).encode(), "application/json")
    watcher = fanout.ChunkWatcher(None, [chunk], out, RunOptions(), lambda *a: None, 1)
    watcher.settle(chunk, "Completed", "1 done, 3 skipped, 0 failed of 4 pairs (chunk report: /o/_runs/x/a.json)")
    row = watcher.result.chunks[0]
    assert (row["done"], row["skipped"], row["failed"]) == (1, 3, 0), row


def test_an_adopted_chunks_deadline_counts_from_its_own_start_not_from_when_this_parent_saw_it(tmp_path, monkeypatch):
    """A GPU machine lost mid-night leaves its chunk run Running; the next nightly adopts it. Old:
    its deadline counted from the new parent's first look, so the dead chunk got a full
    chunk_timeout_s (6 h) more, and meanwhile counted as running. Now from the run's own start, by
    the API's clock (its estimated_run_time)."""
    import datetime
    import logging
    from types import SimpleNamespace

    from prefect.states import Running

    from tasks.storage import open_storage

    class Client:
        def __init__(self, run):
            self.run, self.set = run, []

        def read_flow_runs(self, **kwargs):
            return [self.run]

        def read_flow_run(self, run_id):
            return self.run

        def set_flow_run_state(self, run_id, state, force=False):
            self.set.append(state)

    monkeypatch.setattr(fanout, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(fanout, "time", FakeClock())
    lost_id = "9a6c0d7e-3f52-4b8e-9d41-2f1c6a0b7e55"
    lost = SimpleNamespace(id=lost_id, tags=[], state=Running(),
                           estimated_run_time=datetime.timedelta(hours=5, minutes=30))
    chunk = fanout.Chunk(0, [plan(0)], "_runs/x/chunk.json", lost_id)
    client = Client(lost)
    watcher = fanout.ChunkWatcher(client, [chunk], open_storage(str(tmp_path)),
                                  RunOptions(chunk_timeout_s=6 * 3600), lambda *a: None, 1)
    now = watcher.poll()
    watcher.check_deadlines(now)
    assert not chunk.settled  # 5.5 h in: within its 6 h
    watcher.check_deadlines(now + 31 * 60)
    assert chunk.settled and "ran longer than chunk_timeout_s=21600 s" in watcher.result.items[0].error


def test_a_chunk_runs_its_pairs_after_an_earlier_run_in_the_process_stopped(tmp_path, prefect_api):
    """A stop left by an earlier run in this process (its flow body ended by SIGTERM, Ctrl-C or an
    error) is not this chunk's. Old: the chunk started no pair and failed each one, "run interrupted
    before the pair started"."""
    from tasks.pair import stop_requested
    from tasks.plan import plan_pairs, source_entries

    source, output = _folders(tmp_path, contents=1)
    params = tiny_params()
    plans = plan_pairs(source_entries(source), params, "random(seed=0)", output.format, output.quality)
    stop_requested.set()
    try:
        result = stylize_chunk(plans, output, params, RunOptions(allowed_sources=[str(tmp_path)]), "random(seed=0)",
                               "_runs/parent/chunk-0.json")
    finally:
        stop_requested.clear()
    report = json.loads((tmp_path / "out" / "_runs" / "parent" / "chunk-0.json").read_text())
    assert result["done"] == len(plans) == 1, [(i["status"], i.get("error")) for i in report["items"]]


def _orphan_ending_after_the_done_set(tmp_path, monkeypatch, deployment_name, ends):
    """A dead parent's chunk 0 run, Running when a new parent starts, ends (``ends(client, run, pairs,
    out)``) just after the new parent has read which pairs are done (its sidecars came too late for
    that) and before it starts its chunks. Returns (new parent's report, orphan, chunk 0's key, its pairs)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from tasks.plan import plan_pairs, source_entries
    from tasks.storage import open_storage

    source, output = _folders(tmp_path, contents=4)
    params = tiny_params()
    plans = plan_pairs(source_entries(source), params, "random(seed=0)", output.format, output.quality)
    (key0, pairs0), _ = plan_chunks(plans, 2, output.uri)
    orphan = _chunk_run(deployment_name, key0, "dead", "_runs/dead/chunk-0.json", Running())

    real_done_in = batch.done_in

    def done_then_the_orphan_ends(*args, **kwargs):
        done = real_done_in(*args, **kwargs)
        with get_client(sync_client=True) as client:
            ends(client, orphan, pairs0, open_storage(output.uri))
        return done

    monkeypatch.setattr(batch, "done_in", done_then_the_orphan_ends)
    monkeypatch.setattr(fanout, "time", FakeClock(_complete_every_chunk(deployment_name)))
    state = stylize_batch(source, output, params, RunOptions(fan_out="workers", chunk_size=2, skip_existing=True,
                                                             chunk_deployment=deployment_name),
                          return_state=True)
    run_id = str(state.state_details.flow_run_id)
    return json.loads((tmp_path / "out" / "_runs" / f"{run_id}.json").read_text()), orphan, key0, pairs0


@pytest.mark.slow
def test_a_dead_parents_chunk_that_completes_while_the_new_parent_reads_the_done_set_is_merged_not_run_again(
        tmp_path, monkeypatch, chunk_deployment_without_worker):
    """Old: live runs were read after the done set, so the completed run was neither done nor live
    and chunk 0 ran twice, as the production kill -9 test saw on CI."""
    from prefect.states import Completed

    from tasks.contract import done_item

    def completes(client, orphan, pairs, out):  # as a chunk run ends: its report, then Completed
        items = [{"key": p.key, **done_item(p, out).as_dict()} for p in pairs]
        out.write("_runs/dead/chunk-0.json", json.dumps({"items": items}).encode(), "application/json")
        client.set_flow_run_state(orphan.id, Completed(), force=True)

    report, orphan, key0, pairs0 = _orphan_ending_after_the_done_set(tmp_path, monkeypatch,
                                                                     chunk_deployment_without_worker, completes)
    assert {c["chunk"]: c["flow_run_id"] for c in report["chunks"]}[0] == str(orphan.id)
    assert [str(r.id) for r in _tagged(fanout.content_tag(key0))] == [str(orphan.id)]
    status = {(i["content"], i["style"]): i["status"] for i in report["items"]}
    assert [status[(p.content, p.style)] for p in pairs0] == ["done", "done"]  # merged from its report


@pytest.mark.slow
@pytest.mark.parametrize("state", ["Crashed", "Cancelling"])
def test_a_dead_parents_chunk_that_crashes_while_the_new_parent_reads_the_done_set_gets_a_new_run(
        tmp_path, monkeypatch, chunk_deployment_without_worker, state):
    """Live when the new parent looked, Crashed (or being cancelled) by the time it starts its
    chunks: adopting it would report its pairs failed with the crash; they get a run of their own
    instead (old: a Cancelling run, not final, was adopted)."""
    from prefect import states

    def crashes(client, orphan, pairs, out):
        client.set_flow_run_state(orphan.id, getattr(states, state)(message="its worker died"), force=True)

    report, orphan, key0, _ = _orphan_ending_after_the_done_set(tmp_path, monkeypatch,
                                                                chunk_deployment_without_worker, crashes)
    assert {c["chunk"]: c["flow_run_id"] for c in report["chunks"]}[0] != str(orphan.id)
    assert len(_tagged(fanout.content_tag(key0))) == 2
    assert "its worker died" not in json.dumps(report["items"])


@pytest.mark.slow
def _shared_chunk(tmp_path, deployment: str):
    """Four pairs in chunks of two, the first chunk's run started by parent A and Running: (source,
    output, params, chunk 0's content key, its pairs, A's run of it)."""
    from prefect.states import Running

    source, output = _folders(tmp_path, contents=4)
    params = tiny_params()
    plans = plan_pairs(source_entries(source), params, "random(seed=0)", output.format, output.quality)
    (key0, pairs0), _ = plan_chunks(plans, 2, output.uri)
    return source, output, params, key0, pairs0, _chunk_run(deployment, key0, "parent-a", "_runs/parent-a/chunk-0.json",
                                                            Running())


def _as_a_worker_would(deployment: str, clock) -> None:
    """The chunk runs of ``deployment`` as a worker ends them: a Cancelling one Cancelled in Prefect's
    runner's words (over the parent's), the others Completed after the first sleep (no report)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Completed

    with get_client(sync_client=True) as client:
        for run in _recent_chunks(deployment):
            if run.state.name == "Cancelling":
                client.set_flow_run_state(run.id, Cancelled(message="Flow run was cancelled successfully."), force=True)
            elif not run.state.is_final() and clock.sleeps > 1:
                client.set_flow_run_state(run.id, Completed(), force=True)


def test_a_chunk_run_cancelled_by_the_other_of_two_overlapping_parents_is_started_again(
        tmp_path, monkeypatch, chunk_deployment_without_worker):
    """Two runs of one plan overlap (a schedule, a second trigger): B adopts the chunk run A is
    running, which then carries both parents' tags. The duplicate A is cancelled: its cancellation
    (and Prefect's, for a cancelled parent's subflows) cancels that run. Old: B failed its pairs
    with "the parent stylize-batch run was cancelled" and ended Failed. Now B starts the chunk again
    (the new run skips what the old one wrote). The Cancelled state says what Prefect's runner says
    ("Flow run was cancelled successfully."): the parent's word is in the Cancelling state before it
    (first version: only the final message was read, so the chunk was never started again)."""
    dep = chunk_deployment_without_worker
    source, output, params, key0, pairs0, a_chunk = _shared_chunk(tmp_path, dep)

    def on_sleep(clock):
        if clock.sleeps == 1:
            cancel_children("parent-a")  # A is cancelled: its on_cancellation hook
        _as_a_worker_would(dep, clock)

    monkeypatch.setattr(fanout, "time", FakeClock(on_sleep))
    state = stylize_batch(source, output, params, RunOptions(fan_out="workers", chunk_size=2, chunk_deployment=dep),
                          return_state=True)
    report = json.loads((tmp_path / "out" / "_runs" / f"{state.state_details.flow_run_id}.json").read_text())
    errors = [i["error"] for i in report["items"] if i["content"] in {p.content for p in pairs0}]
    assert not any("parent stylize-batch run was cancelled" in (e or "") for e in errors), errors
    runs = _tagged(fanout.content_tag(key0))
    assert len(runs) == 2 and {r.state.name for r in runs} == {"Cancelled", "Completed"}
    chunk0 = next(c for c in report["chunks"] if c["chunk"] == 0)
    assert chunk0["flow_run_id"] != str(a_chunk.id) and chunk0["state"] == "Completed"
    assert chunk0["done"] + chunk0["skipped"] + chunk0["failed"] == 2, chunk0  # its pairs, as the summary shows them


@pytest.mark.parametrize("cancelled_by_a_user", [False, True])
def test_a_crashed_chunk_run_is_started_again(tmp_path, monkeypatch, chunk_deployment_without_worker,
                                              cancelled_by_a_user):
    """A served chunk's slot lease lost in a server restart (Prefect then ends the run "Crashed:
    Execution was cancelled by the runtime environment"), or its process killed. Old: its pairs
    failed ("chunk 0 ended Crashed") and the parent ended Failed; now the chunk gets a new run
    (which skips what the old one wrote), as a chunk another parent cancelled does. Not one a user
    cancelled (Prefect ends it Crashed when it cannot record Cancelled)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling, Crashed

    dep = chunk_deployment_without_worker
    source, output, params, key0, pairs0, a_chunk = _shared_chunk(tmp_path, dep)

    def on_sleep(clock):
        if clock.sleeps == 1:
            with get_client(sync_client=True) as client:
                if cancelled_by_a_user:
                    client.set_flow_run_state(a_chunk.id, Cancelling(message="cancelled in the UI"), force=True)
                client.set_flow_run_state(a_chunk.id, Crashed(message="Execution was cancelled by the runtime "
                                                                      "environment."), force=True)
        _as_a_worker_would(dep, clock)

    monkeypatch.setattr(fanout, "time", FakeClock(on_sleep))
    state = stylize_batch(source, output, params, RunOptions(fan_out="workers", chunk_size=2, chunk_deployment=dep),
                          return_state=True)
    report = json.loads((tmp_path / "out" / "_runs" / f"{state.state_details.flow_run_id}.json").read_text())
    errors = [i["error"] for i in report["items"] if i["content"] in {p.content for p in pairs0}]
    runs = _tagged(fanout.content_tag(key0))
    if cancelled_by_a_user:
        assert all("ended Crashed" in (e or "") for e in errors) and len(runs) == 1, errors
        return
    assert not any("ended Crashed" in (e or "") for e in errors), errors
    assert len(runs) == 2 and {r.state.name for r in runs} == {"Crashed", "Completed"}
    chunk0 = next(c for c in report["chunks"] if c["chunk"] == 0)
    assert chunk0["flow_run_id"] != str(a_chunk.id) and chunk0["state"] == "Completed"


@pytest.mark.parametrize("why", ["not started within 3600 s (still Scheduled) while no chunk run moved; cancelled",
                                 "cancelled by its parent: storage unreachable since 10:00:00 UTC"])
def test_a_chunk_run_the_other_parent_cancelled_for_its_own_deadline_or_outage_is_started_again(
        tmp_path, monkeypatch, chunk_deployment_without_worker, why):
    """B adopted A's chunk run; A's watcher then cancels it for A's own reason: its hour with nothing
    started ran out (A began 40 minutes before B), or an outage seen from A's machine. Old: B failed
    the chunk's pairs with A's reason ("not started within 3600 s" after 20 minutes of B's own
    wait), and for A's outage declared the storage unreachable itself from the Cancelled message,
    cancelled all its chunk runs and ended Failed. Now B starts the chunk again and applies its
    own deadlines; an outage is read from a chunk run's own end, never a Cancelled one."""
    import logging

    from prefect.client.orchestration import get_client

    from tasks.storage import open_storage

    dep = chunk_deployment_without_worker
    source, output, params, key0, pairs0, a_chunk = _shared_chunk(tmp_path, dep)

    def on_sleep(clock):
        with get_client(sync_client=True) as client:
            if clock.sleeps == 1:  # A's watcher, on A's machine
                monkeypatch.setattr(fanout, "get_run_logger", lambda: logging.getLogger("parent-a"))
                a = fanout.ChunkWatcher(client, [fanout.Chunk(0, pairs0, "_runs/parent-a/chunk-0.json", str(a_chunk.id))],
                                        open_storage(output.uri), RunOptions(), lambda done, total: None, 2,
                                        parent_id="parent-a")
                a.cancel(a.pending[0], why)
        _as_a_worker_would(dep, clock)

    monkeypatch.setattr(fanout, "time", FakeClock(on_sleep))
    state = stylize_batch(source, output, params, RunOptions(fan_out="workers", chunk_size=2, chunk_deployment=dep),
                          return_state=True)
    assert "unreachable" not in state.message, state.message
    report = json.loads((tmp_path / "out" / "_runs" / f"{state.state_details.flow_run_id}.json").read_text())
    errors = [i["error"] or "" for i in report["items"]]  # (the stand-in worker writes no chunk report)
    assert not any(why.split(" (")[0] in e or "unreachable" in e for e in errors), errors
    chunk0 = next(c for c in report["chunks"] if c["chunk"] == 0)
    assert chunk0["flow_run_id"] != str(a_chunk.id) and chunk0["state"] == "Completed"


def test_a_parent_being_cancelled_does_not_start_its_cancelled_chunks_again(prefect_api, tmp_path, monkeypatch):
    """The UI's Cancel of this parent: its hook (and Prefect, for its subflows) cancels its chunk
    runs with a parent's message. The watcher, polling meanwhile, must settle them, not restart them."""
    import logging

    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling, Running

    from tasks.storage import open_storage

    monkeypatch.setattr(fanout, "get_run_logger", lambda: logging.getLogger("test"))
    with get_client(sync_client=True) as client:
        parent = client.create_flow_run(stylize_batch, name="being-cancelled", state=Running())
        client.set_flow_run_state(parent.id, Cancelling(), force=True)
        kid = client.create_flow_run(stylize_chunk, tags=[f"nst-parent:{parent.id}"], state=Running())
        client.set_flow_run_state(kid.id, Cancelled(message="The parent flow run was cancelled."), force=True)
        restarted = []
        chunk = fanout.Chunk(0, [plan(0)], "_runs/x/chunk.json", str(kid.id), restart=restarted.append)
        watcher = fanout.ChunkWatcher(client, [chunk], open_storage(str(tmp_path)), RunOptions(), lambda *a: None, 1,
                                      parent_id=str(parent.id))
        watcher.poll()
    assert not restarted and chunk.settled
    assert watcher.result.items[0].error == "chunk 0 ended Cancelled: The parent flow run was cancelled."


def test_a_retried_parent_logs_its_own_chunk_runs_as_rejoined_not_started(
        tmp_path, monkeypatch, caplog, chunk_deployment_without_worker):
    """The UI's Retry of a fan-out parent whose chunk runs still run: it rejoins them (same flow
    run id, so same parent tag), another parent's run is adopted, and only the rest are started.
    Old: "2 started, 1 adopted" for a retry that started one."""
    import logging

    from prefect.states import Running

    dep = chunk_deployment_without_worker
    source, output = _folders(tmp_path, contents=6)
    params = tiny_params()
    plans = plan_pairs(source_entries(source), params, "random(seed=0)", output.format, output.quality)
    (key0, _), (key1, _), _ = plan_chunks(plans, 2, output.uri)
    _chunk_run(dep, key0, "retried", "_runs/retried/chunk-0.json", Running())  # its attempt 1's
    _chunk_run(dep, key1, "other", "_runs/other/chunk-1.json", Running())
    monkeypatch.setattr(fanout, "get_run_logger", lambda: logging.getLogger("retried"))
    run = RunOptions(fan_out="workers", chunk_size=2, chunk_deployment=dep)
    with caplog.at_level(logging.INFO, logger="retried"):
        chunks = fanout.start_chunks(plans, set(), output, params, run, "random(seed=0)", "retried",
                                     fanout.live_before_done(plans, 2, output.uri))
    cancel_children("retried")
    cancel_children("other")
    assert len(chunks) == 3
    assert "1 started, 1 rejoined from this run's earlier attempt, 1 adopted from other parents" in caplog.text, caplog.text
