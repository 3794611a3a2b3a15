"""The batched L-BFGS is torch's L-BFGS (no line search) run on each problem separately."""

import pytest
import torch

from nst_core.lbfgs import BatchedLBFGS


def _rosenbrock(x):  # (B, 2, 3) -> (B,): independent, non-quadratic, curvature pairs that vary
    a, b = x[:, 0], x[:, 1]
    return ((1 - a) ** 2 + 5 * (b - a ** 2) ** 2).flatten(1).sum(1)


def _torch_trajectory(x0, evaluations, lr, history):
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=lr, max_iter=evaluations, max_eval=evaluations, tolerance_grad=0.0,
                            tolerance_change=0.0, history_size=history)
    seen = []

    def closure():
        opt.zero_grad()
        loss = _rosenbrock(x).sum()
        loss.backward()
        seen.append(loss.item())
        return loss

    opt.step(closure)
    return seen


def _ours(x0, evaluations, lr, history):
    x = x0.clone().requires_grad_(True)
    opt = BatchedLBFGS(x, lr, history)
    frozen = torch.zeros(x.shape[0], dtype=torch.bool)
    seen = []
    for e in range(evaluations):
        x.grad = None
        losses = _rosenbrock(x)
        losses.sum().backward()
        seen.append(losses.detach().clone())
        if e < evaluations - 1:
            opt.step(x.data, x.grad, frozen | ~opt.descending)
    return torch.stack(seen)


@pytest.mark.parametrize("history", [3, 20])
def test_each_problem_follows_torchs_lbfgs_exactly(history):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 3, generator=gen, dtype=torch.float64) * 2 - 1
    ours = _ours(x0, 25, 1.0, history)
    for b in range(3):  # each problem alone through torch's optimizer
        theirs = _torch_trajectory(x0[b:b + 1], 25, 1.0, history)
        assert ours[: len(theirs), b].tolist() == pytest.approx(theirs, rel=1e-9, abs=1e-12)


def test_a_frozen_problem_does_not_move_and_the_others_do_not_notice():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 2, 3, generator=gen, dtype=torch.float64)
    x = x0.clone().requires_grad_(True)
    opt = BatchedLBFGS(x, 1.0, 5)
    frozen = torch.tensor([True, False])
    for _ in range(10):
        x.grad = None
        _rosenbrock(x).sum().backward()
        opt.step(x.data, x.grad, frozen)
    assert torch.equal(x.detach()[0], x0[0])
    alone = _ours(x0[1:], 11, 1.0, 5)
    x.grad = None
    assert _rosenbrock(x.detach())[1].item() == pytest.approx(alone[-1, 0].item(), rel=1e-9)


def test_a_restarted_problem_steps_as_a_fresh_optimizer_would_and_the_others_do_not_notice():
    """restart(): a problem's history is forgotten, its next step is a first step (steepest descent,
    scaled by its gradient) and the pair of its last step, taken elsewhere, is never kept."""
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(2, 2, 3, generator=gen, dtype=torch.float64)
    elsewhere = torch.rand(2, 2, 3, generator=gen, dtype=torch.float64)

    def run(opt, x, steps):
        for _ in range(steps):
            x.grad = None
            _rosenbrock(x).sum().backward()
            opt.step(x.data, x.grad, torch.zeros(x.shape[0], dtype=torch.bool))

    x = elsewhere.clone().requires_grad_(True)
    opt = BatchedLBFGS(x, 1.0, 5)
    run(opt, x, 7)  # a history from another trajectory
    kept = x.detach()[1].clone()
    x.data[0] = x0[0]  # problem 0 moved back (to its best, in stylize) and restarted
    opt.restart(torch.tensor([True, False]))
    run(opt, x, 6)
    fresh = x0.clone().requires_grad_(True)
    run(BatchedLBFGS(fresh, 1.0, 5), fresh, 6)
    assert torch.allclose(x.detach()[0], fresh.detach()[0], rtol=1e-12, atol=1e-14)
    # problem 1 went on with its own history, as if nothing happened
    y = elsewhere[1:].clone().requires_grad_(True)
    other = BatchedLBFGS(y, 1.0, 5)
    run(other, y, 7)
    assert torch.allclose(y.detach()[0], kept, rtol=1e-12, atol=1e-14)
    run(other, y, 6)
    assert torch.allclose(x.detach()[1], y.detach()[0], rtol=1e-12, atol=1e-14)


def test_no_host_reads_in_a_step(monkeypatch):
    # A GPU run stalls at every read of a device value; the step must make none.
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    opt = BatchedLBFGS(x, 1.0, 4)
    frozen = torch.zeros(2, dtype=torch.bool)
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k: reads.append(_name) or _real(self, *a, **k))
    for i in range(6):
        x.grad = None
        (x ** 2).flatten(1).sum(1).sum().backward()
        if i == 3:
            opt.restart(torch.tensor([True, False]))
        opt.step(x.data, x.grad, frozen)
    assert reads == []


def _mixed(x):  # problem 0 linear (yᵀs = 0: every curvature pair fails), problem 1 Rosenbrock
    return torch.stack([x[0].sum(), _rosenbrock(x[1:])[0]])


