"""Tiled evaluation: the VGG pass of a large image in overlapping tiles, for outputs beyond memory.

The optimization variable stays the whole image; only the VGG pass is tiled. A tile is a *core*
(the tiles' cores partition the image) plus a *halo* on each side inside the image; the features
of the core positions are taken from the tile's pass and the halo's are dropped. With a halo of
at least the deepest layer's reach (``exact_halo``, 64 px at relu5_1) every core feature equals the
untiled one, so sums over positions (the content loss, the Grams) split exactly over tiles. How
the objective uses them (two passes for the style loss) is ``Objective``'s.

Tile edges are multiples of the deepest layer's pooling factor ``align`` (16 at relu5_1), so a
core starts on a whole feature position at every layer and the floor of each 2×2 pool is the
untiled one.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .lbfgs import HISTORY
from .losses import gram_matrix
from .params import VGG16_CHANNELS, VGG16_LAYERS, StyleParams, exact_halo, layer_factor, round_up, used_halo

__all__ = ["Tile", "Tiling", "tile_grid", "positions", "exact_halo", "untiled_bytes", "memory_budget",
           "cgroup_memory_limit", "tiling_for", "tiled_features", "tiled_grams", "tiled_maps", "history_for", "seam_ratio", "HALO"]

#: Halo (px) of a tile when none is given: measured, not the receptive field's. The exact halo at
#: relu5_1 (64 px) costs 1.89x an untiled evaluation at 1024 px with 384 px tiles; 32 px costs
#: 1.41x and leaves a 6.5% gradient error, which the shifting grid spreads over the image
#: (``benchmarks/tiling.py halo`` and ``fidelity``; README "Print-size output").
HALO = 32


@dataclass(frozen=True)
class Tile:
    """One tile: its core ``[y0, y1) × [x0, x1)`` and the crop ``[cy0, cy1) × [cx0, cx1)`` the VGG
    pass sees (the core plus the halo, inside the image), in pixels."""

    y0: int
    y1: int
    x0: int
    x1: int
    cy0: int
    cy1: int
    cx0: int
    cx1: int

    def crop(self, x: Tensor) -> Tensor:
        """The crop of a (B, C, H, W) image (a view: gradients flow back into x)."""
        return x[..., self.cy0:self.cy1, self.cx0:self.cx1]

    def core(self, features: Tensor, factor: int, height: int, width: int) -> Tensor:
        """The core positions of this tile's (B, nC, h, w) features at a layer ``factor``× coarser
        than the (height, width) image: rows ⌊y0/f⌋ … (⌊y1/f⌋, or ⌊H/f⌋ at the image's edge)."""
        top, left = self.y0 // factor - self.cy0 // factor, self.x0 // factor - self.cx0 // factor
        rows = (self.y1 if self.y1 < height else height) // factor - self.y0 // factor
        cols = (self.x1 if self.x1 < width else width) // factor - self.x0 // factor
        return features[..., top:top + rows, left:left + cols]

    def origin(self, factor: int) -> tuple[int, int]:
        """Where ``core(...)`` starts in the untiled features: (row, col)."""
        return self.y0 // factor, self.x0 // factor


@dataclass(frozen=True)
class Tiling:
    """Tiles of ``size`` px with a ``halo`` px margin, edges on multiples of ``align`` px.

    ``exact`` is the halo at which tiled features equal untiled ones (``exact_halo``): passes
    that run once and carry no gradient (targets, reported losses) use it; each evaluation's
    two passes use ``halo``.
    """

    size: int
    halo: int
    align: int
    exact: int

    def grid(self, height: int, width: int, offset: tuple[int, int] = (0, 0), exact: bool = False) -> list[Tile]:
        return tile_grid(height, width, self.size, self.exact if exact else self.halo, self.align, offset)

    def offset(self, seed: int, evaluation: int) -> tuple[int, int]:
        """The grid's shift for one evaluation: random multiples of ``align`` below ``size``.

        Differs from fixed tiles (and from the peers' stylize-then-blend): a fixed grid would leave
        the same border every evaluation, where only the halo's approximation acts; shifting it
        each evaluation spreads that error over the image, so no seam forms. Seeded: a rerun
        shifts the same way.
        """
        rng = random.Random(seed * 1_000_003 + evaluation)
        steps = max(1, self.size // self.align)
        return rng.randrange(steps) * self.align, rng.randrange(steps) * self.align

    def describe(self) -> dict:
        return {"tile_size": self.size, "halo": self.halo}


def _cuts(length: int, size: int, align: int, offset: int) -> list[int]:
    """Edges along one axis: 0, offset + k·size inside the image, length; no piece under ``align``
    at the far end (its deepest features would be empty). An axis no longer than ``size`` is not
    cut: the shifting grid cut a 512×520 image into 4 tiles of 512 px where 2 do, each cut adding
    the halo's passes and its approximation."""
    if length <= size:
        return [0, length]
    inner = [c for c in range(offset % size, length, size) if align <= c <= length - align]
    return [0, *inner, length]


def _grid_cuts(height: int, width: int, size: int, align: int, offset: tuple[int, int]) -> tuple[list[int], list[int]]:
    """(row edges, column edges) of the grid of ``size`` px tiles at ``offset``, both rounded to
    ``align`` (size up, offset down)."""
    size = max(align, round_up(size, align))
    return (_cuts(height, size, align, offset[0] // align * align),
            _cuts(width, size, align, offset[1] // align * align))


def tile_grid(height: int, width: int, size: int, halo: int, align: int,
              offset: tuple[int, int] = (0, 0)) -> list[Tile]:
    """Tiles covering a (height, width) image: cores partition it, crops add ``halo`` inside it.

    ``size``, ``halo`` and ``offset`` are rounded to multiples of ``align`` (size and halo up).
    """
    halo = round_up(halo, align)
    ys, xs = _grid_cuts(height, width, size, align, offset)
    return [Tile(y0, y1, x0, x1, max(0, y0 - halo), min(height, y1 + halo), max(0, x0 - halo), min(width, x1 + halo))
            for y0, y1 in zip(ys, ys[1:]) for x0, x1 in zip(xs, xs[1:])]


def positions(layer: str, height: int, width: int) -> int:
    """Feature positions nH·nW of a layer over a (height, width) image (what Grams are normalized by)."""
    factor = layer_factor(layer)
    return (height // factor) * (width // factor)


def untiled_bytes(height: int, width: int, layers: Iterable[str]) -> int:
    """Bytes one untiled evaluation of a (1, 3, height, width) image needs: every VGG module's
    fp32 output up to the deepest layer (kept for the backward pass) plus the optimizer's own
    image-sized tensors (L-BFGS history apart).

    Calibrated, not only counted: a default fp32 run at 1024×768 peaked at 2.45 GB RSS on the
    project's CPU (``benchmarks/speed.py --memory 1024``), 1.73 GB above the 0.72 GB of the
    interpreter, torch and the extractor; these outputs are 1.64 GB there, the tensors 0.08 GB.
    """
    depth = max(VGG16_LAYERS.index(n) for n in layers)
    floats = sum(c * positions(n, height, width) for n, c in zip(VGG16_LAYERS[:depth + 1], VGG16_CHANNELS))
    return 4 * (floats + 8 * 3 * height * width)


#: Where Linux mounts the cgroup hierarchies, and where it says which group this process is in.
CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def _limit_up_from(group: Path, mount: Path, name: str) -> int | None:
    """The smallest numeric ``name`` file from ``group`` up to ``mount`` (a parent's limit binds its
    children): "max" (v2) or v1's unlimited (2⁶³ less a page) count as none."""
    limits = []
    for folder in [group, *group.parents]:
        try:
            text = (folder / name).read_text().strip()
        except OSError:
            text = ""
        if text.isdigit() and int(text) < 2**62:
            limits.append(int(text))
        if folder == mount:
            break
    return min(limits, default=None)


def cgroup_memory_limit(root: Path | None = None, self_cgroup: Path | None = None) -> int | None:
    """Bytes this process's cgroup (a container's, a Kubernetes pod's, a systemd unit's) may use, or
    None where none is set or readable (not Linux). v2: ``memory.max`` in the process's group
    (under ``root``, or ``root/unified`` in the hybrid layout); v1: ``memory.limit_in_bytes`` under
    ``root/memory``. Inside a cgroup namespace the group is "/" and the mount is the group itself."""
    root = CGROUP_ROOT if root is None else root
    try:
        lines = (SELF_CGROUP if self_cgroup is None else self_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, group = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2, unified
            mount, name = (root if (root / "cgroup.controllers").exists() else root / "unified"), "memory.max"
        elif "memory" in controllers.split(","):
            mount, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        folder = mount / group.strip().lstrip("/")
        limit = _limit_up_from(folder if folder.is_dir() else mount, mount, name)
        if limit is not None:
            limits.append(limit)
    return min(limits, default=None)


def memory_budget(params: StyleParams, device: torch.device) -> int:
    """Bytes one evaluation may use: ``max_memory_gb``, or a share of the device's total memory
    (the total, not what is free now, so the choice is the same on every run of one machine):
    80% of a GPU, half of this host's RAM on CPU, or of the container's memory limit where that is
    smaller (a pod's 4 GiB on a 256 GB node: planning by the node's RAM ran a print-size pair
    untiled and the kernel killed the worker mid-pair). Per pair: a device step of several pairs is
    sized by their measured memory (``tasks.steps``), not by this."""
    if params.max_memory_gb is not None:
        return int(params.max_memory_gb * 2**30)
    if device.type == "cuda":
        return int(0.8 * torch.cuda.get_device_properties(device).total_memory)
    if device.type == "mps":
        return int(0.8 * torch.mps.recommended_max_memory())
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(0.5 * min(host, cgroup_memory_limit() or host))


def tiling_for(params: StyleParams, height: int, width: int, device: torch.device) -> Tiling | None:
    """The tiling of a (height, width) evaluation, or None to run it whole.

    ``tile_size`` N: tiles of N px when the image is larger than that. ``auto``: tiles only when
    ``untiled_bytes`` and an untiled run's L-BFGS history (none for Adam) exceed ``memory_budget``,
    then the largest multiple of the alignment whose
    tile (with its halo) needs at most a quarter of the budget (the rest holds the image-sized
    tensors, the content features and the L-BFGS history). ``off``: never.
    """
    layers = [*params.content_layers, *params.style_layers]
    align = max(layer_factor(n) for n in layers)
    halo = used_halo(HALO if params.tile_halo is None else params.tile_halo, layers)
    exact = exact_halo(layers)
    if params.tile_size == "off":
        return None
    if params.tile_size != "auto":
        size = round_up(params.tile_size, align)  # what the grid uses, recorded as such
        return Tiling(size, halo, align, exact) if max(height, width) > size else None
    budget = memory_budget(params, device)
    # L-BFGS pairs of an untiled run, fp32; Adam keeps none (its moments are in untiled_bytes)
    history = 8 * HISTORY * 3 * height * width if params.optimizer == "lbfgs" else 0
    if untiled_bytes(height, width, layers) + history <= budget:
        return None
    # Below a core of twice the halo a tile is mostly halo (work grows as ((s + 2h)/s)^2): the
    # smallest tile, even where its pass exceeds a quarter of a tiny budget.
    size = max(align, round_up(2 * halo, align))
    while size < max(height, width) and untiled_bytes(size + align + 2 * halo, size + align + 2 * halo, layers) <= budget / 4:
        size += align
    return Tiling(size, halo, align, exact)


def tiled_features(features: Callable[[Tensor], dict[str, Tensor]], x: Tensor,
                   tiles: list[Tile]) -> Iterator[tuple[Tile, dict[str, Tensor]]]:
    """Each tile's core features, ``{layer: (B, nC, h, w)}``: ``features`` (a VGG pass) per crop.

    Under ``torch.no_grad`` each tile's activations are freed before the next; with gradients the
    caller backpropagates one tile before asking for the next. Callers drop their reference to a
    tile's features (``del``) before the next, or two tiles' maps are alive at once.
    """
    height, width = x.shape[-2:]
    for tile in tiles:
        cores = {n: tile.core(f, layer_factor(n), height, width) for n, f in features(tile.crop(x)).items()}
        yield tile, cores
        del cores  # before the next tile's pass: its maps would otherwise live through it


def tiled_grams(features: Callable[[Tensor], dict[str, Tensor]], x: Tensor, tiles: list[Tile]) -> dict[str, Tensor]:
    """Position-normalized fp32 Grams of a whole (B, C, H, W) image from its tiles, no gradient:
    Ĝ_l = Σ_t F_t·F_tᵀ / (nH·nW), F_t the tile's core features (B, nC, nH, nW) -> (B, nC, nC)."""
    sums: dict[str, Tensor] = {}
    height, width = x.shape[-2:]
    with torch.no_grad():
        for _, feats in tiled_features(features, x, tiles):
            for n, f in feats.items():
                g = gram_matrix(f.float())
                sums[n] = sums[n] + g if n in sums else g
            feats = f = None  # before the next tile (see tiled_features)
    return {n: g / positions(n, height, width) for n, g in sums.items()}


def tiled_maps(features: Callable[[Tensor], dict[str, Tensor]], x: Tensor, tiles: list[Tile]) -> dict[str, Tensor]:
    """The whole image's fp32 feature maps ``{layer: (B, nC, ⌊H/f⌋, ⌊W/f⌋)}`` assembled from the
    tiles' cores, no gradient (the content targets of a tiled run)."""
    out: dict[str, Tensor] = {}
    height, width = x.shape[-2:]
    with torch.no_grad():
        for tile, feats in tiled_features(features, x, tiles):
            for n, f in feats.items():
                factor = layer_factor(n)
                if n not in out:
                    out[n] = f.new_zeros(f.shape[0], f.shape[1], height // factor, width // factor, dtype=torch.float32)
                r, c = tile.origin(factor)
                out[n][..., r:r + f.shape[-2], c:c + f.shape[-1]] = f.float()
            feats = f = None  # before the next tile (see tiled_features)
    return out


def history_for(budget: int, numel: int, wanted: int) -> int:
    """L-BFGS pairs a tiled run keeps: ``wanted``, fewer when 2·m image-sized fp32 vectors would
    take more than a quarter of the memory budget (at 4096×2724 px one pair is 268 MB), at least 3.

    Differs from the untiled run (HISTORY pairs) because at print size the history, not VGG,
    would dominate memory; fewer pairs cost some convergence speed, not the objective.
    """
    return max(3, min(wanted, budget // 4 // (8 * numel)))


def seam_ratio(image: Tensor, size: int, align: int, offset: tuple[int, int] = (0, 0)) -> float:
    """How much a grid's tile borders stand out in a (B, C, H, W) image: the mean |difference| of
    neighbouring pixels across the borders over the mean elsewhere (1.0: no seam; also with no
    border). ``size`` and ``offset`` are rounded as ``tile_grid`` rounds them: its borders."""
    height, width = image.shape[-2:]
    ys, xs = _grid_cuts(height, width, size, align, offset)
    dy = (image[..., 1:, :] - image[..., :-1, :]).abs()  # dy[..., r, :] crosses from row r to r + 1
    dx = (image[..., :, 1:] - image[..., :, :-1]).abs()
    rows = torch.zeros(height - 1, dtype=torch.bool)
    cols = torch.zeros(width - 1, dtype=torch.bool)
    rows[[c - 1 for c in ys[1:-1]]] = True
    cols[[c - 1 for c in xs[1:-1]]] = True
    if not (rows.any() or cols.any()):
        return 1.0
    across = torch.cat([dy[..., rows, :].flatten(), dx[..., cols].flatten()])
    along = torch.cat([dy[..., ~rows, :].flatten(), dx[..., ~cols].flatten()])
    return float(across.mean() / along.mean())
