"""Variational Bernoulli gates on units and residual blocks (DESIGN §6): the gated network.

:class:`GatedResNet` wraps a dense ResNet (any module :func:`nn.models.resnet.layout` accepts)
and puts a gate ``xi_s ~ Bernoulli(theta_s)`` on

* every **unit**: an output channel of a ``filter`` family (:mod:`nn.models.resnet.structures`:
  ``conv1`` of a BasicBlock, ``conv1``/``conv2`` of a Bottleneck, the ResNet-50 stem),
  multiplying the channel after BN + ReLU;
* every **removable block** (identity shortcut): ``relu(x + xi_b * branch(x))``.

With ``group`` g > 1, one unit gate stands for g consecutive units of its family (widths in
multiples of g, aligned to the hardware): the g units share its theta and its sample, so they
are kept or removed together, and the gate is priced as the g units it holds (:mod:`.cost`).
Every unit family's size must be a multiple of g.  ``theta``, ``alive`` and ``pinned`` hold
one entry per gate; the forward and the masks repeat a unit gate's entry over its g units.

All gates live in one flat vector ``theta`` (units family by family, then blocks; buffers, so
checkpoints and ``--resume`` carry them).  In ``train()`` one gate pattern is sampled per forward
pass (per mini-batch); in ``eval()`` the network is deterministic: every live gate multiplies by
its ``theta`` (mean field), which at ``theta`` in {0, 1} is the 0/1 network itself.  The final
network is :meth:`GatedResNet.deterministic_masks` (``theta >= 0.5``; a kept block keeps at
least its best unit), made exact by :meth:`GatedResNet.round_`.  A structure is **dead** once
its ``theta`` reached 0 (with the ``batched`` estimator: once the evidence gathered at 0 says it
is worth less than its price, :meth:`GatedResNet.step_theta`): it is never computed again (dead
units are sliced out of the convolutions and BNs, dead blocks skipped), so training gets faster
as it prunes.  ``pinned``
units are a family's last live unit: the unit gates never remove it (``theta`` held at 1); only
the block gate can.

The forward is the ResNet's own (:mod:`nn.models.resnet.forward`): live channels selected,
gate multipliers folded into the convs and BNs.  The price of size ``lam R(theta)`` is exact
(:mod:`.cost`); ``d E[CE] / d theta`` is estimated by one of :mod:`.estimators`.

One concept, the gated network and its state (theta, alive, pinned): its forward, masks,
rounding and statistics read and write the same buffers, so they stay in one module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn as tnn

from nn.checks import choice, integer, number, optional_count
from nn.complexity import count_macs, count_params, layer_macs
from nn.cost import CostConfig
from nn.methods.variational import cost as C
from nn.methods.variational.evidence import (AVERAGE_DECAY, DEATH_VISITS, DEATH_Z,
                                             Evidence)
from nn.methods.variational.estimators import (DEFAULT_ESTIMATOR, DEFAULT_FLIP_BLOCKS,
                                               DEFAULT_FLIP_SAMPLES, DEFAULT_FLIP_UNITS,
                                               ESTIMATORS, multipliers, theta_gradient)
from nn.models.resnet import forward as fwd
from nn.models.resnet.structures import build_families, layout

__all__ = ["ESTIMATORS", "DEFAULT_ESTIMATOR", "DEFAULT_FLIP_UNITS", "DEFAULT_FLIP_BLOCKS",
           "DEFAULT_FLIP_SAMPLES", "GatedResNet", "projected_step", "AVERAGE_DECAY",
           "DEATH_VISITS", "DEATH_Z"]


def projected_step(theta, free, unit_cost, grad, lr: float, precondition: bool):
    """``clip(theta - lr P grad, 0, 1)`` where ``free``, else ``theta``; ``P = diag(1 /
    unit_cost)`` when ``precondition``, else ``I`` (:meth:`GatedResNet.step_theta`)."""
    step = grad / unit_cost if precondition else grad
    return torch.where(free, (theta - lr * step).clamp(0.0, 1.0), theta)


def _lam_of_older_checkpoints(module, state_dict, prefix, *_):
    """A checkpoint written before the price of size was a buffer has no ``lam_now``: it was
    trained at the fixed ``lam`` the module was built with, so ``--resume`` keeps that."""
    state_dict.setdefault(prefix + "lam_now", module.lam_now.detach().clone())


@dataclass(frozen=True)
class _Gate:
    """A gated family: ``name`` (its Family name), ``kind`` (``unit``/``block``), its slice
    ``start:start+size`` of ``theta`` (``size`` gates), ``group`` structures per gate."""

    name: str
    kind: str
    start: int
    size: int
    group: int = 1

    @property
    def slice(self) -> slice:
        return slice(self.start, self.start + self.size)

    def units(self, v: torch.Tensor) -> torch.Tensor:
        """This family's entries of ``v`` (one per gate along its last axis, theta's layout),
        one per structure: each gate's entry repeated over its ``group`` structures."""
        return v[..., self.slice].repeat_interleave(self.group, dim=-1)


