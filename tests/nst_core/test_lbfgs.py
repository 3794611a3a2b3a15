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


def test_no_host_reads_in_a_step(monkeypatch):
    # A GPU run stalls at every read of a device value; the step must make none.
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    opt = BatchedLBFGS(x, 1.0, 4)
    frozen = torch.zeros(2, dtype=torch.bool)
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k: reads.append(_name) or _real(self, *a, **k))
    for _ in range(6):
        x.grad = None
        (x ** 2).flatten(1).sum(1).sum().backward()
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
    kept_s, kept_y, kept_rho, h = opt.s[1].clone(), opt.y[1].clone(), opt.rho[1].clone(), opt.h_diag.clone()
    before = x.clone()
    opt.step(x, g, frozen)
    assert opt.rho[0, 0] == 0
    alpha = (kept_s * -g).sum(1) * kept_rho  # the two-loop over the one kept pair
    r = (-g - alpha[:, None] * kept_y) * h[:, None]
    r = r + kept_s * (alpha - (kept_y * r).sum(1) * kept_rho)[:, None]
    assert torch.allclose(x, before + r, rtol=1e-12, atol=1e-15)
