"""A stated budget during the variational training: the price of size as its multiplier.

Without a budget, ``lam`` is the user's trade of accuracy against size and stays fixed.  With
``--budget`` the trade is stated the other way -- this size, the best accuracy -- and a fixed
``lam`` prunes to whatever size it happens to imply: with ``lam`` 1 the pruned ResNet-20 came
out at 0.169 of the MACs for every MAC budget from 0.5 to 0.2, trained all along with most of
its units sampled off.

Here every theta step is the projected-SGD step of the budget-constrained problem::

    theta+ = clip(theta - lr P (g_CE + lam p), 0, 1)   with   cost(theta+) <= limit

where ``g_CE`` is the step's cross-entropy part of the gradient, ``P`` the step's
preconditioner (:meth:`GatedResNet.step_theta`) and ``p`` the **budget's own price** of every
gate (:meth:`BudgetTracker.price`): the slope of the budget's cost, over the dense cost, in the
gate's structures at the current expected widths -- marginal MACs for a MAC budget, marginal
milliseconds of the latency table for a latency budget.  (Multiplying the price of the run's
``--cost`` instead, MACs and parameters, a latency budget of 0.3 pushed ``lam`` to 68 at the end
of the ramp: units, cheap in latency, were priced for their MACs and wiped out before any
block, where the latency is, died.)  ``lam`` is the constraint's Lagrange multiplier for this
step: 0 when the unconstrained step already fits, else the least ``lam`` whose step fits, found
by bisection (``cost(theta+)`` does not increase with ``lam``).  So the gates' network follows
the limit step by step, with no controller lag to overshoot it (an integral controller on
``lam`` tried first pushed the price to 5x the binding one while theta lagged, and removed
blocks a 0.3 budget did not need).  The death rule of the ``batched`` estimator weighs a gate's
evidence against the same price, ``lam p``.

``cost`` is the budget's own (the terms the selection solves with, :class:`nn.budget.BudgetCost`:
MACs, parameters or the latency table) at the gates' expected widths -- each family's sum of
theta over its live gates, snapped to the nearest width the selection may choose, and a block
removed once its gate is below one half -- so the training heads for what the selection will
cut to at the end.  A block the budget may not remove (no ``--remove-blocks``) costs its
layers whatever its gate says, so its price is 0 and the budget does not remove it.  The limit
glides linearly from the dense cost down to the budget over the first ``ramp`` theta steps: the
network is not cut to the budget before it has learned what to keep.

The bisection runs on a CPU copy of theta (one device sync per step, not one per trial).
"""

from __future__ import annotations

import torch

from nn.budget import BudgetCost, candidate_widths
from nn.methods.variational.gated import projected_step

__all__ = ["BudgetTracker", "BUDGET_LAM", "BISECTIONS", "MAX_LAM"]

BUDGET_LAM = ("project", "fixed")
"""What ``lam`` does under a stated budget: the step's multiplier, or the user's, fixed."""

BISECTIONS = 10
"""Bisection steps on ``log lam`` per theta step, in a bracket of a factor 4: ``lam`` to 0.14%."""
MAX_LAM = 1e6
"""The largest multiplier tried: above it the step keeps what it keeps (every gate already at
0 but the pinned ones)."""


