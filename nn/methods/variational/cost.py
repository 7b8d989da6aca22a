"""The exact expected cost of a gated network (DESIGN §6): multilinear in theta, differentiable.

With independent gates ``xi_s ~ Bernoulli(theta_s)`` the price of size is::

    R(theta) = w_macs E[MACs] / MACs0 + w_params E[params] / params0 + w_blocks E[blocks] / B

(``w``: the run's :class:`nn.cost.CostConfig` weights, as SPR reads them; ``MACs0``, ``params0``: the dense
network's; ``B``: its removable blocks).  Every parameter tensor depends on at most one unit
family through its output axis, one through its input axis and one block gate, so::

    E[cost of a tensor] = full * theta_b * mean(theta_out family) * mean(theta_in family)

with a factor 1 where the tensor has no such gate (:func:`expected`).  A unit gate on a group
of g units (``GatedResNet(group=g)``) stands for its g units, each at its theta: a family's mean
over its gates is the mean over its units, so a gate's expected cost is the sum of its units'.
At every vertex where each kept block keeps a unit in each of its unit families -- every
network the pruner outputs -- this equals :func:`nn.count_macs` / :func:`nn.count_params` of
the compressed model.  A kept block whose inner family is entirely off is a "cut branch" that
:func:`nn.compress` folds into a constant; ``expected`` still charges the layers after the
cut, so the gradient still sees their price.  Each structure's automatic regularisation
weight is ``lam dR/dtheta_s``, its marginal expected cost (:func:`marginal`), recomputed as
theta moves.
"""

from __future__ import annotations

import torch

from nn.cost import tensor_costs

__all__ = ["cost_table", "expected", "normalised", "marginal"]


def cost_table(net, families, gates, lmacs: dict[str, int]):
    """The per-tensor table :func:`expected` reads, for the parameters of ``net`` in
    ``named_parameters()`` order.

    ``families``: its structures; ``gates``: the gated families (``name``, ``kind`` ``unit``
    or ``block``, ``start``, ``size`` in gates: units first, then blocks); ``lmacs``:
    per-layer MACs.
    Returns ``full`` (float64, ``(tensors, 2)``: parameters and MACs of the dense tensor),
    ``idx`` (long, ``(tensors, 3)``: its out unit family, in unit family and block gate, -1 for
    none), ``fam_of`` (per unit gate, its family) and ``fam_size`` (float64, per unit family: its
    gates)."""
    fam_index = {g.name: i for i, g in enumerate(gates) if g.kind == "unit"}
    start = {g.name: g.start for g in gates}
    rows = [(t.params, t.macs, fam_index.get(t.out_family, -1),
             fam_index.get(t.in_family, -1), start.get(t.block, -1))
            for t in tensor_costs(net, families, lmacs)]
    t = torch.tensor(rows, dtype=torch.float64)
    units = [g for g in gates if g.kind == "unit"]
    fam_of = torch.cat([torch.full((g.size,), i) for i, g in enumerate(units)]) \
        if units else torch.zeros(0, dtype=torch.long)
    fam_size = torch.tensor([float(g.size) for g in units], dtype=torch.float64)
    return t[:, :2].clone(), t[:, 2:].long(), fam_of.long(), fam_size


def expected(theta: torch.Tensor, full, idx, fam_of, fam_size, n_units: int) -> dict:
    """``macs``, ``params``, ``blocks``: exact expectations under independent gates with keep
    probabilities ``theta`` (units first, then blocks; the table of :func:`cost_table`)."""
    th = theta.to(torch.float64)
    units, blocks = th[:n_units], th[n_units:]
    frac = torch.zeros_like(fam_size).index_add(0, fam_of, units) / fam_size
    one = th.new_ones(1)
    fam = torch.cat([frac, one])            # index -1 -> 1 (not gated)
    blk = torch.cat([th, one])
    out_f, in_f, b = (idx[:, k] for k in range(3))
    factor = fam[out_f] * fam[in_f] * blk[b]
    return {"params": (full[:, 0] * factor).sum(), "macs": (full[:, 1] * factor).sum(),
            "blocks": blocks.sum()}


def normalised(e: dict, weights, dense_macs, dense_params, n_blocks) -> torch.Tensor:
    """``R`` (module docstring) from the expectations ``e`` and ``weights = (w_macs, w_params,
    w_blocks)``; the blocks term is left out when its weight or ``B`` is 0."""
    w_macs, w_params, w_blocks = weights
    r = w_macs * e["macs"] / dense_macs + w_params * e["params"] / dense_params
    if w_blocks and n_blocks:
        r = r + w_blocks * e["blocks"] / n_blocks
    return r


def marginal(fn, theta: torch.Tensor) -> torch.Tensor:
    """``d fn / d theta`` at ``theta`` (float64, by autograd): the marginal costs when ``fn``
    is a cost."""
    th = theta.detach().double().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(th), th)
    return g
