"""The sliding window: never more than run.window pairs in flight, whatever the dataset size."""

import logging

from flows import pipeline
from tasks.models import OutputSpec, RunOptions
from nst_core import StyleParams
from tasks.plan import PairPlan


class FakeFuture:
    def __init__(self, tracker, value=None):
        self.tracker, self.value = tracker, value

    def wait(self):
        self.tracker["in_flight"] -= 1

    @property
    def state(self):
        class Done:
            def is_completed(self):
                return True
        return Done()

    def result(self, raise_on_failure=True):
        return self.value


class FakeTask:
    def __init__(self, tracker, kind):
        self.tracker, self.kind = tracker, kind

    def submit(self, *args):
        if self.kind == "write":  # one write per pair: count the pair as in flight until collected
            self.tracker["in_flight"] += 1
            self.tracker["peak"] = max(self.tracker["peak"], self.tracker["in_flight"])
            return FakeFuture(self.tracker, "out-uri")
        if self.kind == "stylize":
            outcome = type("O", (), {"sidecar": {"seconds": {"total": 1.0}, "losses": {}}, "thumbs": (b"", b"", b"")})
            return FakeFuture(self.tracker, outcome)
        return FakeFuture(self.tracker)


def test_window_bounds_pairs_in_flight(monkeypatch, tmp_path):
    tracker = {"in_flight": 0, "peak": 0}
    monkeypatch.setattr(pipeline, "fetch_image", FakeTask(tracker, "fetch"))
    monkeypatch.setattr(pipeline, "stylize_pair", FakeTask(tracker, "stylize"))
    monkeypatch.setattr(pipeline, "write_pair", FakeTask(tracker, "write"))
    monkeypatch.setattr(pipeline, "get_run_logger", lambda: logging.getLogger("test"))
    todo = [PairPlan(i, f"c{i}", "s", "id", f"n{i}", f"n{i}.jpg", f"n{i}.json", "k") for i in range(10_000)]
    done = []
    result = pipeline.run_pairs(todo, OutputSpec(uri=str(tmp_path)), StyleParams(weights="random"),
                                RunOptions(window=7, contact_sheet_rows=3), ["cpu"], "w", lambda n, t: done.append(n))
    assert tracker["peak"] == 7 and tracker["in_flight"] == 0
    assert len(result.items) == 10_000 and all(i.status == "done" for i in result.items.values())
    assert len(result.thumbs) == 3 and done[-1] == 10_000
