"""L-BFGS for B independent problems in one tensor, with every scalar kept on the device.

The iteration is torch.optim.LBFGS's without a line search (``line_search_fn=None``,
``tolerance_grad=0``, ``tolerance_change=0``), applied to each problem b of a (B, ...) tensor
separately: its own (s, y) history in a ring of ``history`` slots (one ring position for all
problems; a pair that fails the test leaves its slot empty, see BatchedLBFGS), its own curvature test
``yᵀs > 1e-10`` (or a cosine of s and y over 1e-4: scale-free, see _CURVATURE_COS), its own H₀ = yᵀs / yᵀy, its own first step t = min(1, 1/‖g‖₁)·lr, and its own
stop when the direction stops descending (gᵀd > 0). The direction −H·g is computed for all
problems at once in compact form (``compact_direction``: the same H as torch's two-loop
recursion, in a fixed number of device operations, not nine per pair); nothing reads a value
back to the host, so a GPU is never stalled by the optimizer (torch's LBFGS makes ~40 host reads
per step at history 20).

Problems that are ``frozen`` (stopped, failed) keep their x; they stay frozen for the rest of
a scale, so the empty slots they leave in the ring never steer anything.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: L-BFGS pairs of (s, y) kept. At 256 px and 150 evaluations 20 reached the same loss as 50
#: (1.7858 vs 1.7861 from noise), and its step cost 16 ms per evaluation at 512x384 on 2 CPU
#: cores against 35 ms (50) and 48 ms (torch's default 100), measured with the two-loop recursion.
HISTORY = 20

__all__ = ["BatchedLBFGS", "HISTORY", "compact_direction", "small_dtype"]

#: torch's LBFGS skips a curvature pair with yᵀs at or below this.
_CURVATURE_EPS = 1e-10
#: ...and this one keeps a pair whose yᵀs > _CURVATURE_COS·‖s‖·‖y‖ too. Departs from torch (and so from
#: the paper's L-BFGS): its absolute test depends on the loss's scale. A small one (α and β scaled
#: down together, a state_dict's small activations) has a first step of lr·g, tiny, so yᵀs ∝ scale²
#: failed it every time, every step stayed lr·g, and the content came back as "stylized" (random
#: weights at 64 px: loss ratio 1.0000 at α = 1e-3, β = 1e-6 against 0.81 at the defaults). A
#: cosine is scale-free; where the absolute test keeps a pair this changes nothing (on the four
#: benchmark pairs at 128 px, 150 evaluations, it rejected only negative curvature: no pair differs).
#: 1e-4: above fp32's rounding of a dot product over a 512 px image's ~590k values (~√n·eps ≈ 5e-5),
#: far below the cosines of real pairs (0.08 and up on two photo pairs at 128 px, fp32).
_CURVATURE_COS = 1e-4


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-problem dot product. (B, N), (B, N) -> (B,).

    A row sum, not a batched GEMV: a GEMV's kernel, and so its rounding, changes with B even for
    short rows (test_many). Past ~32k elements a lone row is also summed by ATen's multi-threaded
    reduction and rows of a batch one by one, so there a pair steps the same in a batch as alone
    only up to rounding (~1e-7), as with oneDNN's batched convolutions."""
    return (a * b).sum(1)


#: Bytes of one problem's vector up to which ``_products`` stacks its vectors for one product (one
#: launch; the stack is a temporary of len(vs) images): ~1400x1000 px. A larger image, where
#: launches no longer count, takes one product per vector and no temporary (at 4096x2724 px one
#: vector is 134 MB). Decided by a problem's size, never the batch's: a pair rounds alike in a
#: batch and alone.
STACK_BYTES = 16 * 2**20


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """torch.bmm, on a CPU one problem at a time. (B, I, J), (B, J, L) -> (B, I, L).

    On a CPU a batched product rounds a problem differently from the same product alone (one
    problem's product is split over the threads, a batch's problems go one per thread: a batch of
    3 ended up to 5/255 off its pairs run alone, test_many), so there each problem gets its own
    product, B launches where bmm takes one. On CUDA, cuDNN's batched convolutions round
    differently anyway (README "On a GPU"), and launches are what counts: one bmm."""
    if a.is_cuda:
        return torch.bmm(a, b)
    if a.shape[0] == 1:
        return torch.mm(a[0], b[0])[None]
    return torch.stack([torch.mm(x, y) for x, y in zip(a, b)])