class BudgetTracker:
    """The budget's multiplier per theta step (module docstring).

    ``gated``: the :class:`~nn.methods.variational.gated.GatedResNet`; ``budget``: the run's
    :class:`~nn.budget.BudgetCost`; ``granularity``: the selection's; ``ramp``: theta steps over
    which the limit glides to the budget (0: the budget from the first step)."""

    def __init__(self, gated, budget: BudgetCost, granularity: int, ramp: int = 0):
        if ramp < 0:
            raise ValueError(f"ramp must be >= 0 steps, got {ramp!r}")
        self.gated, self.budget, self.ramp = gated, budget, int(ramp)
        self.full = budget.cost()  # every family at its full width, every block kept
        by_name = gated.by_name
        missing = [n for n in budget.sizes if n not in by_name]
        if missing:
            raise ValueError(f"the budget prices families the gates do not hold: {missing}")
        self._grid = {n: candidate_widths(s, granularity) for n, s in budget.sizes.items()}
        self._carrier_gate = {c: by_name[b] for b, c in budget.block_carriers.items()
                              if b in by_name}
        self._price = (None, None)  # (the widths it was taken at, the price)

    def _snap(self, name: str, width: float) -> int:
        """The allowed width of family ``name`` nearest to ``width`` (ties: the smaller)."""
        return min(self._grid[name], key=lambda w: (abs(w - width), w))

    def widths(self, theta: torch.Tensor | None = None) -> dict[str, int]:
        """Every priced family's expected width under the gates at ``theta`` (default: the
        current one), dead gates counting 0 (module docstring)."""
        g = self.gated
        th = g.theta if theta is None else theta
        return self._widths(th.detach().cpu().double() * g.alive.cpu())

    def _widths(self, th: torch.Tensor, blocks: bool = True) -> dict[str, int]:
        """:meth:`widths` of ``th`` (live gates' theta, float64 on the CPU); ``blocks`` False:
        before the blocks whose gate is below one half set their carriers to 0."""
        out = {}
        for name in self._grid:
            gate = self.gated.by_name[name]
            out[name] = self._snap(name, float(th[gate.slice].sum()) * gate.group)
        if blocks:
            for carrier, bgate in self._carrier_gate.items():
                if float(th[bgate.start]) < 0.5:
                    out[carrier] = 0
        return out

    def limit(self, step: int) -> float:
        """The limit after ``step`` theta steps: the ramp from the dense cost to the budget."""
        if step >= self.ramp:
            return self.budget.limit
        return self.full + (self.budget.limit - self.full) * step / self.ramp

    def ratio(self, step: int | None = None) -> float:
        """The budget's cost at the current :meth:`widths` over the limit after ``step`` theta
        steps (None: over the budget itself)."""
        limit = self.budget.limit if step is None else self.limit(step)
        return self.budget.cost(self.widths()) / limit

    def price(self) -> torch.Tensor:
        """Every gate's price at the current widths (float64, theta's layout, on the CPU): the
        cost the budget saves per gate, over the dense cost.

        A unit gate: the slope of the cost in its family's width over one grid step down from
        the current width (up, at the smallest width), times the units it holds; 0 where the
        cost does not fall (a latency table's flat stretch) or its block is removed.  A block
        gate whose block the budget may remove: the cost of its block at its expected width
        less the cost without it; any other block gate: 0.  Cached until the widths change."""
        g = self.gated
        th = g.theta.detach().cpu().double() * g.alive.cpu()
        widths, snapped = self._widths(th, blocks=False), self._widths(th)
        key = (tuple(widths.values()), tuple(snapped.values()))
        if self._price[0] == key:
            return self._price[1]
        cost = self.budget.cost
        base = cost(snapped)
        p = torch.zeros(th.numel(), dtype=torch.float64)
        for name, grid in self._grid.items():
            w = snapped[name]
            if w == 0 or len(grid) < 2:
                continue
            i = grid.index(w)
            other = grid[i - 1] if i > 0 else grid[1]
            slope = (base - cost({**snapped, name: other})) / (w - other)
            gate = g.by_name[name]
            p[gate.slice] = max(slope, 0.0) * gate.group
        for carrier, bgate in self._carrier_gate.items():
            kept = {**snapped, carrier: widths[carrier]}
            p[bgate.start] = max(cost(kept) - cost({**snapped, carrier: 0}), 0.0)
        p /= self.full
        self._price = (key, p)
        return p

    @torch.no_grad()
    def multiplier(self, ce_grad: torch.Tensor, price: torch.Tensor, lr: float,
                   precondition: bool, step: int) -> float:
        """The least ``lam >= 0`` whose theta step on ``ce_grad + lam price`` keeps the cost
        within the limit after ``step`` theta steps (the step counter less the warm-up, so a
        resumed run continues the ramp); :data:`MAX_LAM` if none does."""
        limit = self.limit(step)
        g = self.gated
        theta, alive, free, unit_cost, ce_grad, price = (
            t.detach().cpu() for t in (g.theta, g.alive, g.alive & ~g.pinned, g.unit_cost,
                                       ce_grad, price))
        theta = theta.double() * alive
        unit_cost, ce_grad, price = unit_cost.double(), ce_grad.double(), price.double()

        def fits(lam: float) -> bool:
            th = projected_step(theta, free, unit_cost, ce_grad + lam * price, lr, precondition)
            return self.budget.cost(self._widths(th)) <= limit

        if fits(0.0):
            return 0.0
        lam = max(float(g.lam_now), 1e-6)  # bracket from the last step's multiplier
        if fits(lam):
            lo, hi = lam / 4, lam
            while fits(lo):
                lo, hi = lo / 4, lo
                if hi < 1e-9:
                    return hi
        else:
            lo, hi = lam, lam * 4
            while not fits(hi):
                lo, hi = hi, hi * 4
                if hi >= MAX_LAM:
                    return MAX_LAM
        for _ in range(BISECTIONS):  # fits(hi), not fits(lo), 0 < lo < hi
            mid = (lo * hi) ** 0.5
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        return hi
