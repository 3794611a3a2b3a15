"""Prefect tasks for one pair: fetch (IO, retried), stylize (compute, never retried), write (IO, retried)."""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.models import OutputSpec
from nst_core.errors import WeightsError
from nst_core.params import StyleParams

from .compute import io_slot, lease_device, run_on_device, targets_cache
from .plan import PairPlan
from .storage import is_transient, open_storage, read_uri

__all__ = ["PairOutcome", "fetch_image", "stylize_pair", "write_pair", "THUMB"]

THUMB = 96  # contact-sheet cell, px


def _retry_transient(task, task_run, state) -> bool:
    """Retry only throttling / 5xx / connection errors; a missing key or bad bytes fail at once."""
    try:
        state.result()
    except Exception as err:
        return is_transient(err)
    return False


@dataclass
class PairOutcome:
    """What a stylized pair produced; bytes stay in memory only while the pair is in flight."""

    image: bytes
    sidecar: dict
    thumbs: tuple[bytes, bytes, bytes] = field(repr=False)  # content, style, result (JPEG)


@task(name="fetch", task_run_name="fetch {uri}", retries=3, retry_delay_seconds=[1, 4, 10],
      retry_condition_fn=_retry_transient, cache_policy=NO_CACHE, persist_result=False)
def fetch_image(uri: str, io_workers: int = 8) -> bytes:
    with io_slot(io_workers):
        return read_uri(uri)


def _thumb(img) -> bytes:
    small = img.convert("RGB")
    small.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


@task(name="stylize", task_run_name="stylize {pair.name}", cache_policy=NO_CACHE, persist_result=False)
def stylize_pair(
    pair: PairPlan, content: bytes, style: bytes, params: StyleParams, output: OutputSpec,
    devices: list[str], weights_id: str, labels: dict[str, str],
) -> PairOutcome:
    """Decode, lease a device, stylize with cached style targets, encode. Bad input raises, naming it."""
    from nst_core.imageio import decode_image, encode_image
    from nst_core.optimize import compute_style_targets, extractor_for, stylize, targets_key

    logger = get_run_logger()
    content_pil = decode_image(content, pair.content).merged()
    style_img = decode_image(style, pair.style).rgb
    t_wait = time.perf_counter()
    step = max(1, params.iterations // 4)

    def progress(ev):
        if ev.iteration % step == 0 or ev.iteration == ev.total:
            logger.info("%s: evaluation %d/%d, loss %.4g", pair.name, ev.iteration, ev.total, ev.loss)

    def compute(device: str):
        p = params.model_copy(update={"device": device})
        extractor = extractor_for(p, opener=read_uri)
        if extractor.weights_id != weights_id:  # a worker whose weights differ from what the run planned with
            raise WeightsError(f"weights here are {extractor.weights_id}, but the run planned with {weights_id}")
        targets = None
        if p.preserve_color != "histogram":  # histogram targets depend on each content
            key = (pair.style, pair.style_identity, device, targets_key(p, extractor, 1))
            targets = targets_cache.get_or_compute(
                key, lambda: compute_style_targets(style_img, p, extractor=extractor))
        return stylize(content_pil, style_img, p, progress=progress, targets=targets, opener=read_uri)

    with lease_device(devices) as device:
        waited = time.perf_counter() - t_wait
        result = run_on_device(device, lambda: compute(device))
    image = encode_image(result.image, output.format, quality=output.quality)
    sidecar = {
        "content": pair.content,
        "style": pair.style,
        "output": open_storage(output.uri).uri_for(pair.image_key),
        "key": pair.key,
        "losses": result.losses,
        **result.metadata,  # its weights_id was checked against the run's above
        "seconds": {**result.metadata["seconds"], "device_wait": round(waited, 4)},
        "labels": labels,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return PairOutcome(image, sidecar, (_thumb(content_pil), _thumb(style_img), _thumb(result.image)))


@task(name="write", task_run_name="write {pair.name}", retries=3, retry_delay_seconds=[1, 4, 10],
      retry_condition_fn=_retry_transient, cache_policy=NO_CACHE, persist_result=False)
def write_pair(pair: PairPlan, outcome: PairOutcome, output_uri: str, io_workers: int = 8) -> str:
    """Image first, sidecar last: a sidecar means the pair is done."""
    storage = open_storage(output_uri)
    fmt = pair.image_key.rsplit(".", 1)[-1]
    with io_slot(io_workers):
        storage.write(pair.image_key, outcome.image, content_type=f"image/{'jpeg' if fmt == 'jpg' else fmt}")
        storage.write(pair.sidecar_key, json.dumps(outcome.sidecar, indent=2).encode(), "application/json")
    return storage.uri_for(pair.image_key)
