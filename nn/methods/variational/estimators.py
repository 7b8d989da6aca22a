"""Gradient estimators of ``d E[CE] / d theta`` for the gated ResNet (DESIGN §6).

The exact value for gate ``s`` is ``E[CE | xi_s = 1] - E[CE | xi_s = 0]`` (``E[CE]`` is
multilinear in theta).  Three estimators (:data:`ESTIMATORS`):

``flip``       (default) the exact conditional difference on the step's batch, ``CE(xi_s = 1,
               xi_-s) - CE(xi_s = 0, xi_-s)`` with the other gates as sampled: unbiased at
               every theta and free of the other gates' noise.  Each costs one extra
               train-mode pass (no grad, BN running statistics frozen) over the blocks from
               gate s's own block on (the earlier blocks' outputs are reused), for
               ``flip_units`` live unit gates and ``flip_blocks`` live block gates drawn at
               random per step (None: all), their estimates scaled by (live gates / drawn) to
               stay unbiased (:func:`draw`).
``st``         straight-through (free): the forward multiplies by ``xi + theta -
               stopgrad(theta)``, so the gradient is ``dCE/dxi`` at the sample -- biased (it
               linearises ``CE(xi_s=1) - CE(xi_s=0)``), low variance; it needs the branch of
               a block sampled off, so it saves no compute on sampled-off gates.  With few live
               units left in a family, the whole family can be sampled off; the next
               train-mode BN then sees zero variance and ``dCE/dxi`` is inflated by about
               ``1/sqrt(eps)`` on that step.  At ``xi = 1`` a confidently wrong network lowers
               its CE by shrinking any branch, so ``dCE/dxi`` can have the wrong sign for a
               needed block.
``reinforce``  score function with a moving-average baseline ``b`` (unbiased for ``0 < theta
               < 1``): ``(CE - b) (xi - theta) / (theta (1 - theta))``; blocks sampled off are
               skipped.  High variance with many gates: one needed gate sampled off moves the
               CE of the step, and that lands on every other gate's estimate.

Each is checked against exact enumeration of every gate pattern on a toy network
(``tests/test_nn_gates.py``, ``benchmarks/gate_estimators.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ESTIMATORS", "DEFAULT_ESTIMATOR", "DEFAULT_FLIP_UNITS", "DEFAULT_FLIP_BLOCKS",
           "multipliers", "theta_gradient", "flip_differences", "draw"]

ESTIMATORS = ("st", "reinforce", "flip")
DEFAULT_ESTIMATOR, DEFAULT_FLIP_UNITS, DEFAULT_FLIP_BLOCKS = "flip", 4, 2


def multipliers(estimator: str, xi: torch.Tensor, leaf: torch.Tensor, alive: torch.Tensor):
    """The gate multipliers of a training forward and, per gate, whether its branch is
    computed: ``st`` multiplies by ``xi + leaf - stopgrad(leaf)`` and needs every live branch
    (its gradient); the others multiply by ``xi`` and skip the branches sampled off."""
    xf = xi.to(leaf.dtype)
    if estimator == "st":
        return xf + leaf - leaf.detach(), alive.tolist()
    return xf, xi.tolist()


def theta_gradient(gated, ce: torch.Tensor, batch=None) -> torch.Tensor:
    """The step's gradient estimate w.r.t. theta (:meth:`GatedResNet.theta_gradient`): the
    leaf's gradient (straight-through and the exact cost part) plus, for ``reinforce``,
    ``(ce - baseline) * score`` (the baseline is updated), for ``flip`` the conditional
    differences on ``batch``."""
    if gated._leaf is None:
        raise RuntimeError("theta_gradient needs a training-mode forward pass first")
    g = gated._leaf.grad
    g = torch.zeros_like(gated.theta) if g is None else g.detach().clone()
    if gated.estimator == "flip":
        if batch is None:
            raise ValueError("the flip estimator needs the step's batch (x, y)")
        return g + flip_differences(gated, ce, *batch)
    if gated.estimator == "reinforce":
        th, xi = gated.theta, gated._xi.to(gated.theta.dtype)
        inner = (th > 0) & (th < 1) & gated.alive
        score = torch.where(inner, (xi - th) / (th * (1 - th)).clamp_min(1e-12),
                            torch.zeros_like(th))
        ce = ce.detach().to(th.dtype)
        base = torch.where(gated.baseline_set, gated.baseline, ce)
        g = g + (ce - base) * score
        with torch.no_grad():
            gated.baseline.copy_(gated.baseline_decay * base + (1 - gated.baseline_decay) * ce)
            gated.baseline_set.fill_(True)
    return g


@torch.no_grad()
def flip_differences(gated, ce: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """``w_s (CE(xi_s=1) - CE(xi_s=0))`` for the live unpinned gates drawn this step
    (``flip_units`` units and ``flip_blocks`` blocks, ``w_s`` = live gates of that kind /
    drawn; the others 0), each from one extra train-mode pass with gate s flipped that re-runs
    only the blocks from gate s's own block on (the earlier ones are unchanged: their saved
    outputs are reused); BN running statistics are left untouched (momentum 0)."""
    xi, inputs = gated._xi, gated._inputs
    if inputs is None or len(inputs) != len(gated.layout.blocks):
        raise RuntimeError("flip needs the block inputs of this step's training forward")
    free = (gated.alive & ~gated.pinned).cpu()
    n_units = gated.n_units
    flips = draw(torch.nonzero(free[:n_units]).flatten(), gated.flip_units) + \
        draw(torch.nonzero(free[n_units:]).flatten() + n_units, gated.flip_blocks)
    out = torch.zeros_like(gated.theta)
    bns = gated._bns
    saved = [m.momentum for m in bns]
    on = xi.tolist()
    idx = gated._indices()
    ce = ce.detach().float()
    try:
        for m in bns:
            m.momentum = 0.0
        for s, w in flips:
            flipped = xi.clone()
            flipped[s] = not on[s]
            mult, compute = flipped.to(gated.theta.dtype), list(on)
            compute[s] = not on[s]
            pos = gated._gate_block[s]
            h = gated._stem(x, mult) if pos < 0 else inputs[pos].detach()
            other = F.cross_entropy(gated._tail(h, max(pos, 0), mult, compute, idx).float(), y)
            out[s] = w * ((ce - other) if on[s] else (other - ce))
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        gated._inputs = None  # used once: do not hold the step's activations any longer
    return out


def draw(gates: torch.Tensor, k: int | None) -> list[tuple[int, float]]:
    """``(gate, weight)`` pairs: ``k`` of ``gates`` drawn without replacement, each weighted
    ``len(gates) / k`` (so a sum over them is unbiased for the sum over all), or all of them
    with weight 1 (``k`` None or at least their number)."""
    n = gates.numel()
    if k is None or n <= k:
        return [(int(s), 1.0) for s in gates]
    return [(int(s), n / k) for s in gates[torch.randperm(n, device="cpu")[:k]]]
