"""Test helpers: real image files made from smooth synthetic patterns."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def pattern(size: tuple[int, int], kind: str = "content", seed: int = 0) -> Image.Image:
    """A smooth RGB test image (w, h) whose statistics survive resizing.

    content: soft blobs and a gradient; style: diagonal colour stripes; other: rings.
    """
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    x, y = x / w, y / h
    rng = np.random.default_rng(seed)
    if kind == "content":
        img = np.stack([x, y, 1 - x * y], -1) * 0.6
        for cx, cy, r in rng.random((4, 3)):
            img += 0.4 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (0.02 + 0.05 * r))[..., None] * rng.random(3)
    elif kind == "style":
        phase = rng.random() * 6
        img = np.stack([np.sin(12 * (x + y) + phase), np.sin(7 * (x - y)), np.cos(9 * x)], -1) * 0.5 + 0.5
    else:
        r = np.hypot(x - 0.5, y - 0.5)
        img = np.stack([np.sin(30 * r), np.cos(20 * r), x], -1) * 0.5 + 0.5
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def engine_device() -> str:
    """The device the engine tests' params() run on: NST_TEST_DEVICE, default "cpu".

    benchmarks/gpu.sh sets it to "cuda" so that the engine tests really run on the GPU;
    tests/nst_core/conftest.py refuses a CUDA device that is not there and skips, with reasons,
    the tests that are CPU-specific by nature.
    """
    return os.environ.get("NST_TEST_DEVICE", "").strip() or "cpu"


def to_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def tiny_params(**fields):
    """StyleParams for flow tests: random weights, tiny images, single scale where scales exist."""
    from nst_core import StyleParams

    base = {"weights": "random", "image_size": 32, "iterations": 3, "device": "cpu"}
    if "scales" in StyleParams.model_fields:  # coarse-to-fine would shrink a 32 px image below VGG's pools
        base["scales"] = 1
    return StyleParams(**{**base, **fields})


def md_shown(markdown: str) -> str:
    """``markdown`` with its backslash escapes undone: the text a Markdown renderer shows of it."""
    import re

    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", markdown)


def stop_process(proc, timeout: float = 30) -> None:
    """SIGTERM a process started with start_new_session=True (its whole group), SIGKILL after ``timeout``."""
    import os
    import signal
    import subprocess

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def artifacts_of(flow_run_id) -> dict[str, list]:
    """The artifacts of a flow run by type (progress, table, markdown, image), from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_type = {}
    for a in found:
        by_type.setdefault(a.type, []).append(a)
    return by_type


def file_loss(data: bytes, content: Image.Image, style: Image.Image, params) -> float:
    """The exact fp32 total loss of an output file as it reads back (single scale), measured apart
    from stylize: the content sized as the engine sizes it, the style's targets, the objective."""
    from nst_core import compute_style_targets
    from nst_core.imageio import resize_longest, to_tensor
    from nst_core.objective import Objective
    from nst_core.vgg import extractor_for

    extractor = extractor_for(params)
    c = to_tensor(resize_longest(content.convert("RGB"), params.image_size), extractor.device)
    targets = compute_style_targets(style, params, extractor=extractor, content=c)
    x = to_tensor(Image.open(io.BytesIO(data)).convert("RGB"), extractor.device)
    return Objective.build(extractor, params, c, [targets.grams]).measure(x)[0]["total"]