class GatedResNet(Evidence, tnn.Module):
    """A dense ResNet with Bernoulli gates; see the module docstring.

    ``net`` (kept as ``self.net``, trained in place), ``input_size`` (channels, height, width:
    for the MAC counts), ``lam`` (the price of size) and ``cost`` (its weights on MACs,
    parameters and blocks, :class:`nn.cost.CostConfig`; :mod:`.cost`), ``theta_init`` (every gate's initial keep probability, in
    (0, 1]), ``estimator`` (:data:`ESTIMATORS`), ``baseline_decay`` (the REINFORCE baseline's
    moving average), ``flip_units`` and ``flip_blocks`` (unit and block gates flipped per step
    by the ``flip`` estimator, drawn at random among the live ones; None: all), ``group``
    (units per unit gate, a divisor of every unit family's size).

    ``unit_cost`` (a buffer): ``dR/dtheta_s`` at theta = 1 (without ``lam``); ``n_units``:
    the number of unit gates (theta's first entries, the block gates follow).
    """

    def __init__(self, net: tnn.Module, input_size, *, lam: float = 1.0,
                 cost: CostConfig | None = None, theta_init: float = 1.0,
                 estimator: str = DEFAULT_ESTIMATOR, baseline_decay: float = 0.9,
                 flip_units: int | None = DEFAULT_FLIP_UNITS,
                 flip_blocks: int | None = DEFAULT_FLIP_BLOCKS, latency: dict | None = None,
                 group: int = 1, flip_samples: int = DEFAULT_FLIP_SAMPLES):
        super().__init__()
        try:
            lay = layout(net)
        except ValueError as e:
            raise ValueError(f"GatedResNet wraps a dense ResNet: {e}") from None
        cost = CostConfig() if cost is None else cost
        if not isinstance(cost, CostConfig):
            raise ValueError(f"cost must be an nn.cost.CostConfig, got {cost!r}")
        number("lam", lam, 0)
        number("theta_init", theta_init, 0, 1, open_lo=True)
        number("baseline_decay", baseline_decay, 0, 1)
        choice("estimator", estimator, ESTIMATORS)
        optional_count("flip_units", flip_units)
        optional_count("flip_blocks", flip_blocks)
        integer("group", group, 1)
        integer("flip_samples", flip_samples, 1)
        self.flip_units, self.flip_blocks = flip_units, flip_blocks
        self.flip_samples = flip_samples
        self.net = net
        self.cost_config = cost
        self.estimator, self.baseline_decay = estimator, float(baseline_decay)
        self.group = group
        self.input_size = tuple(input_size)
        lmacs = layer_macs(net, self.input_size)
        self.families = build_families(net, lmacs)
        uneven = [f for f in self.families if f.kind == "filter" and f.size % group]
        if uneven:
            raise ValueError(f"group {group} does not divide family {uneven[0].name!r} of "
                             f"{uneven[0].size} units ({len(uneven)} families): choose a group "
                             f"size that divides them")
        self.layout = lay
        self._modules_by_name = dict(net.named_modules())  # a plain dict: not registered
        self._bns = [m for m in self._modules_by_name.values()
                     if isinstance(m, tnn.modules.batchnorm._BatchNorm)]
        gates, start = [], 0
        for kind, fkind, g in (("unit", "filter", group), ("block", "block", 1)):
            for f in self.families:
                if f.kind == fkind:
                    gates.append(_Gate(f.name, kind, start, f.size // g, g))
                    start += f.size // g
        self.gates = tuple(gates)
        self.by_name = {g.name: g for g in gates}
        self._block_units = {}  # block gate index -> its unit gates' indices
        # per gate: the position of the block it sits in (-1: the stem), where a flip restarts
        pos_of = {name: pos for pos, info in enumerate(self.layout.blocks)
                  for name in (f"block.{info.name}", *info.convs)}
        self._gate_block = [pos_of.get(g.name, -1) for g in gates for _ in range(g.size)]
        for info in self.layout.blocks:
            bg = self.by_name.get(f"block.{info.name}")
            if bg is not None:
                self._block_units[bg.start] = torch.cat(
                    [torch.arange(self.by_name[c].start, self.by_name[c].start
                                  + self.by_name[c].size) for c in info.convs[:-1]])
        n = start
        self.register_buffer("theta", torch.full((n,), float(theta_init)))
        self.register_buffer("alive", torch.ones(n, dtype=torch.bool))
        self.register_buffer("pinned", torch.zeros(n, dtype=torch.bool))
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("baseline_set", torch.zeros((), dtype=torch.bool))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # the price of size: fixed, or moved by a stated budget (.budget); a buffer, so
        # --resume continues with the price reached
        self.register_buffer("lam_now", torch.tensor(float(lam), dtype=torch.float64))
        self.register_load_state_dict_pre_hook(_lam_of_older_checkpoints)
        # the budget's selection once the gates were fixed to it during the training (its
        # record; not in the checkpoint: a run resumed after that selects again)
        self.budget_record: dict | None = None
        self._init_evidence(n, sum(g.size for g in gates if g.kind == "unit"))
        if cost.latency and latency is None:
            raise ValueError("a latency cost needs the marginal latencies of the latency "
                             "table (nn.budget_latency.latency_cost)")
        lat = torch.zeros(n, dtype=torch.float64)
        if cost.latency:  # linear in theta: each gate's marginal latency over the dense one
            for g in self.gates:  # (per structure in the table: a gate holds g.group of them)
                lat[g.slice] = g.group * latency["marginal"].get(g.name, 0.0) \
                    / latency["dense_ms"]
        self.register_buffer("_latency", lat, persistent=False)
        full, idx, fam_of, fam_size = C.cost_table(net, self.families, self.gates, lmacs)
        self.register_buffer("_cost_full", full, persistent=False)
        self.register_buffer("_cost_idx", idx, persistent=False)
        self.register_buffer("_fam_of", fam_of, persistent=False)
        self.register_buffer("_fam_size", fam_size, persistent=False)
        self.n_units = int(fam_of.numel())
        self.n_blocks = sum(1 for g in self.gates if g.kind == "block")
        self.dense_macs = count_macs(net, self.input_size)
        self.dense_params = count_params(net)
        unit = C.marginal(self.cost, torch.ones(self.theta.shape))
        self.register_buffer("unit_cost", unit.float().clamp_min(1e-12), persistent=False)
        self._leaf = None     # theta as a leaf of this step's graph (training forward)
        self._xi = None       # this step's sample
        self._cache = None    # (alive bytes, {family: index tensor or None})
        self._inputs = None   # flip: the block inputs of this step's forward

    @property
    def lam(self) -> float:
        """The price of size now (``lam_now``)."""
        return float(self.lam_now)

    # ---------------------------------------------------------------- the exact expected cost
    def expected(self, theta: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``macs``, ``params``, ``blocks``: exact expectations under independent gates with
        keep probabilities ``theta`` (default: the current ones; dead gates count as 0)."""
        th = (self.theta * self.alive) if theta is None else theta
        return C.expected(th, self._cost_full, self._cost_idx, self._fam_of, self._fam_size,
                          self.n_units)

    def cost(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        """``R(theta)`` (:mod:`.cost`), without ``lam``; with a ``latency`` weight, plus that
        weight times the gates' marginal latencies (linear in theta)."""
        r = C.normalised(self.expected(theta), (self.cost_config.macs, self.cost_config.params,
                         self.cost_config.blocks), self.dense_macs, self.dense_params,
                         self.n_blocks)
        if self.cost_config.latency:
            th = (self.theta * self.alive) if theta is None else theta
            r = r + self.cost_config.latency * (th.to(torch.float64) * self._latency).sum()
        return r

    def penalty(self) -> torch.Tensor:
        """``lam * R`` of this step's theta (differentiable through the step's leaf): the
        ``extra_loss`` of :func:`nn.training.train`.  Float32 on theta's device."""
        th = self._leaf if (self._leaf is not None and self.training) else self.theta
        return (self.lam_now * self.cost(th * self.alive)).float()

    def marginal_costs(self, lam: float | None = None) -> torch.Tensor:
        """``lam * dR/dtheta_s`` at the current theta (``lam`` None: the price now,
        ``lam_now``): the automatic regularisation weight of every gate (0 for dead ones)."""
        scale = self.lam_now if lam is None else lam
        g = C.marginal(lambda th: scale * self.cost(th), self.theta * self.alive)
        return g.float() * self.alive

    # ---------------------------------------------------------------- masks
    def deterministic_masks(self) -> dict[str, torch.Tensor]:
        """``{family: bool mask}`` (one entry per structure) of the deterministic network:
        :meth:`deterministic_keep`, each unit gate's entry repeated over its units."""
        keep = self.deterministic_keep().cpu()
        return {g.name: g.units(keep) for g in self.gates}

    def deterministic_keep(self) -> torch.Tensor:
        """One bool per gate (theta's layout): a gate is on iff it is alive and ``theta >=
        0.5``; a unit family left empty keeps its alive gate of largest theta (the block gate,
        not the unit gates, removes a block); a family with no live gate (its block is dead)
        keeps nothing."""
        alive = self.alive.cpu()
        keep = alive & (self.theta.cpu() >= 0.5)
        th = torch.where(alive, self.theta.cpu(), -1.0)
        for g in self.gates:
            if g.kind == "unit" and not keep[g.slice].any() and alive[g.slice].any():
                keep[g.start + int(th[g.slice].argmax())] = True
        return keep.to(self.theta.device)

    def _indices(self):
        """Per unit family: the alive channels (None when all are), cached until ``alive``
        changes."""
        key = self.alive.cpu().numpy().tobytes()
        if self._cache is None or self._cache[0] != key:
            alive = self.alive.cpu()
            idx = {}
            for g in self.gates:
                if g.kind == "unit":
                    a = g.units(alive)
                    idx[g.name] = None if bool(a.all()) else \
                        torch.nonzero(a).flatten().to(self.theta.device)
            self._cache = (key, idx)
        return self._cache[1]

    # ---------------------------------------------------------------- forward
    def forward(self, x, xi: torch.Tensor | None = None):
        """Logits.  Training: gates sampled (or ``xi``, a bool vector over all gates, forced:
        for exact enumeration in tests); eval: deterministic, every live gate multiplied by its
        theta (the mean-field network: the first moments the BN statistics were gathered
        under; at theta in {0, 1}, e.g. after :meth:`round_`, exactly the pruned network)."""
        idx = self._indices()
        if self.training:
            self._leaf = self.theta.detach().clone().requires_grad_(True)
            if xi is None:
                xi = torch.rand_like(self.theta) < self.theta
            elif xi.shape != self.theta.shape or xi.dtype != torch.bool:
                raise ValueError(f"xi must be a bool tensor of shape {tuple(self.theta.shape)}, "
                                 f"got {xi.dtype} {tuple(xi.shape)}")
            xi = xi.to(self.theta.device) & self.alive
            self._xi = xi
            mult, compute = multipliers(self.estimator, xi, self._leaf, self.alive)
        else:  # mean field: every live gate scaled by theta (exactly the 0/1 net at vertices)
            mult = self.theta * self.alive
            compute = self.alive.tolist()
        # flip and batched re-run only the blocks after a flipped gate, from these inputs
        self._inputs = [] if (self.training and self.estimator in ("flip", "batched")) else None
        return self._tail(self._stem(x, mult), 0, mult, compute, idx, self._inputs)

    def _stem(self, x, mult, bn_groups: int = 1):
        stem = self.by_name.get("conv1")  # ResNet-50 stem filters: multiplied, never sliced
        return fwd.stem(self.net, x, None if stem is None else stem.units(mult), bn_groups)

    def _tail(self, h, start, mult, compute, idx, inputs=None):
        """Blocks ``start:`` and the head on ``h`` (the input of block ``start``), with gate
        multipliers ``mult``, ``compute`` (per gate: is its branch computed) and the alive
        channel indices ``idx``; appends every block's input to ``inputs`` when given."""
        for pos in range(start, len(self.layout.blocks)):
            if inputs is not None:
                inputs.append(h)
            h = self._block(pos, h, mult, compute, idx)
        return fwd.head(self.net, h)

    def _block(self, pos, h, mult, compute, idx, bn_groups: int = 1):
        """Block ``pos`` on its input ``h``: gate multipliers ``mult`` (one per gate, or one
        row per sample: ``(batch, gates)``), ``compute`` and ``idx`` as :meth:`_tail`,
        ``bn_groups`` ghost batches (:mod:`nn.models.resnet.forward`).  A skipped block is its
        identity shortcut: its input is a ReLU output, ``relu(x + 0) = x``."""
        info = self.layout.blocks[pos]
        modules = self._modules_by_name
        bgate = self.by_name.get(f"block.{info.name}")
        if bgate is not None and not compute[bgate.start]:
            return h
        select, scales = [], []
        for conv in info.convs[:-1]:
            gate = self.by_name[conv]
            sel, m = idx[gate.name], gate.units(mult)
            select.append(sel)
            scales.append(m if sel is None else m[..., sel])
        layers = [(modules[c], modules[b]) for c, b in zip(info.convs, info.bns)]
        out = None if bgate is None else (mult[bgate.start] if mult.dim() == 1 else
                                           mult[:, bgate.start:bgate.start + 1])
        return fwd.block(h, modules[info.name].downsample, layers, select=select + [None],
                         scales=scales, out_scale=out, bn_groups=bn_groups)

    # ---------------------------------------------------------------- gradient and update
    def theta_gradient(self, ce: torch.Tensor, batch=None) -> torch.Tensor:
        """The step's gradient estimate w.r.t. theta, after ``backward()`` of a loss that
        contained ``ce`` (this step's cross-entropy, detached) and possibly :meth:`penalty`:
        the leaf's gradient (straight-through and the exact cost part) plus, for ``reinforce``,
        ``(ce - baseline) * score`` (the baseline is updated), for ``flip`` the conditional
        differences on ``batch`` (``(x, y)``, the step's; required).  See :mod:`.estimators`."""
        return theta_gradient(self, ce, batch)

    @torch.no_grad()
    def proposed_theta(self, grad: torch.Tensor, lr: float, precondition: bool = True):
        """theta after the projected-SGD step of :meth:`step_theta` on ``grad``, before any
        gate dies (live, unpinned gates move; the others keep their theta)."""
        return projected_step(self.theta, self.alive & ~self.pinned, self.unit_cost, grad, lr,
                              precondition)

    @torch.no_grad()
    def step_theta(self, grad: torch.Tensor, lr: float, precondition: bool = True,
                   price: torch.Tensor | None = None) -> int:
        """Projected SGD: ``theta <- clip(theta - lr P grad, 0, 1)`` on live, unpinned gates,
        with ``P = diag(1 / unit_cost)`` (every gate's marginal cost at theta = 1) when
        ``precondition``, else ``P = I``.  A gate reaching 0 dies for good, except a unit
        family's last live gate, which is pinned at 1.  Returns the number of gates that died.

        With ``batched``, one estimate cannot kill a gate: theta follows each gate's running
        average (:meth:`record`), and a gate at 0 dies only on evidence
        (:meth:`evidence_useless` against its marginal price now: ``price``, default ``lam
        dR/dtheta``; under a stated budget, the budget's price, :mod:`.budget`); until then
        it stays alive at theta = 0 -- sampled off in training, still flipped on by the estimator,
        so it comes back if its value rises above its price.

        Why precondition: a block's marginal cost is the sum of its units', so plain SGD moves
        block gates (width of the block) times faster than unit gates and removes blocks soon
        after the warm-up, before the network has learned what to keep.  A positive diagonal
        rescaling keeps the descent direction and the fixed points (KKT points on the box);
        under the cost alone every gate then moves at ``lr * lam`` per step, and the
        cross-entropy gradient counts per unit of cost."""
        free = self.alive & ~self.pinned
        new = self.proposed_theta(grad, lr, precondition)
        dying = free & (new <= 0)
        if self.estimator == "batched" and bool(dying.any()):
            if price is None:
                with torch.enable_grad():
                    price = self.marginal_costs()
            arrived = dying & (self.theta > 0)  # just reached 0: judge it on what follows
            self.est_n.masked_fill_(arrived, 0)
            dying &= self.evidence_useless(price) & ~arrived
        died = 0
        if bool(dying.any()):
            d = dying.cpu()
            alive = self.alive.cpu()
            for g in self.gates:
                if g.kind != "unit" or not d[g.slice].any():
                    continue
                left = alive[g.slice] & ~d[g.slice]
                if not left.any():  # keep the unit with the largest theta before the step
                    th = torch.where(alive[g.slice], self.theta[g.slice].cpu(), -1.0)
                    j = g.start + int(th.argmax())
                    d[j] = False
                    self.pinned[j] = True
                    new[j] = 1.0
            dying = d.to(self.alive.device)
            died = int(d.sum())
        self.alive &= ~dying
        for b, units in self._block_units.items():  # a dead block's units go with it
            if not bool(self.alive[b]) and bool(self.alive[units].any()):
                self.alive[units] = False
        self.theta.copy_(torch.where(self.alive, new, torch.zeros_like(new)))
        return died

    @torch.no_grad()
    def round_(self) -> dict:
        """Make every gate deterministic: ``theta <- 1`` where :meth:`deterministic_masks` keeps
        it, else 0 (and dead).  Returns how many gates were rounded up and down from strictly
        between 0 and 1."""
        keep = self.deterministic_keep()
        frac = (self.theta > 0) & (self.theta < 1) & self.alive
        info = {"rounded_up": int((frac & keep).sum()), "rounded_down": int((frac & ~keep).sum()),
                "rule_text": "theta >= 0.5 kept; a kept block's empty unit family keeps its "
                        "largest-theta unit"}
        self.alive &= keep
        for b, units in self._block_units.items():  # a removed block's units go with it
            if not bool(self.alive[b]):
                self.alive[units] = False
        self.theta.copy_(self.alive.to(self.theta.dtype))
        return info

    def stats(self) -> dict:
        """Per-epoch numbers: expected MACs/params/blocks, MACs/params of the deterministic
        network, MACs of the live network (what a training step computes: every structure not
        yet dead), live units (``group`` per live unit gate) and block gates, mean theta of
        live gates."""
        with torch.no_grad():
            e = self.expected()
            keep = self.deterministic_keep().to(self.theta.dtype)
            d = self.expected(keep)
            a = self.alive
            live = self.expected(a.to(self.theta.dtype))
            nu = self.n_units
            return {"exp_macs": float(e["macs"]), "exp_params": float(e["params"]),
                    "exp_blocks": float(e["blocks"]), "det_macs": float(d["macs"]),
                    "det_params": float(d["params"]), "det_blocks": float(d["blocks"]),
                    "live_macs": float(live["macs"]),
                    "units_alive": int(a[:nu].sum()) * self.group,
                    "blocks_alive": int(a[nu:].sum()),
                    "theta_mean": float(self.theta[a].mean()) if bool(a.any()) else 0.0,
                    "cost": float(self.cost())}

    def theta_by_family(self) -> dict[str, list[float]]:
        return {g.name: [round(float(v), 5) for v in self.theta[g.slice].tolist()]
                for g in self.gates}
