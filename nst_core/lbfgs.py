"""L-BFGS for B independent problems in one tensor, with every scalar kept on the device.

The iteration is torch.optim.LBFGS's without a line search (``line_search_fn=None``,
``tolerance_grad=0``, ``tolerance_change=0``), applied to each problem b of a (B, ...) tensor
separately: its own (s, y) history in a ring of ``history`` slots (one ring position for all
problems; a pair that fails the test leaves its slot empty, see BatchedLBFGS), its own curvature test
``yᵀs > 1e-10``, its own H₀ = yᵀs / yᵀy, its own first step t = min(1, 1/‖g‖₁)·lr, and its own
stop when the direction stops descending (gᵀd > 0). The two-loop recursion runs on all problems
at once with per-problem dot products; nothing reads a value back to the host, so a GPU is
never stalled by the optimizer (torch's LBFGS makes ~40 host reads per step at history 20).

Problems that are ``frozen`` (stopped, failed) keep their x; they stay frozen for the rest of
a scale, so the empty slots they leave in the ring never steer anything.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: L-BFGS pairs of (s, y) kept. At 256 px and 150 evaluations 20 reached the same loss as 50
#: (1.7858 vs 1.7861 from noise), and its two-loop step cost 16 ms per evaluation at 512x384 on
#: 2 CPU cores against 35 ms (50) and 48 ms (torch's default 100).
HISTORY = 20

__all__ = ["BatchedLBFGS", "HISTORY"]

#: torch's LBFGS skips a curvature pair with yᵀs at or below this.
_CURVATURE_EPS = 1e-10


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-problem dot product. (B, N), (B, N) -> (B,).

    A row sum, not a batched GEMV: a GEMV's kernel, and so its rounding, changes with B even for
    short rows (test_many). Past ~32k elements a lone row is also summed by ATen's multi-threaded
    reduction and rows of a batch one by one, so there a pair steps the same in a batch as alone
    only up to rounding (~1e-7), as with oneDNN's batched convolutions."""
    return (a * b).sum(1)


class BatchedLBFGS:
    """``step(x, g, frozen)`` moves x (B, ...) in place; call it after each evaluation but the last.

    ``frozen`` (B,) bool: problems that must not move (their x and direction are kept).
    ``descending`` (B,) bool on the device: False once a problem's direction went uphill, where
    torch's LBFGS would have ended its step() (callers freeze such problems).

    Differs from torch's LBFGS in one place: every problem writes slot ``head`` of one shared
    ring (a host int, so the two-loop reads views of the history, not per-problem gathers: the
    two-loop recursion alone went 13 ms -> 2.6 ms at 256x192 px, history 20, 2 CPU cores, in a
    one-off micro-benchmark). A problem whose pair fails
    the curvature test (or that is frozen) leaves that slot empty (ρ = 0): for the next
    ``history`` steps it steers by history − 1 pairs where torch would keep its oldest pair, and
    a run of ``history`` skips leaves it none (the step −H₀·g). Until a pair is skipped the
    trajectory is torch's.
    """

    def __init__(self, x: Tensor, lr: float, history: int = HISTORY):
        b, n = x.shape[0], x[0].numel()
        self.lr, self.m = lr, history
        self.s = x.new_zeros(history, b, n)
        self.y = x.new_zeros(history, b, n)
        self.rho = x.new_zeros(history, b)  # 0: an empty slot, which contributes nothing
        self.head = 0  # next slot to write
        self.filled = 0  # slots written so far, at most history
        self.h_diag = x.new_ones(b)
        self.d: Tensor | None = None  # last direction (B, N)
        self.t: Tensor | None = None  # last step length (B,)
        self.prev_g: Tensor | None = None
        self.descending = torch.ones(b, dtype=torch.bool, device=x.device)

    def _remember(self, g: Tensor, frozen: Tensor) -> None:
        """Write (s, y) = (t·d, g − g_prev) to the next slot; ρ = 1/yᵀs where the curvature test passes."""
        y = torch.sub(g, self.prev_g, out=self.y[self.head])
        s = torch.mul(self.d, self.t[:, None], out=self.s[self.head])
        ys = _dot(y, s)
        keep = (ys > _CURVATURE_EPS) & ~frozen
        safe = torch.where(keep, ys, torch.ones_like(ys))
        self.rho[self.head] = torch.where(keep, 1.0 / safe, torch.zeros_like(ys))
        self.h_diag = torch.where(keep, ys / torch.where(keep, _dot(y, y), torch.ones_like(ys)), self.h_diag)
        self.head = (self.head + 1) % self.m
        self.filled = min(self.filled + 1, self.m)

    def _direction(self, g: Tensor) -> Tensor:
        """The two-loop recursion: d = −H·g with each problem's own history, newest pair first."""
        q = -g
        alphas = []
        for age in range(self.filled):  # newest first
            slot = (self.head - 1 - age) % self.m
            alpha = _dot(self.s[slot], q) * self.rho[slot]
            q.addcmul_(self.y[slot], alpha[:, None], value=-1)
            alphas.append((slot, alpha))
        r = q.mul_(self.h_diag[:, None])
        for slot, alpha in reversed(alphas):  # oldest first
            beta = _dot(self.y[slot], r) * self.rho[slot]
            r.addcmul_(self.s[slot], (alpha - beta)[:, None])
        return r

    @torch.no_grad()
    def step(self, x: Tensor, g: Tensor, frozen: Tensor) -> None:
        g = g.reshape(g.shape[0], -1)
        if self.d is None:  # the first iteration: steepest descent, a step scaled by the gradient
            d = -g
            t = (1.0 / g.abs().sum(1)).clamp_max(1.0) * self.lr
        else:
            self._remember(g, frozen)
            d = self._direction(g)
            t = torch.full_like(self.t, self.lr)
        # torch ends the step when the direction does not descend (gᵀd > −tolerance_change = 0)
        self.descending &= _dot(g, d) <= 0
        move = ~frozen & self.descending
        d = torch.where(move[:, None], d, torch.zeros_like(d))
        self.d = d if self.d is None else torch.where(frozen[:, None], self.d, d)
        self.t = t if self.t is None else torch.where(frozen, self.t, t)
        self.prev_g = g.clone() if self.prev_g is None else torch.where(frozen[:, None], self.prev_g, g)
        x.add_((d * t[:, None]).view_as(x))
