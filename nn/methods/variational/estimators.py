"""Gradient estimators of ``d E[CE] / d theta`` for the gated ResNet (DESIGN §6).

The exact value for gate ``s`` is ``E[CE | xi_s = 1] - E[CE | xi_s = 0]`` (``E[CE]`` is
multilinear in theta).  Four estimators (:data:`ESTIMATORS`):

``batched``    (default) several gates' exact conditional differences on a small ghost batch,
               in one widened pass: ``flip_samples`` samples of the step's batch, once with the
               step's gate pattern and once per flipped gate with that gate flipped for all of
               them, every copy normalised by its own BN statistics (``bn_groups`` of
               :mod:`nn.models.resnet.forward`), so the flip's effect on the statistics -- the
               renormalisation a removed unit gets in the final network -- is in it.  A flipped
               gate's copy joins at the gate's block (earlier blocks are shared).  Its cost is
               about ``flip_samples (1 + flips/2) / batch`` of a forward.  The estimate for a gate
               is unbiased for the ghost batch's conditional difference, but one step estimates
               only ``flip_units`` unit and ``flip_blocks`` block gates (each kind in turn from
               a shuffled cycle) on a few samples: :meth:`GatedResNet.record` keeps a running
               average per gate, theta follows the averages, and they decide when a gate at
               theta = 0 may die (:meth:`GatedResNet.step_theta`).  A per-sample variant (one
               gate per sample) was tried and dropped: BN couples the samples, so flipping a
               gate for one sample measures its effect without the renormalisation, and on the
               planted test it kept the distractors.
``flip``       the exact conditional difference on the step's batch, ``CE(xi_s = 1,
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

from nn.models.resnet import forward as fwd

__all__ = ["ESTIMATORS", "DEFAULT_ESTIMATOR", "DEFAULT_FLIP_UNITS", "DEFAULT_FLIP_BLOCKS",
           "DEFAULT_FLIP_SAMPLES", "multipliers", "theta_gradient", "flip_differences",
           "batched_flips", "draw"]

ESTIMATORS = ("st", "reinforce", "flip", "batched")
DEFAULT_ESTIMATOR, DEFAULT_FLIP_UNITS, DEFAULT_FLIP_BLOCKS = "batched", 4, 2
DEFAULT_FLIP_SAMPLES = 8


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
    differences on ``batch``, for ``batched`` every gate's running average of its flip
    differences (this step's recorded first)."""
    if gated._leaf is None:
        raise RuntimeError("theta_gradient needs a training-mode forward pass first")
    g = gated._leaf.grad
    g = torch.zeros_like(gated.theta) if g is None else g.detach().clone()
    if gated.estimator in ("flip", "batched") and batch is None:
        raise ValueError(f"the {gated.estimator} estimator needs the step's batch (x, y)")
    if gated.estimator == "flip":
        return g + flip_differences(gated, ce, *batch)
    if gated.estimator == "batched":
        gated.record(*batched_flips(gated, *batch)[:2])
        return g + gated.averaged_ce_gradient()
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


@torch.no_grad()
def batched_flips(gated, x: torch.Tensor, y: torch.Tensor):
    """``(gates, values, samples)``: the gates flipped this step (``flip_units`` unit and
    ``flip_blocks`` block gates, each kind taken in turn from its shuffled cycle over the live
    unpinned gates, :meth:`GatedResNet.next_gates`; up to half of the unit flips go to the
    unit gates at theta = 0, whose death waits on evidence gathered there), each one's ``CE(xi_s = 1) - CE(xi_s = 0)``
    on the ghost batch, and the ghost batch's sample indices (``flip_samples`` of the batch
    ``(x, y)``, drawn at random).

    One train-mode pass, no grad, BN running statistics untouched: group 0 is the ghost batch
    with the step's gate pattern, group ``j + 1`` the same samples with gate ``gates[j]``
    flipped, each group normalised by its own statistics (``bn_groups``; the groups interleaved,
    row ``i G + j`` is sample ``i`` of group ``j``).  Group 0 starts at the earliest flipped
    gate's block from the saved block input; a flipped gate's group joins at its own block as a
    copy of group 0 there, so the two share everything before the flip."""
    xi, inputs = gated._xi, gated._inputs
    nb = len(gated.layout.blocks)
    if inputs is None or len(inputs) != nb:
        raise RuntimeError("batched flips need the block inputs of this step's training forward")
    gated._inputs = None  # used once: do not hold the step's activations any longer
    free = (gated.alive & ~gated.pinned).cpu()
    dormant = free & (gated.theta.cpu() <= 0)  # awaiting a verdict: half the unit flips
    k = gated.flip_units
    gates = gated.next_gates(dormant, "dormant", None if k is None else k // 2)
    gates += gated.next_gates(free & ~dormant, "unit", None if k is None else k - len(gates))
    gates += gated.next_gates(free, "block", gated.flip_blocks)
    dev = gated.theta.device
    if not gates:
        none = torch.zeros(0, dtype=torch.long)
        return none.to(dev), gated.theta.new_zeros(0), none
    n = x.shape[0]
    m = min(gated.flip_samples, n)
    samples = torch.randperm(n, device="cpu")[:m]
    gates.sort(key=gated._gate_block.__getitem__)
    pos = [gated._gate_block[s] for s in gates]
    g_dev = torch.tensor(gates, dtype=torch.long, device=dev)
    base = xi.to(gated.theta.dtype)
    groups = 1 + len(gates)
    rows = base.expand(m, groups, -1).clone()  # (sample, group, gate)
    rows[:, torch.arange(1, groups, device=dev), g_dev] = 1 - base[g_dev]
    on = xi.tolist()
    blocks = [g.start for g in gated.gates if g.kind == "block"]
    idx = gated._indices()
    xs, used = x[samples.to(x.device)], 1
    if pos[0] < 0:  # stem gates: their groups and group 0 start at the input
        used += sum(p < 0 for p in pos)
        h = gated._stem(xs.repeat_interleave(used, 0), rows[:, :used].reshape(m * used, -1),
                        bn_groups=used)
    else:
        h = inputs[pos[0]].detach()[samples.to(x.device)]
    for p in range(max(pos[0], 0), nb):
        k = sum(q == p for q in pos)
        if k:  # k more groups, copies of group 0 here
            h = h.reshape(m, used, *h.shape[1:])
            h = torch.cat([h, h[:, :1].expand(m, k, *h.shape[2:])], 1).flatten(0, 1)
            used += k
        compute = list(on)
        mult = rows[:, :used].reshape(m * used, -1)
        live = mult.bool().any(0).tolist()
        for b in blocks:
            compute[b] = live[b]
        h = gated._block(p, h, mult, compute, idx, bn_groups=used)
    logits = fwd.head(gated.net, h).float()
    ce = F.cross_entropy(logits, y[samples.to(y.device)].repeat_interleave(groups),
                         reduction="none")
    ce = ce.reshape(m, groups).mean(0)
    d = ce[1:] - ce[0]  # flipped - as sampled
    return g_dev, torch.where(base[g_dev] > 0, -d, d).to(gated.theta.dtype), samples


def draw(gates: torch.Tensor, k: int | None) -> list[tuple[int, float]]:
    """``(gate, weight)`` pairs: ``k`` of ``gates`` drawn without replacement, each weighted
    ``len(gates) / k`` (so a sum over them is unbiased for the sum over all), or all of them
    with weight 1 (``k`` None or at least their number)."""
    n = gates.numel()
    if k is None or n <= k:
        return [(int(s), 1.0) for s in gates]
    return [(int(s), n / k) for s in gates[torch.randperm(n, device="cpu")[:k]]]
