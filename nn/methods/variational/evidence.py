"""The evidence the ``batched`` estimator gathers per gate (DESIGN §6), and what it decides.

Each step flips a few gates (:meth:`Evidence.next_gates`: per kind, a shuffled cycle over the
gates that may be flipped), and every flip difference ``CE(on) - CE(off)`` is folded into its
gate's running average (:meth:`Evidence.record`).  theta follows the averages
(:meth:`Evidence.averaged_ce_gradient`); a gate at theta = 0 dies only when its average says,
with confidence, that it is worth less than its price (:meth:`Evidence.evidence_useless`).

One concept: the per-gate statistics (buffers, so ``--resume`` continues them) and the rules that
read them.  :class:`Evidence` is a mixin of :class:`~nn.methods.variational.gated.GatedResNet`.
"""

from __future__ import annotations

import torch

__all__ = ["AVERAGE_DECAY", "DEATH_VISITS", "DEATH_Z", "Evidence"]

AVERAGE_DECAY = 0.1
"""``batched``: a gate's average is the plain mean of its first ``1 / AVERAGE_DECAY`` flip
differences, then an exponential moving average with this weight per visit (its effective
count ``(2 - a) / a``, 19 visits): it forgets estimates made on weights long gone."""
DEATH_VISITS = 4
"""``batched``: a gate at theta = 0 may die only after this many flip differences gathered
there (half of each step's unit flips go to the unit gates at theta = 0, so they come fast)."""
DEATH_Z = 2.0
"""``batched``: ... and only when its value plus this many standard errors is below its price."""


class Evidence:
    """Per-gate flip statistics and cycles of a gated module (module docstring)."""

    def _init_evidence(self, n: int, n_unit_gates: int) -> None:
        """Buffers for ``n`` gates, the first ``n_unit_gates`` of them unit gates: every gate's
        running average of CE(on) - CE(off), of its square, its visits; per gate kind (and
        ``dormant``: the unit gates again, for those at theta = 0), a shuffled cycle of its
        gates and the position in it."""
        self.register_buffer("est_mean", torch.zeros(n))
        self.register_buffer("est_sq", torch.zeros(n))
        self.register_buffer("est_n", torch.zeros(n))
        for kind, first, size in (("unit", 0, n_unit_gates), ("dormant", 0, n_unit_gates),
                                  ("block", n_unit_gates, n - n_unit_gates)):
            self.register_buffer(f"{kind}_cycle", torch.arange(first, first + size))
            self.register_buffer(f"{kind}_pos", torch.tensor(size))  # at the end: shuffle

    def next_gates(self, free: torch.Tensor, kind: str, k: int | None) -> list[int]:
        """The next ``k`` gates of cycle ``kind`` (``unit``, ``dormant``: the unit gates again,
        for those at theta = 0, or ``block``) that are ``free`` (a bool per gate; ``k`` None:
        all of them), a new shuffle (``torch.randperm``) each time the cycle ends; at most once
        each per call."""
        cycle, pos = getattr(self, f"{kind}_cycle"), int(getattr(self, f"{kind}_pos"))
        n_free = int(free[cycle.cpu()].sum()) if len(cycle) else 0
        k = n_free if k is None else min(k, n_free)
        order, out = cycle.tolist(), []
        while len(out) < k:
            if pos >= len(order):
                perm = torch.randperm(len(order))
                order, pos = [order[i] for i in perm.tolist()], 0
                cycle.copy_(torch.tensor(order))
            if free[order[pos]] and order[pos] not in out:
                out.append(order[pos])
            pos += 1
        getattr(self, f"{kind}_pos").fill_(pos)
        return out

    @torch.no_grad()
    def record(self, gates: torch.Tensor, values: torch.Tensor) -> None:
        """Fold this step's flip differences ``values`` (of ``gates``, repeats allowed) into
        every gate's running average (:data:`AVERAGE_DECAY`): with ``k`` new values of mean
        ``v`` after ``n``, ``mean += w (v - mean)``, ``w = max(k / (n + k), 1 - (1 - a)^k)``;
        the same for the squares."""
        if gates.numel() == 0:
            return
        k = torch.zeros_like(self.est_n).index_add_(0, gates, torch.ones_like(values))
        s1 = torch.zeros_like(self.est_mean).index_add_(0, gates, values)
        s2 = torch.zeros_like(self.est_sq).index_add_(0, gates, values * values)
        seen = k > 0
        kk = k.clamp_min(1)
        w = torch.maximum(k / (self.est_n + kk), 1 - (1 - AVERAGE_DECAY) ** k)
        w = torch.where(seen, w, torch.zeros_like(w))
        self.est_mean.add_(w * (s1 / kk - self.est_mean))
        self.est_sq.add_(w * (s2 / kk - self.est_sq))
        self.est_n.add_(k)

    def averaged_ce_gradient(self) -> torch.Tensor:
        """``batched``: every gate's running average of ``CE(on) - CE(off)`` (0 before its first
        visit): the cross-entropy part of the theta gradient."""
        return torch.where(self.est_n > 0, self.est_mean, torch.zeros_like(self.est_mean))

    def evidence_useless(self, price: torch.Tensor) -> torch.Tensor:
        """Per gate: its value ``CE(off) - CE(on)`` is below ``price`` (``lam dR/dtheta``) with
        confidence -- at least :data:`DEATH_VISITS` flip differences, and their average plus
        :data:`DEATH_Z` standard errors (effective count ``min(n, (2 - a) / a)``) below it."""
        n = self.est_n
        var = (self.est_sq - self.est_mean ** 2).clamp_min(0)
        eff = n.clamp(1, (2 - AVERAGE_DECAY) / AVERAGE_DECAY)
        upper = -self.est_mean + DEATH_Z * (var / eff).sqrt()
        return (n >= DEATH_VISITS) & (upper < price)
