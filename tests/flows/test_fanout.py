"""fan_out: workers — chunk identities from content, a deadline on waiting, children cancelled with the parent."""

from __future__ import annotations

import json

import pytest

from flows import batch
from flows.batch import cancel_children, plan_chunks, stylize_batch
from flows.chunk import stylize_chunk
from tasks.contract import PairPlan
from tasks.models import BatchSource, OutputSpec, RunOptions

from helpers import pattern, tiny_params


def plan(i: int) -> PairPlan:
    return PairPlan(i, f"c{i}", "s", "cid", "sid", f"n{i}", f"n{i}.jpg", f"n{i}.json", f"key{i}")


def test_a_retried_parent_never_reuses_a_chunk_for_other_pairs():
    """Re-planning after some chunks finished shifts pairs between chunk positions; a key made from
    the position (the old way) would hand new pairs to an old child, which never runs them."""
    todo = [plan(i) for i in range(10)]
    first = dict(plan_chunks(todo, 4, "parent"))
    retried = dict(plan_chunks(todo[4:], 4, "parent"))  # chunk 0 finished before the retry
    for key, pairs in retried.items():
        assert key not in first or [p.index for p in first[key]] == [p.index for p in pairs]
    assert sorted(p.index for pairs in retried.values() for p in pairs) == list(range(4, 10))
    assert dict(plan_chunks(todo, 4, "parent")).keys() == first.keys()  # the same plan finds the same children


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

    monkeypatch.setattr(batch, "POLL_S", 0.2)
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
    assert all("not finished within chunk_timeout_s=3 s (still Scheduled" in e for e in errors), errors
    assert all("is a worker polling" in e for e in errors)
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"nst-parent:{run_id}"])))
    assert len(children) == 2 and all(c.state.name in ("Cancelling", "Cancelled") for c in children)
    assert all(c.parameters["run"]["devices"] == ["auto"] for c in children)  # the parent's devices stay home


def test_cancelling_the_parent_cancels_its_chunk_runs(prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    assert batch._on_cancel in stylize_batch.on_cancellation_hooks
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(stylize_chunk)
        del flow_id
        kids = [client.create_flow_run(stylize_chunk, tags=["nst-parent:p-123"], state=Scheduled()) for _ in range(2)]
        other = client.create_flow_run(stylize_chunk, tags=["nst-parent:someone-else"], state=Scheduled())
        assert cancel_children("p-123") == 2
        states = [client.read_flow_run(k.id).state.name for k in kids]
        assert all(s in ("Cancelling", "Cancelled") for s in states), states
        assert client.read_flow_run(other.id).state.name == "Scheduled"


def test_a_chunk_without_a_readable_report_is_judged_by_its_sidecars(tmp_path):
    from flows.batch import merge_chunk
    from tasks.storage import open_storage

    out = open_storage(str(tmp_path))
    written, lost = plan(0), plan(1)
    out.write(written.image_key, b"img")
    out.write(written.sidecar_key, json.dumps({"key": written.key}).encode())
    items = merge_chunk(3, [written, lost], "Crashed", "worker died", None, out)
    assert items[0].status == "done" and items[0].sidecar.endswith("n0.json")
    assert items[1].status == "failed" and items[1].error == "chunk 3 ended Crashed: worker died"
