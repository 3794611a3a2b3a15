"""Tiled evaluation: tiles that partition the image, the untiled objective and gradient, no seams."""

import itertools

import pytest
import torch

from nst_core import StyleParams, stylize
from nst_core import tiling as tiling_module
from nst_core.imageio import to_tensor
from nst_core.losses import gram_matrix
from nst_core.objective import Objective
from nst_core.params import layer_factor
from nst_core.tiling import Tiling, exact_halo, seam_ratio, tile_grid, tiling_for, untiled_bytes
from nst_core.vgg import extractor_for

from helpers import engine_device, pattern

LAYERS = ["relu4_2", "relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]


def params(**kw) -> StyleParams:
    return StyleParams(**{"weights": "random", "device": engine_device(), "image_size": 96, "iterations": 8,
                          "precision": "fp32", **kw})


@pytest.mark.parametrize("height,width,size,offset", [(96, 80, 32, (0, 0)), (100, 77, 48, (16, 32)),
                                                       (64, 64, 64, (48, 0)), (130, 35, 32, (16, 16))])
def test_cores_partition_the_image_and_crops_stay_inside_on_aligned_edges(height, width, size, offset):
    tiles = tile_grid(height, width, size, 32, 16, offset)
    covered = torch.zeros(height, width, dtype=torch.int64)
    for t in tiles:
        covered[t.y0:t.y1, t.x0:t.x1] += 1
        assert 0 <= t.cy0 <= t.y0 < t.y1 <= t.cy1 <= height and 0 <= t.cx0 <= t.x0 < t.x1 <= t.cx1 <= width
        assert all(v % 16 == 0 for v in (t.y0, t.x0, t.cy0, t.cx0))
        assert t.y1 == height or t.y1 % 16 == 0
        assert t.y1 - t.y0 >= 16 and t.x1 - t.x0 >= 16  # no sliver whose deepest features are empty
    assert bool((covered == 1).all())


def test_the_exact_halo_is_the_deepest_reach_rounded_to_the_pools():
    assert exact_halo(["relu5_1"]) == 64  # pixels 16i - 58 ... 16i + 73: 58 px, up to a multiple of 16
    assert exact_halo(["relu1_1", "relu2_1"]) == 4  # 2i - 4 ... 2i + 5: 4 px
    assert exact_halo(["relu1_1"]) == 1
    assert exact_halo(LAYERS) == 64


def _objective(p, content, style, tiling):
    extractor = extractor_for(p)
    with torch.no_grad():
        grams = [{n: gram_matrix(f, normalize=True) for n, f in extractor(style[i:i + 1], p.style_layers).items()}
                 for i in range(style.shape[0])]
    return Objective.build(extractor, p, content, grams, tiling)


@pytest.mark.parametrize("channels", [3, 1])  # RGB, and the one luminance channel of preserve_color="luminance"
def test_the_tiled_gradient_is_the_untiled_gradient(channels):
    """Two pairs in one tensor, the default layers plus smoothness, 4 tiles with the exact halo, a
    shifted grid: terms and gradient as the untiled pass computes them."""
    p = params(tv_weight=10.0)
    gen = torch.Generator().manual_seed(0)
    content = torch.rand(2, channels, 64, 48, generator=gen).to(p.device)
    style = torch.rand(2, 3, 32, 32, generator=gen).to(p.device)
    x0 = torch.rand(2, channels, 64, 48, generator=gen).to(p.device)
    g0 = _assert_tiled_equals_untiled(p, content, style, x0, Tiling(32, exact_halo(LAYERS), 16, exact_halo(LAYERS)))
    # the bite: a halo short of the receptive field does not give the untiled gradient here
    x = x0.clone().requires_grad_(True)
    _objective(p, content, style, Tiling(32, 16, 16, 64)).value_and_grad(x, None, evaluation=5)
    assert float((x.grad - g0).norm() / g0.norm()) > 1e-2


def _assert_tiled_equals_untiled(p, content, style, x0, tiling):
    """Terms within 1e-4 and gradient within 1e-3 of the untiled pass (evaluation 5's grid); returns
    the untiled gradient."""
    results = []
    for t in (None, tiling):
        x = x0.clone().requires_grad_(True)
        terms = _objective(p, content, style, t).value_and_grad(x, None, evaluation=5)
        results.append((terms, x.grad))
    (t0, g0), (t1, g1) = results
    assert torch.allclose(t1, t0, rtol=1e-4, atol=0)
    assert float((g1 - g0).norm() / g0.norm()) <= 1e-3
    return g0


def test_pool_layers_tile_exactly_too():
    """layer_factor counted the pools before a layer, not through it: pool1 stepped 1 px instead
    of 2, and a tiled style loss on pool layers was 250x the untiled one even at the exact halo."""
    p = params(content_layers=["pool2"], style_layers=["pool1", "relu2_1", "pool3"])
    layers = ["pool2", "pool1", "relu2_1", "pool3"]
    assert [layer_factor(n) for n in layers] == [4, 2, 2, 8]
    gen = torch.Generator().manual_seed(2)
    content, x0 = (torch.rand(1, 3, 64, 48, generator=gen).to(p.device) for _ in range(2))
    style = torch.rand(1, 3, 32, 32, generator=gen).to(p.device)
    _assert_tiled_equals_untiled(p, content, style, x0, Tiling(16, exact_halo(layers), 8, exact_halo(layers)))


def test_a_tiled_value_is_measured_with_the_exact_halo_whatever_the_evaluations_use():
    p = params()
    gen = torch.Generator().manual_seed(1)
    content, style, x = (torch.rand(1, 3, 64, 48, generator=gen).to(p.device) for _ in range(3))
    exact = _objective(p, content, style, None).measure(x)[0]
    tiled = _objective(p, content, style, Tiling(32, 0, 16, 64)).measure(x)[0]
    assert tiled == pytest.approx(exact, rel=1e-4)


def test_the_grid_shifts_between_evaluations_and_repeats_for_a_seed():
    t = Tiling(384, 32, 16, 80)
    offsets = [t.offset(7, e) for e in range(20)]
    assert len(set(offsets)) > 10 and all(0 <= o < 384 and o % 16 == 0 for o in itertools.chain(*offsets))
    assert offsets == [t.offset(7, e) for e in range(20)]


def test_an_axis_no_longer_than_a_tile_is_never_cut():
    """Old: the shifting grid cut both axes of a 512x520 image with 512 px tiles, 4 tiles in 286 of
    300 evaluations where 2 do: each cut adds the halo's passes (a 264 px image ran 2.3x its untiled
    time with 256 px tiles) and its approximation."""
    t = Tiling(512, 32, 16, 64)
    counts = {len(t.grid(512, 520, t.offset(3, e))) for e in range(50)}
    assert counts <= {1, 2} and 2 in counts, counts
    assert all(tile.y0 == 0 and tile.y1 == 512 for e in range(50) for tile in t.grid(512, 520, t.offset(3, e)))


def test_the_halo_is_never_wider_than_the_exact_one():
    """Old: shallow layers (exact at 12 px up to relu3_1) got the default 32 px halo: slower than
    exact, for nothing."""
    cpu = torch.device("cpu")
    shallow = params(tile_size=64, content_layers=["relu3_1"], style_layers=["relu1_1", "relu2_1", "relu3_1"])
    assert tiling_for(shallow, 300, 200, cpu) == Tiling(64, 12, 4, 12) and 12 < tiling_module.HALO
    assert tiling_for(params(tile_size=128, tile_halo=96), 300, 200, cpu).halo == 64  # relu5_1: exact at 64


def test_tiling_is_chosen_by_size_and_memory_budget():
    cpu = torch.device("cpu")
    assert tiling_for(params(tile_size="off", max_memory_gb=0.001), 4096, 4096, cpu) is None
    assert tiling_for(params(tile_size=128), 96, 80, cpu) is None  # fits one tile
    assert tiling_for(params(tile_size=128), 300, 200, cpu) == Tiling(128, tiling_module.HALO, 16, 64)
    assert tiling_for(params(tile_size="auto", max_memory_gb=64), 1024, 768, cpu) is None
    small = tiling_for(params(tile_size="auto", max_memory_gb=1), 4096, 4096, cpu)
    assert small is not None and small.size % 16 == 0
    side = small.size + 2 * small.halo
    assert untiled_bytes(side, side, LAYERS) <= 2**30 / 4 < untiled_bytes(4096, 4096, LAYERS)
    with pytest.raises(ValueError, match="at least 64"):
        params(tile_size=16)
    # a size off the 16 px grid is the size the grid uses, and recorded as such
    assert tiling_for(params(tile_size=100), 300, 200, cpu).size == 112
    # a budget too small for any tile: the smallest tile, a core of twice the halo, not 16 px cores
    assert tiling_for(params(max_memory_gb=0.001), 4096, 4096, cpu).size == 2 * tiling_module.HALO
    # the untiled run's L-BFGS history counts: 20 pairs of (s, y) at 1024x768 are 0.38 GB
    need = untiled_bytes(768, 1024, LAYERS)
    assert tiling_for(params(max_memory_gb=(need + 2**27) / 2**30), 768, 1024, cpu) is not None
    assert tiling_for(params(max_memory_gb=(need + 2**29) / 2**30), 768, 1024, cpu) is None
    # Adam keeps no history (its moments are among untiled_bytes' image-sized tensors): old code
    # counted L-BFGS's history for it too and tiled, ~1.4x slower, a run that fits whole
    assert tiling_for(params(max_memory_gb=(need + 2**27) / 2**30, optimizer="adam"), 768, 1024, cpu) is None


def test_whether_a_pair_is_tiled_does_not_depend_on_the_pairs_beside_it(images):
    """auto once counted the whole step against the budget: a pair tiled inside a step of two and
    untiled alone, so stylize_many was not the optimization of separate stylize calls."""
    from nst_core import stylize_many

    content, style = images
    p = params(iterations=2)
    alone = stylize(content, style, p)
    h, w = alone.image.size[1], alone.image.size[0]
    one = untiled_bytes(h, w, LAYERS) + 8 * 20 * 3 * h * w
    p = params(iterations=2, max_memory_gb=1.5 * one / 2**30)
    results = stylize_many([(content, style), (content, style)], p)
    assert [r.metadata["scales"][-1]["tiling"] for r in results] == [None, None]
    assert stylize(content, style, p).metadata["scales"][-1]["tiling"] is None


@pytest.mark.slow
def test_no_seam_where_the_tiles_met(images):
    """Noise start, 64 px tiles with no halo at all: with the grid shifting each evaluation the
    tile borders of any one grid stand out no more than in the untiled result; a fixed grid
    leaves them visible (the metric sees seams)."""
    base = {"image_size": 128, "iterations": 30, "init": "noise"}

    def seam(**kw):
        # no halo at all, which the params refuse (the gradient is far off): model_copy skips the check
        result = stylize(*images, params(**base).model_copy(update=kw))
        return seam_ratio(to_tensor(result.image, "cpu"), 64, 16)

    untiled = seam(tile_size="off")
    assert abs(seam(tile_size=64, tile_halo=0) - untiled) <= 0.1 * untiled
    fixed = pytest.MonkeyPatch()
    fixed.setattr(Tiling, "offset", lambda self, seed, evaluation: (0, 0))
    try:
        assert seam(tile_size=64, tile_halo=0) > 1.2 * untiled
    finally:
        fixed.undo()


def test_a_tiled_run_records_its_tiling_and_ends_near_the_untiled_loss(images):
    untiled = stylize(*images, params(iterations=12, tile_size="off"))
    tiled = stylize(*images, params(iterations=12, tile_size=64, tile_halo=64))
    assert tiled.metadata["scales"][-1]["tiling"] == {"tile_size": 64, "halo": 64}
    assert untiled.metadata["scales"][-1]["tiling"] is None
    # exact halo: the same optimization up to float summation order
    assert tiled.losses["final"]["total"] == pytest.approx(untiled.losses["final"]["total"], rel=1e-3)


def test_coarse_scales_run_whole_and_the_output_size_tiled(images):
    result = stylize(*images, params(image_size=128, iterations=6, scales=2, tile_size=96))
    assert [s["size"] for s in result.metadata["scales"]] == [[91, 68], [128, 96]]
    assert [s["tiling"] for s in result.metadata["scales"]] == [None, {"tile_size": 96, "halo": tiling_module.HALO}]


@pytest.mark.parametrize("colour", ["histogram", "luminance"])
def test_reduced_precision_colour_modes_and_a_blend_of_styles_run_tiled(images, colour):
    _, style = images
    # A 96x32 content: two exact tiles, where 96x72 took four (half the time where bf16 is emulated,
    # ~20x slower than fp32). Four evaluations move its written image's fp32 loss by 0.3-0.8%; at
    # 80x60 they moved it less than the 8-bit quantization (final 1.0002x initial).
    content = pattern((96, 32), "content")
    p = params(iterations=4, tile_size=64, precision="bf16", preserve_color=colour)
    tiling = tiling_for(p, 32, 96, torch.device("cpu"))
    assert len(tiling.grid(32, 96, exact=True)) >= 2  # the targets and reported losses run tiled too
    assert all(len(tiling.grid(32, 96, tiling.offset(p.seed, e))) >= 2 for e in range(8))
    result = stylize(content, [style, style.transpose(0)], p)
    assert result.metadata["scales"][-1]["tiling"] == {"tile_size": 64, "halo": tiling_module.HALO}
    assert result.metadata["precision"] == "bf16" and result.metadata["styles"] == 2
    totals = [h["total"] for h in result.history]
    assert min(totals) < totals[0] and result.losses["final"]["total"] <= result.losses["initial"]["total"]


def _cgroup_tree(root, self_cgroup, lines: str, limits: dict[str, str]):
    """A /sys/fs/cgroup-like tree under ``root`` and a /proc/self/cgroup-like file."""
    self_cgroup.write_text(lines)
    for rel, value in limits.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(value + "\n")


def test_a_containers_memory_limit_bounds_the_cpu_budget(tmp_path, monkeypatch):
    """Old: half of the host's RAM. A Kubernetes worker with a 4 GiB limit on a 256 GB node planned
    a 4096 px pair untiled (~24 GB) and was OOM-killed mid-pair: the run's pair lost, no report."""
    from nst_core.tiling import cgroup_memory_limit, memory_budget

    root, me = tmp_path / "cgroup", tmp_path / "self_cgroup"
    # cgroup v2 (Kubernetes, systemd): the limit sits on an ancestor of the process's own group
    _cgroup_tree(root, me, "0::/kubepods/pod1/nst\n", {
        "cgroup.controllers": "cpu memory", "kubepods/pod1/memory.max": str(4 * 2**30),
        "kubepods/pod1/nst/memory.max": "max", "kubepods/memory.max": "max"})
    assert cgroup_memory_limit(root, me) == 4 * 2**30
    # v1 (this machine's hybrid layout): the memory controller's own hierarchy; "unlimited" is a huge number
    v1, me1 = tmp_path / "v1", tmp_path / "self_v1"
    _cgroup_tree(v1, me1, "4:memory:/jobs/a\n0::/\n", {
        "memory/jobs/a/memory.limit_in_bytes": str(3 * 2**30),
        "memory/memory.limit_in_bytes": "9223372036854771712", "unified/cgroup.procs": ""})
    assert cgroup_memory_limit(v1, me1) == 3 * 2**30
    # inside a cgroup namespace the process's path is "/" and the mount is its own group
    ns, me_ns = tmp_path / "ns", tmp_path / "self_ns"
    _cgroup_tree(ns, me_ns, "0::/\n", {"cgroup.controllers": "memory", "memory.max": str(2**31)})
    assert cgroup_memory_limit(ns, me_ns) == 2**31
    # no limit, no cgroup files (not Linux): none
    _cgroup_tree(ns, me_ns, "0::/\n", {"memory.max": "max"})
    assert cgroup_memory_limit(ns, me_ns) is None
    assert cgroup_memory_limit(tmp_path / "absent", tmp_path / "absent_self") is None

    monkeypatch.setattr(tiling_module, "CGROUP_ROOT", root)
    monkeypatch.setattr(tiling_module, "SELF_CGROUP", me)
    cpu = torch.device("cpu")
    assert memory_budget(params(), cpu) == 2 * 2**30  # half the container's 4 GiB, not half the host
    assert memory_budget(params(max_memory_gb=8), cpu) == 8 * 2**30  # a budget given is the budget
    assert tiling_for(params(), 4096, 2724, cpu) is not None


def test_the_seam_metric_measures_the_grid_the_tiles_use():
    """Old: ``seam_ratio`` cut at a size and offset not rounded as ``tile_grid`` rounds them (70 px
    tiles at offset 5: borders 75 and 140 where the tiles meet at 80), and was NaN with no cut."""
    image = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    meet = sorted({t.y1 for t in tile_grid(160, 160, 70, 0, 16, (5, 5))} - {160})
    assert meet == [80]
    image[..., 80:, :] += 1  # a step where the tiles meet, both ways: a seam there
    image[..., :, 80:] += 1
    assert seam_ratio(image, 70, 16, (5, 5)) > 2
    assert seam_ratio(image[..., :64, :64], 70, 16) == 1.0  # one tile: no border, no seam
