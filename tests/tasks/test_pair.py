import pytest

from tasks import storage
from tasks.pair import ObjectCache
from tasks.storage import MissingObjectError, StorageError, retrying


def flaky(failures: list[Exception]):
    calls = []

    def read():
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return b"bytes"

    return read, calls


def test_transient_errors_are_retried_within_one_budget(monkeypatch):
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0, 0, 0))
    read, calls = flaky([StorageError("s3://b/k: SlowDown", transient=True),
                         StorageError("s3://b/k: EndpointConnectionError", transient=True)])
    assert retrying(read) == b"bytes" and len(calls) == 3
    read, calls = flaky([StorageError("503", transient=True)] * 5)
    with pytest.raises(StorageError):
        retrying(read)
    assert len(calls) == 4  # the budget: 1 + len(RETRY_DELAYS) attempts, then the error


def test_a_missing_key_is_not_retried():
    read, calls = flaky([MissingObjectError("s3://b/k: no such object")])
    with pytest.raises(MissingObjectError):
        retrying(read, delays=(0, 0))
    assert len(calls) == 1


def test_object_cache_fetches_each_object_once_even_when_asked_at_once():
    import threading

    cache, calls, gate = ObjectCache(max_bytes=100), [], threading.Event()

    def fetch(uri):
        calls.append(uri)
        gate.wait(2)
        return b"x" * 40

    threads = [threading.Thread(target=cache.get, args=("s3://b/style.png", "etag", fetch)) for _ in range(5)]
    [t.start() for t in threads]
    gate.set()
    [t.join() for t in threads]
    assert calls == ["s3://b/style.png"] and cache.fetches == 1
    cache.get("a", "1", fetch), cache.get("b", "1", fetch), cache.get("c", "1", fetch)  # 40 B each, 100 B budget
    cache.get("s3://b/style.png", "etag", fetch)
    assert calls.count("s3://b/style.png") == 2  # it was evicted by then: memory stays bounded


def test_an_input_changed_since_planning_fails_its_pair(tmp_path):
    from nst_core.errors import NSTError
    from tasks.models import OutputSpec
    from tasks.pair import PairContext, _fetch

    from helpers import tiny_params

    (tmp_path / "c.png").write_bytes(b"planned")
    planned = storage.LocalStorage(tmp_path).read("c.png")[1]
    ctx = PairContext(OutputSpec(uri=str(tmp_path / "out")), tiny_params(), ["cpu"], "w")
    assert _fetch(ctx, str(tmp_path / "c.png"), planned) == b"planned"
    (tmp_path / "c.png").write_bytes(b"replaced after planning")
    with pytest.raises(NSTError, match="changed during the run"):
        _fetch(ctx, str(tmp_path / "c.png"), planned + "-not-cached")  # a new cache entry: fetched again
    with pytest.raises(NSTError, match="changed during the run"):
        _fetch(PairContext(OutputSpec(uri=str(tmp_path / "out")), tiny_params(), ["cpu"], "w"),
               str(tmp_path / "c.png"), planned)


def test_chunk_report_items_are_merged_by_pair_key():
    """Items find their pair by its key, whatever index the chunk report gives them."""
    from flows.fanout import merge_chunk
    from tasks.contract import PairPlan

    a = PairPlan(0, "a", "s", "i", "i", "na", "na.png", "na.json", "ka")
    b = PairPlan(1, "b", "s", "i", "i", "nb", "nb.png", "nb.json", "kb")
    report = {"items": [
        {"index": 0, "key": "kb", "content": "b", "style": "s", "status": "done", "output": "nb.png"},
        {"index": 1, "key": "ka", "content": "a", "style": "s", "status": "failed", "output": "na.png", "error": "x"},
    ]}
    items = merge_chunk(0, [a, b], "Completed", "", report, storage.LocalStorage("/nonexistent-out"))
    assert items[0].content == "a" and items[0].status == "failed"
    assert items[1].content == "b" and items[1].status == "done"


def test_ctrl_c_stops_every_pair_of_a_device_step_each_with_its_own_reason(tmp_path):
    from helpers import pattern, tiny_params
    from tasks.contract import PairPlan
    from tasks.models import OutputSpec
    from tasks.pair import PairContext, PairStopped, _PairInputs, _stylize_step, stop_requested
    from tasks.steps import StepRequest

    ctx = PairContext(OutputSpec(uri=str(tmp_path / "out")), tiny_params(iterations=20), ["cpu"], "random(seed=0)",
                      pairs_per_step=3)

    class CtrlCAtTheFirstLogLine:  # the pair logs at evaluation 5: Ctrl-C then
        def info(self, *args):
            stop_requested.set()

    requests = []
    for i in range(3):
        plan = PairPlan.named(i, "c.png", f"s{i}.png", "cid", f"sid{i}", f"c__s{i}", "k", "png")
        inputs = _PairInputs(plan, ctx, pattern((40, 32)), pattern((32, 40), "style", i), CtrlCAtTheFirstLogLine())
        requests.append(StepRequest(ctx, (32, 26), 3, None, payload=inputs))
    try:
        outcomes = _stylize_step(ctx, "cpu", requests)
    finally:
        stop_requested.clear()
    assert all(isinstance(o, PairStopped) for o in outcomes), outcomes
    assert [str(o).split(":")[0] for o in outcomes] == ["c__s0", "c__s1", "c__s2"]


