"""The done rule of tasks.contract on its own: image and sidecar exist, the key matches, and the
sidecar's record of its image matches the image that is there."""

from __future__ import annotations

import json

from tasks.contract import PairPlan, done_pairs, sidecar
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
