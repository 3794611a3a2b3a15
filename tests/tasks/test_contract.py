"""The done rule of tasks.contract on its own: image and sidecar exist, the key matches, and the
sidecar's record of its image matches the image that is there."""

from __future__ import annotations

import json

import pytest

from tasks.contract import PairPlan, done_in, done_pairs, renamed_output, sidecar
from tasks.storage import ObjectInfo


def plan(name: str = "named/x", key: str = "k" * 64) -> PairPlan:
    return PairPlan(0, "c.png", "s.png", "cid", "sid", name, f"{name}.png", f"{name}.json", key)


def judge(p: PairPlan, meta: dict, image: ObjectInfo) -> bool:
    listed = {p.image_key: image, p.sidecar_key: ObjectInfo(p.sidecar_key, 1, "")}
    return 0 in done_pairs([p], lambda key: json.dumps(meta).encode(), listed)


def test_the_image_record_must_match_the_listing():
    p = plan()
    meta = {"key": p.key, "image": {"size": 10, "identity": "etag-a"}}
    assert judge(p, meta, ObjectInfo(p.image_key, 10, "etag-a"))
    assert not judge(p, meta, ObjectInfo(p.image_key, 11, "etag-a"))  # another image's size
    assert not judge(p, meta, ObjectInfo(p.image_key, 10, "etag-b"))  # S3: same size, another ETag
    assert judge(p, {"key": p.key, "image": {"size": 10, "identity": "sha256:x"}}, ObjectInfo(p.image_key, 10, ""))


def test_a_sidecar_without_an_image_record_counts_only_where_the_name_carries_the_key():
    named, keyed = plan(), plan(f"c__s__{'k' * 8}")
    assert not judge(named, {"key": named.key}, ObjectInfo(named.image_key, 10, ""))
    assert judge(keyed, {"key": keyed.key}, ObjectInfo(keyed.image_key, 10, ""))


class _FoldingFolder:
    """A folder of macOS's or Windows' file systems ("Photos/x" and "photos/x" are one file), as
    done_in sees it: its listing keeps the case the files were made with. This machine's folders
    tell cases apart, so it stands in for one."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files

    def folds_case(self) -> bool:
        return True

    def list(self):
        return [ObjectInfo(k, len(v), "") for k, v in self.files.items()]

    def read(self, key: str):
        found = {k.lower(): v for k, v in self.files.items()}.get(key.lower())
        if found is None:
            from tasks.storage import MissingObjectError
            raise MissingObjectError(key)
        return found, ""


def test_a_done_pair_is_found_whatever_the_case_of_its_folder_where_the_output_folds_case():
    """Manifest output "Photos/x" and the folder made as "photos" by an earlier run: old: the
    listing was looked up with exact case, so the pair was never done at planning; it got a task
    and a claim every night and was reported "made by another run on this output after this run
    planned"."""
    p = plan("Photos/x")
    meta = json.dumps({"key": p.key, "image": {"size": 10, "identity": ""}}).encode()
    folder = _FoldingFolder({"photos/x.png": b"0123456789", "photos/x.json": meta})
    assert done_in(folder, [p], io_workers=1) == {0}
    listed = {info.key: info for info in folder.list()}
    assert done_pairs([p], lambda key: meta, listed) == set()  # where cases are two files: not this one


def test_the_engine_metadata_cannot_overwrite_contract_fields():
    class Result:
        losses = {"initial": {}, "final": {}}
        history = []
        metadata = {"key": "engine", "output": "engine", "content": "engine", "style": "engine",
                    "identities": "engine", "flow_run": "engine", "image": "engine", "seconds": {"total": 1.0}}

    p = plan()
    meta = sidecar(p, "file:///out/named/x.png", Result(), {}, {"id": "run"}, image={"size": 3, "identity": "i"})
    assert meta["key"] == p.key and meta["output"] == "file:///out/named/x.png"
    assert meta["content"] == "c.png" and meta["style"] == "s.png" and meta["flow_run"] == {"id": "run"}
    assert meta["identities"] == {"content": "cid", "style": "sid"} and meta["image"] == {"size": 3, "identity": "i"}


def test_an_upgrade_that_adds_params_keeps_every_key_of_the_results_written_before():
    """Keys computed by the release before tile_size/tile_halo/max_memory_gb existed: the next
    nightly run must skip what it wrote, not redo every pair under a new name."""
    from nst_core import StyleParams
    from tasks.contract import pair_key

    c, s = "s3://b/c.png#e1", "s3://b/s.png#e2"
    assert pair_key(c, s, StyleParams(), "imagenet1k_features:abc", "jpeg", 92) == (
        "10ae0422034ee96050775d6f666c20a9f3f30b07d3e606623ee6dd880b4e077c")
    assert pair_key(c, s, StyleParams(image_size=256, precision="fp32"), "random", "png", 92) == (
        "a48e3d04c75fbd9843811e4aca8fee192b4daba5d7724a63c6d6b68c607552c3")
    tiled = pair_key(c, s, StyleParams(tile_size=384), "random", "png", 92)
    assert tiled != pair_key(c, s, StyleParams(), "random", "png", 92)  # a tiling asked for is its own result