def _products(h: Tensor, *vs: Tensor) -> Tensor:
    """Each problem's pairs against the vectors ``vs``. (B, K, N) history, (B, N) each -> (B, K, len(vs)).

    Matrix products: the history is read once per product and nothing history-sized is held (a
    row sum over all K pairs at once, tried first, made a (B, K, N) temporary and took 129 ms per
    step against the two-loop's 10.9 ms at 512x384 px on 2 CPU cores, in one run of an earlier
    benchmarks/lbfgs.py on a busy machine)."""
    if vs[0].shape[-1] * vs[0].element_size() <= STACK_BYTES:
        return _mm(h, torch.stack(vs, 1).mT)  # the vectors as a column-major matrix: MKL's fast layout
    return torch.cat([_mm(h, v[:, :, None]) for v in vs], -1)


def small_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the K-sized algebra (see compact_direction): fp64, but fp32 on MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


def _roll(t: Tensor, shift: int, dims: tuple[int, ...]) -> Tensor:
    """``t`` rolled by ``shift`` along each of ``dims`` (no copy when the shift is 0)."""
    return torch.roll(t, (shift,) * len(dims), dims) if shift else t


def compact_direction(g: Tensor, s: Tensor, y: Tensor, sy: Tensor, yy: Tensor, sg: Tensor, yg: Tensor,
                      valid: Tensor, gamma: Tensor, oldest: int = 0) -> Tensor:
    """d = −H·g for L-BFGS's H in compact form (Byrd, Nocedal & Schnabel 1994, eq. 3.1).

    g (B, N); s, y (B, K, N): the pairs in ring order (pair ``oldest`` is the oldest, the next
    ones follow it and wrap around); sy (B, K, K) with sy[b, i, j] = s_iᵀy_j and yy (B, K, K) = YᵀY,
    in the same order; sg, yg (B, K, 1): Sᵀg, Yᵀg; valid (B, K) bool: pairs that count (the others
    are left out, as if never stored); gamma (B,): H₀ = γ·I. With the pairs in age order,
    R = triu(SᵀY), D = diag(SᵀY):

        H = γI + [S γY] · [[R⁻ᵀ(D + γYᵀY)R⁻¹, −R⁻ᵀ], [−R⁻¹, 0]] · [Sᵀ; γYᵀ]
        w = R⁻¹Sᵀg,  a = R⁻ᵀ((D + γYᵀY)w − γYᵀg),  −H·g = −γg − S·a + γY·w

    The same H as torch's two-loop recursion, in a fixed 38 device operations (one problem, a
    full ring; the step's update adds 21) where the two-loop takes 9 per pair (182 at history 20): on a GPU each is a kernel launch, and a small image's
    evaluation waits on launches, not on arithmetic (README "On a GPU"). It reads the history
    twice (S·a, Y·w); the products come with the step's update (``BatchedLBFGS``), which reads it
    twice more, where the two-loop read and wrote it ~4 times. Only the K-sized products are put
    in age order, never the history, and their algebra runs in fp64 (``small_dtype``): there a
    batch's and a lone problem's small solves, which round differently in fp32, agree to far
    below the fp32 the result is rounded to. A left-out pair's row and column of R are the
    identity's (selected, not multiplied by 0, so an overflowed product there stays out), so its
    w and a are 0."""
    def aged(t: Tensor, dims: tuple[int, ...]) -> Tensor:
        return _roll(t, -oldest, dims)

    small = small_dtype(g.device)
    v = aged(valid, (1,))  # (B, K)
    both = v[:, :, None] & v[:, None, :]
    sy = aged(sy.to(small), (1, 2))
    r = torch.where(both, torch.triu(sy), 0.0) + torch.diag_embed((~v).to(small))
    p = torch.where(v[..., None], aged(sg.to(small), (1,)), 0.0)
    q = torch.where(v[..., None], aged(yg.to(small), (1,)), 0.0)
    w = torch.linalg.solve_triangular(r, p, upper=True)
    gam = gamma.to(small)[:, None, None]
    d = torch.where(v, torch.diagonal(sy, dim1=1, dim2=2), 0.0)[..., None]
    z = d * w + gam * (torch.bmm(torch.where(both, aged(yy.to(small), (1, 2)), 0.0), w) - q)
    a = torch.linalg.solve_triangular(r.mT, z, upper=False)
    ring_w, ring_a = (_roll(t, oldest, (1,)).to(g.dtype) for t in (gam * w, a))
    return (_mm(y.mT, ring_w) - _mm(s.mT, ring_a))[..., 0] - gamma[:, None] * g