def test_a_style_whose_targets_do_not_fit_the_device_fails_its_pair_alone(tmp_path, monkeypatch):
    """Old: the style targets of a step's pairs were computed outside any out-of-memory handling:
    one style too large for the device raised torch's OutOfMemoryError out of the step, failing
    its other pairs with it, with a traceback. Now that pair fails with DeviceMemoryError, which
    names the style (it named the content, which had not been touched yet)."""
    import logging

    import torch

    import nst_core
    from helpers import pattern, tiny_params
    from nst_core import DeviceMemoryError
    from tasks.contract import PairPlan
    from tasks.models import OutputSpec
    from tasks.pair import PairContext, _PairInputs, _stylize_step
    from tasks.steps import StepRequest

    real = nst_core.compute_style_targets

    def big_style(style, *a, **k):
        if k.get("style_names") == ["oom-s1.png"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(style, *a, **k)

    monkeypatch.setattr(nst_core, "compute_style_targets", big_style)
    ctx = PairContext(OutputSpec(uri=str(tmp_path / "out")), tiny_params(iterations=3), ["cpu"], "random(seed=0)",
                      pairs_per_step=3)
    requests = []
    for i in range(3):  # styles of their own: the process's targets cache must not hold them already
        plan = PairPlan.named(i, "c.png", f"oom-s{i}.png", "cid", f"oom-sid{i}", f"c__s{i}", "k", "png")
        inputs = _PairInputs(plan, ctx, pattern((40, 32)), pattern((32, 40), "style", i), logging.getLogger("t"))
        requests.append(StepRequest(ctx, (32, 26), 3, None, payload=inputs))
    outcomes = _stylize_step(ctx, "cpu", requests)
    assert isinstance(outcomes[1], DeviceMemoryError) and str(outcomes[1]).startswith("style oom-s1.png: out of memory")
    assert [len(o.history) for i, o in enumerate(outcomes) if i != 1] == [3, 3], outcomes


def test_a_pair_stopped_on_request_ends_cancelled_with_its_reason_not_failed(tmp_path):
    """Stopping on request (Ctrl-C, SIGTERM, the UI's Cancel) is not a failure: the pair task's
    state is Cancelled with the pair's reason (old: it raised, and the task runner logged a
    traceback per pair at ERROR)."""
    from helpers import tiny_params
    from tasks.contract import PairPlan
    from tasks.models import OutputSpec
    from tasks.pair import PairContext, process_pair, stop_requested

    ctx = PairContext(OutputSpec(uri=str(tmp_path / "out")), tiny_params(), ["cpu"], "random(seed=0)")
    plan = PairPlan.named(0, "c.png", "s.png", "cid", "sid", "c__s", "k", "png")
    ctx.announce(plan)
    stop_requested.set()
    try:
        state = process_pair.fn(plan, ctx)
    finally:
        stop_requested.clear()
    assert state.is_cancelled() and state.message == "c__s: run interrupted before the pair finished", state


def test_progress_lines_start_their_best_afresh_when_a_step_runs_again_from_its_start():
    """A step out of device memory runs its pairs again from their start, through the same progress
    callback: the line's "best" kept the abandoned attempt's lower loss, one the image never had."""
    from types import SimpleNamespace

    from tasks.pair import _PairInputs
    from tasks.storage import StorageHealth

    lines = []
    logger = SimpleNamespace(info=lambda fmt, *args: lines.append(fmt % args))
    ctx = SimpleNamespace(params=SimpleNamespace(iterations=4), pair_timeout_s=None, health=StorageHealth())
    x = _PairInputs(SimpleNamespace(name="p"), ctx, None, None, logger)
    for i, loss in [(1, 2.0), (2, 1.5), (3, 1.2), (1, 2.0), (2, 1.6), (3, 1.4), (4, 1.3)]:
        x.progress(SimpleNamespace(iteration=i, total=4, loss=loss, scale=1, where=""))
    assert lines[-1] == "p: evaluation 4/4, loss 1.3 (best 1.3)", lines


@pytest.mark.parametrize("scales", [1, 2])
def test_a_waiting_pair_holds_its_inputs_at_the_output_size_where_that_changes_no_result(tmp_path, monkeypatch, scales):
    """A pair waits for its device step holding its decoded inputs: it held them at full size (a
    64 MP style scan, 192 MB, once per pair in flight: 8 pairs of an 8000 px style took 3.8 GB).
    With one scale the engine resizes each input to image_size once, so that is done at decode
    and the result is the same bit for bit; with several it resizes the original to each scale,
    so the original is kept."""
    import logging

    import numpy as np
    from PIL import Image

    import tasks.pair as pair_module
    from helpers import pattern, tiny_params
    from nst_core import stylize
    from tasks.contract import PairPlan
    from tasks.models import OutputSpec
    from tasks.pair import PairContext, _process

    content = pattern((400, 300)).convert("RGBA")
    content.putalpha(Image.linear_gradient("L").resize((400, 300)))
    content.save(tmp_path / "c.png")
    pattern((500, 500), "style").save(tmp_path / "s.png")
    ids = {n: storage.LocalStorage(tmp_path).read(n)[1] for n in ("c.png", "s.png")}
    params = tiny_params(image_size=64, iterations=2, scales=scales)
    ctx = PairContext(OutputSpec(uri=str(tmp_path / "out")), params, ["cpu"], "random(seed=0)")
    held = []

    def device_step(request, index):  # what the pair hands its device step: held while it waits
        held.append(request.payload)
        request.outcome = RuntimeError("no device step in this test")
        return request

    monkeypatch.setattr(pair_module, "get_run_logger", lambda: logging.getLogger("t"))
    monkeypatch.setattr(ctx.steps, "run", device_step)
    plan = PairPlan.named(0, str(tmp_path / "c.png"), str(tmp_path / "s.png"), ids["c.png"], ids["s.png"], "c__s", "k", "png")
    with pytest.raises(RuntimeError, match="no device step"):
        _process(plan, ctx)
    (inputs,) = held
    if scales == 1:
        assert (inputs.content.size, inputs.content.mode, inputs.style.size) == ((64, 48), "RGBA", (64, 64))
        same = [stylize(c, s, params).image for c, s in ((content, Image.open(tmp_path / "s.png")),
                                                        (inputs.content, inputs.style))]
        assert np.array_equal(np.asarray(same[0]), np.asarray(same[1]))
    else:
        assert (inputs.content.size, inputs.style.size) == ((400, 300), (500, 500))


def test_a_style_is_decoded_once_for_the_pairs_that_share_it(tmp_path, monkeypatch):
    """Each pair decoded its style again: an 8000 px painting scan cost ~1 s of decoding per pair
    (8 pairs of one 64 MP style: 25.7 s against 18.2 s with a small one, on 2 CPU cores). The
    pairs of a run share one decoded style, at the output size; the contents are their own."""
    import logging

    import nst_core.imageio
    import tasks.pair as pair_module
    from helpers import pattern, tiny_params
    from tasks.contract import PairPlan
    from tasks.models import OutputSpec
    from tasks.pair import PairContext, _process

    for i in range(3):
        pattern((80, 60), "content", i).save(tmp_path / f"c{i}.png")
    pattern((300, 300), "style").save(tmp_path / "s.png")
    ids = {p.name: storage.LocalStorage(tmp_path).read(p.name)[1] for p in tmp_path.glob("*.png")}
    ctx = PairContext(OutputSpec(uri=str(tmp_path / "out")), tiny_params(image_size=64), ["cpu"], "random(seed=0)")
    decoded, held = [], []
    real = nst_core.imageio.decode_image
    monkeypatch.setattr(nst_core.imageio, "decode_image", lambda data, name, **k: decoded.append(name) or real(data, name, **k))
    monkeypatch.setattr(pair_module, "get_run_logger", lambda: logging.getLogger("t"))

    def device_step(request, index):
        held.append(request.payload)
        request.outcome = RuntimeError("no device step in this test")
        return request

    monkeypatch.setattr(ctx.steps, "run", device_step)
    for i in range(3):
        plan = PairPlan.named(i, str(tmp_path / f"c{i}.png"), str(tmp_path / "s.png"), ids[f"c{i}.png"], ids["s.png"],
                              f"c{i}__s", "k", "png")
        with pytest.raises(RuntimeError, match="no device step"):
            _process(plan, ctx)
    assert sorted(n.rsplit("/", 1)[1] for n in decoded) == ["c0.png", "c1.png", "c2.png", "s.png"]
    assert {x.style.size for x in held} == {(64, 64)} and len({id(x.content) for x in held}) == 3
    # the style's file bytes left the download cache once its decoded copy was kept; the contents' stay
    assert ctx.cache.fetches == 4 and len(ctx.cache._items) == 3