def test_settings_that_cannot_change_the_file_keep_the_key():
    """Old: pinning weights_sha256 (the weights weights_id already names) or another quality on a
    png run (png has none) changed every key: the whole dataset redone, under new names beside the
    old results. Any quality that reaches a jpeg or webp encoder still changes it."""
    from nst_core import StyleParams
    from tasks.contract import pair_key

    c, s, w = "s3://b/c.png#e1", "s3://b/s.png#e2", "torchvision:vgg16_features-amdegroot-88604fc0.pth"
    pinned = StyleParams(weights_sha256="a" * 64)
    assert pair_key(c, s, pinned, w, "jpeg", 92) == pair_key(c, s, StyleParams(), w, "jpeg", 92)
    assert pair_key(c, s, StyleParams(), w, "png", 80) == pair_key(c, s, StyleParams(), w, "png", 92)
    assert pair_key(c, s, StyleParams(), w, "jpeg", 80) != pair_key(c, s, StyleParams(), w, "jpeg", 92)
    assert pair_key(c, s, StyleParams(), w, "webp", 80) != pair_key(c, s, StyleParams(), w, "webp", 92)


@pytest.mark.parametrize("spelt", [
    {"learning_rate": 1.0},  # L-BFGS's own step
    {"optimizer": "adam", "learning_rate": 0.02},  # Adam's
    {"style_layer_weights": [2.0] * 5},  # normalized to sum 1: equal weights, as unset
    {"style_blend_weights": [3.0]},  # a batch pair's one style: weight 1, as unset
])
def test_a_default_spelt_out_keeps_the_key(spelt):
    """Old: writing a default out (learning_rate 1.0 under L-BFGS, equal style_layer_weights) changed
    every key, so the whole dataset was redone under new names beside the old results.
    tests/nst_core/test_optimize.py shows the two spellings give the same pixels."""
    from nst_core import StyleParams
    from tasks.contract import pair_key

    c, s = "s3://b/c.png#e1", "s3://b/s.png#e2"
    implicit = StyleParams(**{k: v for k, v in spelt.items() if k == "optimizer"})
    assert pair_key(c, s, StyleParams(**spelt), "random", "jpeg", 92) == pair_key(c, s, implicit, "random", "jpeg", 92)


@pytest.mark.parametrize("changed", [{"learning_rate": 0.5}, {"optimizer": "adam", "learning_rate": 1.0},
                                     {"style_layer_weights": [1.0, 1.0, 1.0, 1.0, 2.0]}])
def test_a_step_or_layer_weights_other_than_the_default_change_the_key(changed):
    from nst_core import StyleParams
    from tasks.contract import pair_key

    c, s = "s3://b/c.png#e1", "s3://b/s.png#e2"
    implicit = StyleParams(**{k: v for k, v in changed.items() if k == "optimizer"})
    assert pair_key(c, s, StyleParams(**changed), "random", "jpeg", 92) != pair_key(c, s, implicit, "random", "jpeg", 92)


def test_an_output_name_with_another_formats_extension_is_renamed_to_the_runs():
    assert renamed_output("x.jpg", "png") == "x.png" and renamed_output("a/b.JPG", "webp") == "a/b.webp"
    assert renamed_output("x.jpeg", "jpeg") == "x.jpg" and renamed_output("x.PNG", "png") == "x.png"
    assert renamed_output("x.jpg", "jpeg") is None and renamed_output("x.png", "png") is None
    assert renamed_output("x", "png") is None and renamed_output(None, "png") is None
    assert renamed_output("x.tif", "png") is None  # not an output format: part of the name (x.tif.png)


def test_a_repeat_of_a_pair_left_to_another_run_is_left_too(tmp_path):
    """Old: the repeat kept its planned "the same result, made once", so the pairs table linked it to
    files never made and did not count it as left (tasks.report)."""
    from tasks.contract import LEFT_TO, left_item, repeats_follow_their_first, skipped_item
    from tasks.storage import open_storage

    out = open_storage(str(tmp_path))
    first = PairPlan.named(0, "c/a.png", "s/x.png", "e1", "e2", "a__x", "k" * 64, "jpeg")
    repeat = PairPlan.named(1, "c/b.png", "s/x.png", "e1", "e2", "a__x", "k" * 64, "jpeg", duplicate_of=0)
    items = {0: left_item(first, out, "run r2 (h pid 9)"), 1: skipped_item(repeat, out, duplicate_of=first)}
    after = repeats_follow_their_first(items, [first, repeat], out)
    assert after[1].status == "skipped" and after[1].note.startswith(f"{LEFT_TO}run r2 (h pid 9)")