def test_a_skipped_curvature_pair_changes_nothing_for_the_other_problems():
    # The ring's slot is shared: problem 0 skips every pair while problem 1 keeps every one.
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(2, 2, 3, generator=gen, dtype=torch.float64)
    x = x0.clone().requires_grad_(True)
    opt = BatchedLBFGS(x, 0.1, 3)
    frozen = torch.zeros(2, dtype=torch.bool)
    for _ in range(12):
        x.grad = None
        _mixed(x).sum().backward()
        opt.step(x.data, x.grad, frozen)
    assert opt.rho[:, 0].eq(0).all() and opt.rho[:, 1].gt(0).all()
    alone = BatchedLBFGS(x0[1:].clone(), 0.1, 3)
    x1 = x0[1:].clone().requires_grad_(True)
    for _ in range(12):
        x1.grad = None
        _rosenbrock(x1).sum().backward()
        alone.step(x1.data, x1.grad, frozen[1:])
    assert torch.allclose(x.detach()[1], x1.detach()[0], rtol=1e-12, atol=0)
    # Linear with no curvature pair: every step is steepest descent at lr (torch's too).
    assert torch.allclose(x.detach()[0], x0[0] - 0.1 * min(1.0, 1 / 6) - 11 * 0.1, rtol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 1e-4, 1e-8])
def test_the_optimization_does_not_depend_on_the_losss_scale(scale):
    """k·f has f's minimizer. torch's absolute test (yᵀs > 1e-10) refused every pair of a small k:
    the first step is lr·g (its ‖g‖₁ < 1), so yᵀs ∝ k², and every later step stayed lr·g: no
    progress (stylize: α and β scaled down together gave back the content)."""
    a = torch.tensor([[1.0, 3.0, 10.0, 30.0]], dtype=torch.float64)  # an ill-conditioned quadratic
    x = torch.zeros(1, 4, dtype=torch.float64)
    opt = BatchedLBFGS(x, 1.0, 5)
    frozen = torch.zeros(1, dtype=torch.bool)
    for _ in range(30):
        opt.step(x, scale * a * (x - 1), frozen)
    assert torch.allclose(x, torch.ones_like(x), atol=1e-6), x


def test_a_pair_that_fails_the_curvature_test_empties_the_slot_it_overwrites():
    # History 2 on a quadratic (every pair passes), then a gradient with yᵀs < 0: its slot held
    # the oldest kept pair and must now read as empty, so the step uses the one pair left.
    a = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64)
    x = torch.zeros(1, 3, dtype=torch.float64)
    opt = BatchedLBFGS(x, 1.0, 2)
    frozen = torch.zeros(1, dtype=torch.bool)
    for _ in range(3):
        opt.step(x, a * (x - 1), frozen)
    assert opt.rho[:, 0].gt(0).all() and opt.head == 0
    s_last = opt.d * opt.t[:, None]
    g = opt.prev_g - s_last  # y = -s: yᵀs < 0
    kept_s, kept_y, kept_rho, h = opt.s[:, 1].clone(), opt.y[:, 1].clone(), opt.rho[1].clone(), opt.h_diag.clone()
    before = x.clone()
    opt.step(x, g, frozen)
    assert opt.rho[0, 0] == 0
    alpha = (kept_s * -g).sum(1) * kept_rho  # the two-loop over the one kept pair
    r = (-g - alpha[:, None] * kept_y) * h[:, None]
    r = r + kept_s * (alpha - (kept_y * r).sum(1) * kept_rho)[:, None]
    assert torch.allclose(x, before + r, rtol=1e-12, atol=1e-15)


def _two_loop(g, pairs, gamma):
    """torch's two-loop recursion, one problem: d = −H·g from [(s, y), ...] oldest first."""
    q, alphas = -g.clone(), []
    for s, y in reversed(pairs):
        alpha = (s @ q) / (y @ s)
        q -= alpha * y
        alphas.append(alpha)
    r = q * gamma
    for (s, y), alpha in zip(pairs, reversed(alphas)):
        r += s * (alpha - (y @ r) / (y @ s))
    return r


@pytest.mark.parametrize("oldest", [0, 3])
def test_the_compact_direction_is_the_two_loop_recursions_without_the_left_out_pairs(oldest):
    from nst_core.lbfgs import compact_direction

    gen = torch.Generator().manual_seed(3)
    b, k, n = 3, 5, 7
    s = torch.randn(b, k, n, generator=gen, dtype=torch.float64)
    y = s + 0.3 * torch.randn(b, k, n, generator=gen, dtype=torch.float64)  # yᵀs > 0
    g = torch.randn(b, n, generator=gen, dtype=torch.float64)
    valid = torch.rand(b, k, generator=gen) > 0.3
    valid[2] = False  # no pair left: the step is −γ·g
    gamma = torch.rand(b, generator=gen, dtype=torch.float64) + 0.5
    d = compact_direction(g, s, y, s @ y.mT, y @ y.mT, s @ g[..., None], y @ g[..., None], valid, gamma, oldest)
    for p in range(b):
        ages = [(oldest + i) % k for i in range(k)]
        pairs = [(s[p, i], y[p, i]) for i in ages if valid[p, i]]
        assert torch.allclose(d[p], _two_loop(g[p], pairs, gamma[p]), rtol=1e-10, atol=1e-12)
    assert torch.allclose(d[2], -gamma[2] * g[2], rtol=0, atol=0)


