"""A stated budget during the variational training: the price of size as its multiplier.

Without a budget, ``lam`` is the user's trade of accuracy against size and stays fixed.  With
``--budget`` the trade is stated the other way -- this size, the best accuracy -- and a fixed
``lam`` prunes to whatever size it happens to imply: with ``lam`` 1 the pruned ResNet-20 came
out at 0.169 of the MACs for every MAC budget from 0.5 to 0.2, trained all along with most of
its units sampled off.

Here ``lam`` becomes the Lagrange multiplier of the budget constraint ``cost(theta) <= limit``
and follows a multiplicative dual step after every theta step::

    lam <- lam * exp(gain * clip(cost / limit - 1, -1, 1))

so the price rises while the gates' network is over the budget and falls while it is under,
and the training settles where the budget binds.  ``cost`` is the budget's own cost (the terms
the selection solves with, :class:`nn.budget.BudgetCost`: MACs, parameters or the latency
table) at the gates' expected widths -- each family's sum of ``theta`` over its live gates,
snapped to the nearest width the selection may choose, and a block removed once its gate is
below one half -- so the price steers towards what the selection will cut to at the end.

The limit itself glides linearly from the dense cost down to the budget over the first
``ramp`` steps of theta's training: a unit pushed to theta = 0 by a price far above the
binding one rarely comes back (while it is off, the weights that read it decay), so the price
should not overshoot early.
"""

from __future__ import annotations

import math

import torch

from nn.budget import BudgetCost, candidate_widths

__all__ = ["BudgetTracker"]


class BudgetTracker:
    """Moves ``gated.lam_now`` towards the price at which ``budget`` binds (module docstring).

    ``gated``: the :class:`~nn.methods.variational.gated.GatedResNet`; ``budget``: the run's
    :class:`~nn.budget.BudgetCost`; ``gain``: the log-step of ``lam`` per unit of relative
    excess, per theta step; ``granularity``: the selection's; ``ramp``: theta steps over which
    the limit glides to the budget (0: the budget from the first step)."""

    def __init__(self, gated, budget: BudgetCost, gain: float, granularity: int,
                 ramp: int = 0):
        if gain <= 0:
            raise ValueError(f"gain must be > 0, got {gain!r}")
        if ramp < 0:
            raise ValueError(f"ramp must be >= 0 steps, got {ramp!r}")
        self.gated, self.budget, self.gain, self.ramp = gated, budget, float(gain), int(ramp)
        self.full = budget.cost()  # every family at its full width, every block kept
        by_name = gated.by_name
        missing = [n for n in budget.sizes if n not in by_name]
        if missing:
            raise ValueError(f"the budget prices families the gates do not hold: {missing}")
        self._widths = {n: torch.tensor(candidate_widths(s, granularity)) for n, s in
                        budget.sizes.items()}
        self._carrier_gate = {c: by_name[b] for b, c in budget.block_carriers.items()
                              if b in by_name}

    def widths(self) -> dict[str, int]:
        """Every priced family's expected width under the gates (module docstring)."""
        g = self.gated
        th = (g.theta * g.alive).detach().double().cpu()
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

    def ratio(self, step: int | None = None) -> float:
        """The budget's cost at :meth:`widths` over the limit after ``step`` theta steps
        (None: over the budget itself)."""
        limit = self.budget.limit if step is None else self.limit(step)
        return self.budget.cost(self.widths()) / limit

    @torch.no_grad()
    def step(self, step: int) -> float:
        """The dual step after ``step`` theta steps (the gated step counter less the warm-up,
        so a resumed run continues the ramp) on ``gated.lam_now``; returns the ratio read."""
        r = self.ratio(step)
        self.gated.lam_now.mul_(math.exp(self.gain * max(-1.0, min(1.0, r - 1.0))))
        self.gated.lam_now.clamp_(1e-6, 1e6)
        return r