class BatchedLBFGS:
    """``step(x, g, frozen)`` moves x (B, ...) in place; call it after each evaluation but the last.

    ``frozen`` (B,) bool: problems that must not move (their x and direction are kept).
    ``descending`` (B,) bool on the device: False once a problem's direction went uphill, where
    torch's LBFGS would have ended its step() (callers freeze such problems).

    Differs from torch's LBFGS in three places. Its curvature test also keeps a pair whose cosine
    passes _CURVATURE_COS (torch's absolute test alone depends on the loss's scale). The direction is computed in compact form
    (``compact_direction``: the same H, in a fixed number of device operations where torch's
    two-loop recursion takes nine per pair); the products it needs (SᵀY, YᵀY) are kept and only
    the newest pair's row and column computed each step. Every problem writes slot ``head`` of
    one shared ring (a host int, so the history is read as views, not per-problem gathers). A
    problem whose pair fails the curvature test (or that is frozen) leaves that slot empty
    (ρ = 0): for the next ``history`` steps it steers by history − 1 pairs where torch would keep
    its oldest pair, and a run of ``history`` skips leaves it none (the step −H₀·g). Until a pair
    is skipped, or kept by its cosine alone, the trajectory is torch's, up to rounding. (``restart``, which torch's LBFGS has not,
    forgets a problem's history on request.)
    """

    def __init__(self, x: Tensor, lr: float, history: int = HISTORY):
        b, n = x.shape[0], x[0].numel()
        self.lr, self.m = lr, history
        self.s = x.new_zeros(b, history, n)  # slot k of problem b: s[b, k]
        self.y = x.new_zeros(b, history, n)
        # sy[b, i, j] = s_iᵀ y_j and yy[b, i, j] = y_iᵀ y_j, by slot; fp64: see compact_direction
        self.sy = x.new_zeros(b, history, history, dtype=small_dtype(x.device))
        self.yy = x.new_zeros(b, history, history, dtype=small_dtype(x.device))
        self.rho = x.new_zeros(history, b)  # 0: an empty slot, which contributes nothing
        self.head = 0  # next slot to write
        self.filled = 0  # slots written so far, at most history
        self.h_diag = x.new_ones(b)
        self.d: Tensor | None = None  # last direction (B, N)
        self.t: Tensor | None = None  # last step length (B,)
        self.prev_g: Tensor | None = None
        self.descending = torch.ones(b, dtype=torch.bool, device=x.device)
        # restarted problems, whose next step (frozen steps aside) is a first step; None when no
        # restart is pending (a host-side check: a run that never restarts takes none of its operations)
        self.fresh: Tensor | None = None
        self._fresh_steps = 0  # steps left that apply ``fresh``

    def _remember(self, g: Tensor, frozen: Tensor) -> tuple[Tensor, Tensor]:
        """Write (s, y) = (t·d, g − g_prev) to the next slot, its row and column of SᵀY and YᵀY;
        ρ = 1/yᵀs where the curvature test passes. Returns (Sᵀg, Yᵀg), (B, K, 1) each, taken in
        the same two reads of the history."""
        h = self.head
        y = torch.sub(g, self.prev_g, out=self.y[:, h])
        s = torch.mul(self.d, self.t[:, None], out=self.s[:, h])
        self.filled = min(self.filled + 1, self.m)
        k = self.filled  # slots 0..k-1 hold pairs (h among them)
        by_s = _products(self.s[:, :k], y, g)  # s_iᵀy_h, s_iᵀg
        by_y = _products(self.y[:, :k], y, s, g)  # y_iᵀy_h, y_iᵀs_h, y_iᵀg
        self.sy[:, h, :k] = by_y[..., 1]
        self.sy[:, :k, h] = by_s[..., 0]  # second: s_hᵀy_h is the curvature test's ys, as computed for it
        self.yy[:, :k, h] = self.yy[:, h, :k] = by_y[..., 0]
        ys, yty = by_s[:, h, 0], by_y[:, h, 0]
        # the norms apart: their product underflows fp32 at a tiny scale, and the test would keep noise
        keep = ((ys > _CURVATURE_EPS) | (ys > _CURVATURE_COS * _dot(s, s).sqrt() * yty.sqrt())) & ~frozen
        safe = torch.where(keep, ys, 1.0)  # a Python number: no launch on a GPU
        self.rho[h] = torch.where(keep, 1.0 / safe, 0.0)
        self.h_diag = torch.where(keep, ys / torch.where(keep, yty, 1.0), self.h_diag)
        self.head = (h + 1) % self.m
        return by_s[..., 1:], by_y[..., 2:]

    def _direction(self, g: Tensor, sg: Tensor, yg: Tensor) -> Tensor:
        """d = −H·g with each problem's own history (``compact_direction``); a full ring's oldest pair is at head."""
        k = self.filled
        return compact_direction(g, self.s[:, :k], self.y[:, :k], self.sy[:, :k, :k], self.yy[:, :k, :k], sg, yg,
                                 self.rho[:k].T != 0, self.h_diag, self.head if k == self.m else 0)

    def restart(self, which: Tensor) -> None:
        """Forget the history of the problems ``which`` (B,) bool, on the device (no host read):
        their next step is a first step, and the pair of their last step is never kept. Call it
        after moving their x (stylize: back to their best), then either pass step() their gradient
        there, or freeze them for that step and pass the next one the gradient at that x."""
        self.rho = torch.where(which[None, :], 0.0, self.rho)
        self.h_diag = torch.where(which, 1.0, self.h_diag)
        self.fresh = which if self.fresh is None else self.fresh | which
        self._fresh_steps = 2  # the caller may freeze them for one step (stylize: to take the gradient at best)

    @torch.no_grad()
    def step(self, x: Tensor, g: Tensor, frozen: Tensor) -> None:
        g = g.reshape(g.shape[0], -1)
        fresh = self.fresh
        if self.d is None:  # the first iteration: steepest descent, a step scaled by the gradient
            d = -g
            t = (1.0 / g.abs().sum(1)).clamp_max(1.0) * self.lr
        else:
            d = self._direction(g, *self._remember(g, frozen if fresh is None else frozen | fresh))
            t = torch.full_like(self.t, self.lr)
            if fresh is not None:  # a restarted problem steps as on its first iteration
                d = torch.where(fresh[:, None], -g, d)
                t = torch.where(fresh, (1.0 / g.abs().sum(1)).clamp_max(1.0) * self.lr, t)
        if fresh is not None:
            self._fresh_steps -= 1
            self.fresh = fresh & frozen if self._fresh_steps > 0 else None  # frozen: its first step is still to come
        # torch ends the step when the direction does not descend (gᵀd > −tolerance_change = 0), and
        # returns at once at a zero gradient (max|g| <= tolerance_grad = 0), where gᵀd = 0 would pass
        self.descending &= (_dot(g, d) <= 0) & (g.abs().amax(1) > 0)
        move = ~frozen & self.descending
        d = torch.where(move[:, None], d, 0.0)
        self.d = d if self.d is None else torch.where(frozen[:, None], self.d, d)
        self.t = t if self.t is None else torch.where(frozen, self.t, t)
        self.prev_g = g.clone() if self.prev_g is None else torch.where(frozen[:, None], self.prev_g, g)
        x.add_((d * t[:, None]).view_as(x))