def _operations_per_step(history):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    opt = BatchedLBFGS(x, 0.5, history)
    frozen = torch.zeros(2, dtype=torch.bool)
    for _ in range(history + 2):  # past a full ring, so its pairs wrap
        opt.step(x, 2 * x - 1, frozen)
    with Count():
        opt.step(x, 2 * x - 1, frozen)
    return Count.calls


def test_a_step_takes_as_many_device_operations_at_history_20_as_at_4():
    # Each operation is a kernel launch on a GPU, which a small image waits on: the two-loop
    # recursion took 9 per pair of the history (old: 100 more at history 20 than at 4).
    assert _operations_per_step(20) == _operations_per_step(4)


@pytest.mark.parametrize("stack_bytes, images", [(2**20, 3), (0, 1)])
def test_a_step_holds_no_temporary_the_size_of_the_history(monkeypatch, stack_bytes, images):
    # At print size one slot of the history is 134 MB: a product over all slots at once (a row
    # sum of S·g) would add half the history's memory. A small image's products stack their three
    # vectors (one launch, a temporary of three images); a large one's take one vector at a time.
    from torch.utils._python_dispatch import TorchDispatchMode

    from nst_core import lbfgs

    monkeypatch.setattr(lbfgs, "STACK_BYTES", stack_bytes)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    opt = BatchedLBFGS(x, 0.5, 5)
    frozen = torch.zeros(2, dtype=torch.bool)
    for _ in range(8):
        opt.step(x, 2 * x - 1 + 0.1 * x ** 3, frozen)
    history = {opt.s.untyped_storage().data_ptr(), opt.y.untyped_storage().data_ptr()}
    largest = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            largest.extend(t.numel() for t in (out if isinstance(out, (tuple, list)) else [out])
                           if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in history)
            return out

    with Sizes():
        opt.step(x, 2 * x - 1 + 0.1 * x ** 3, frozen)
    assert max(largest) == images * x.numel()  # (B, N) per image


def test_a_left_out_pair_whose_products_overflowed_stays_out():
    # An empty slot's products are selected away, not multiplied by 0: inf·0 is NaN, and one
    # NaN in R or YᵀY made the whole direction NaN (the problem then ended its scale).
    from nst_core.lbfgs import compact_direction

    gen = torch.Generator().manual_seed(5)
    b, k, n = 1, 4, 6
    s = torch.randn(b, k, n, generator=gen, dtype=torch.float64)
    y = s + 0.3 * torch.randn(b, k, n, generator=gen, dtype=torch.float64)
    g = torch.randn(b, n, generator=gen, dtype=torch.float64)
    valid = torch.tensor([[True, False, True, True]])
    gamma = torch.ones(b, dtype=torch.float64)
    sy, yy = s @ y.mT, y @ y.mT
    sy[0, 1, :], sy[0, :, 1], yy[0, 1, :], yy[0, :, 1] = float("inf"), float("nan"), float("inf"), float("inf")
    d = compact_direction(g, s, y, sy, yy, s @ g[..., None], y @ g[..., None], valid, gamma)
    pairs = [(s[0, i], y[0, i]) for i in (0, 2, 3)]
    assert torch.allclose(d[0], _two_loop(g[0], pairs, gamma[0]), rtol=1e-10, atol=1e-12)


def test_in_fp32_a_problem_steps_to_the_same_bits_in_a_batch_and_alone():
    # The batch flow runs several pairs per device step and promises each the pixels it would
    # get alone (with ATen's convolutions, test_many). The K-sized solves round differently for
    # a batch than for one problem (MKL's small kernels; old: all three problems differed after
    # 30 steps at history 20); in fp64 that stays far below fp32's last bit.
    def f(x):
        return (torch.sin(3 * x) + 0.1 * x ** 2 + 0.05 * x ** 4).flatten(1).sum(1)

    def run(x0):
        x = x0.clone().requires_grad_(True)
        opt = BatchedLBFGS(x, 0.5, 20)
        frozen = torch.zeros(x.shape[0], dtype=torch.bool)
        for _ in range(30):
            x.grad = None
            f(x).sum().backward()
            opt.step(x.data, x.grad, frozen)
        return x.detach()

    x0 = torch.randn(3, 4000, generator=torch.Generator().manual_seed(1)) * 2
    batched = run(x0)
    assert all(torch.equal(batched[p], run(x0[p:p + 1])[0]) for p in range(3))


def test_the_small_algebra_is_fp64_except_on_mps_which_has_none():
    from nst_core.lbfgs import small_dtype

    assert small_dtype(torch.device("cpu")) == small_dtype(torch.device("cuda")) == torch.float64
    assert small_dtype(torch.device("mps")) == torch.float32  # MPS refuses float64 tensors
