"""A stated budget during the variational training: the price of size as its multiplier.

Without a budget, ``lam`` is the user's trade of accuracy against size and stays fixed.  With
``--budget`` the trade is stated the other way -- this size, the best accuracy -- and a fixed
``lam`` prunes to whatever size it happens to imply: with ``lam`` 1 the pruned ResNet-20 came
out at 0.169 of the MACs for every MAC budget from 0.5 to 0.2, trained all along with most of
its units sampled off.

Here every theta step is the projected-SGD step of the budget-constrained problem::

    theta+ = clip(theta - lr P (g_CE + lam p), 0, 1)   with   cost(theta+) <= limit

where ``g_CE`` is the step's cross-entropy part of the gradient, ``p = dR/dtheta`` the price
of every gate at ``lam = 1`` and ``P`` the step's preconditioner (:meth:`GatedResNet.step_theta`).
``lam`` is the constraint's Lagrange multiplier for this step: 0 when the unconstrained step
already fits, else the least ``lam`` whose step fits, found by bisection (``cost(theta+)``
does not increase with ``lam``).  So the gates' network follows the limit step by step, with no
controller lag to overshoot it (an integral controller on ``lam`` tried first pushed the price
to 5x the binding one while theta lagged, and removed blocks a 0.3 budget did not need).

``cost`` is the budget's own (the terms the selection solves with, :class:`nn.budget.BudgetCost`:
MACs, parameters or the latency table) at the gates' expected widths -- each family's sum of
theta over its live gates, snapped to the nearest width the selection may choose, and a block
removed once its gate is below one half -- so the training heads for what the selection will
cut to at the end.  The limit glides linearly from the dense cost down to the budget over the
first ``ramp`` theta steps: the network is not cut to the budget before it has learned what to
keep.
"""

from __future__ import annotations

import torch

from nn.budget import BudgetCost, candidate_widths

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
        self._widths = {n: torch.tensor(candidate_widths(s, granularity), dtype=torch.float64)
                        for n, s in budget.sizes.items()}
        self._carrier_gate = {c: by_name[b] for b, c in budget.block_carriers.items()
                              if b in by_name}

    def widths(self, theta: torch.Tensor | None = None) -> dict[str, int]:
        """Every priced family's expected width under the gates at ``theta`` (default: the
        current one), dead gates counting 0 (module docstring)."""
        g = self.gated
        th = (g.theta if theta is None else theta) * g.alive
        th = th.detach().double().cpu()
        out = {}
        for name, grid in self._widths.items():
            gate = g.by_name[name]
            w = float(th[gate.slice].sum()) * gate.group
            out[name] = int(grid[(grid - w).abs().argmin()])
        for carrier, bgate in self._carrier_gate.items():
            if float(th[bgate.start]) < 0.5:
                out[carrier] = 0
        return out

    def limit(self, step: int) -> float:
        """The limit after ``step`` theta steps: the ramp from the dense cost to the budget."""
        if step >= self.ramp:
            return self.budget.limit
        return self.full + (self.budget.limit - self.full) * step / self.ramp

    def ratio(self, theta: torch.Tensor | None = None, step: int | None = None) -> float:
        """The budget's cost at :meth:`widths` of ``theta`` over the limit after ``step`` theta
        steps (None: over the budget itself)."""
        limit = self.budget.limit if step is None else self.limit(step)
        return self.budget.cost(self.widths(theta)) / limit

    @torch.no_grad()
    def multiplier(self, ce_grad: torch.Tensor, price: torch.Tensor, lr: float,
                   precondition: bool, step: int) -> float:
        """The least ``lam >= 0`` whose theta step on ``ce_grad + lam price`` keeps the cost
        within the limit after ``step`` theta steps (the step counter less the warm-up, so a
        resumed run continues the ramp); :data:`MAX_LAM` if none does."""
        limit = self.limit(step)

        def fits(lam: float) -> bool:
            th = self.gated.proposed_theta(ce_grad + lam * price, lr, precondition)
            return self.budget.cost(self.widths(th)) <= limit

        if fits(0.0):
            return 0.0
        lam = max(float(self.gated.lam_now), 1e-6)  # bracket from the last step's multiplier
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
