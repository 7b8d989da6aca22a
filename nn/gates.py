"""Variational Bernoulli gates on units and residual blocks (DESIGN §6): the gated network.

:class:`GatedResNet` wraps a dense :class:`~nn.models.ResNet` and puts a gate
``xi_s ~ Bernoulli(theta_s)`` on

* every **unit**: an output channel of a ``filter`` family (:mod:`nn.structures`: ``conv1`` of a
  BasicBlock, ``conv1``/``conv2`` of a Bottleneck, the ResNet-50 stem), multiplying the channel
  after BN + ReLU;
* every **removable block** (identity shortcut): ``relu(x + xi_b * branch(x))``.

All gates live in one flat vector ``theta`` (units family by family, then blocks; buffers, so
checkpoints and ``--resume`` carry them).  In ``train()`` one gate pattern is sampled per forward
pass (per mini-batch); in ``eval()`` the network is deterministic: every live gate multiplies by
its ``theta`` (mean field), which at ``theta`` in {0, 1} is the 0/1 network itself.  The final
network is :meth:`GatedResNet.deterministic_masks` (``theta >= 0.5``; a kept block keeps at
least its best unit), made exact by :meth:`GatedResNet.round_`.  A structure is **dead** once
its ``theta`` reached 0: it is never computed again (dead units are sliced out of the
convolutions and BNs, dead blocks skipped), so training gets faster as it prunes.  ``pinned``
units are a family's last live unit: the unit gates never remove it (``theta`` held at 1); only
the block gate can.

**Cost** (exact, differentiable, multilinear in ``theta`` because gates are independent)::

    R(theta) = (1 - beta) E[MACs] / MACs0 + beta E[params] / params0 + gamma E[blocks] / B

Every parameter tensor depends on at most one unit family through its output axis, one through
its input axis and one block, so ``E[cost of the tensor] = full * theta_b * (sum of the out
family's theta / its size) * (same for the in family)`` (:meth:`GatedResNet.expected`); it equals
:func:`nn.count_macs`/:func:`nn.count_params` of the compressed model at every vertex where
each kept block keeps a unit in each of its unit families -- every network this pruner outputs
(:meth:`GatedResNet.deterministic_masks`).  A kept block whose inner family is entirely off is a
"cut branch" that :func:`nn.compress` folds into a constant, which ``expected`` still charges
for the layers after the cut (the gradient then still sees their price).  The
automatic per-structure regularisation weight is ``lam * dR/dtheta_s`` (its marginal expected
cost, recomputed every step by autograd; :meth:`GatedResNet.marginal_costs`).

**Gradient estimators** of ``d E[CE] / d theta`` (``estimator``):

``flip``       (default) the exact conditional difference on the step's batch, ``CE(xi_s = 1,
               xi_-s) - CE(xi_s = 0, xi_-s)`` with the other gates as sampled: unbiased at
               every theta (E[CE] is multilinear) and free of other gates' noise.  Each costs
               one extra train-mode pass (no grad, BN running statistics frozen) over the
               blocks from gate s's own block on (the earlier blocks' outputs are reused), for
               ``flip_units`` live unit gates and ``flip_blocks`` live block gates drawn at
               random per step (default 4 and 2; None: all), their estimates scaled by (live
               gates / drawn) to stay unbiased.
``st``         straight-through (free): the forward multiplies by ``xi + theta -
               stopgrad(theta)``, so the gradient is ``dCE/dxi`` at the sample -- biased (it
               linearises ``CE(xi_s=1) - CE(xi_s=0)``), low variance; needs the branch of a
               block sampled off, so it saves no compute on sampled-off gates.  With few live
               units left in a family, the whole family can be sampled off; the next
               train-mode BN then sees zero variance and dCE/dxi is inflated by about
               1/sqrt(eps) on that step (``benchmarks/gate_estimators.py`` shows the spread).
               It fails the planted-structure test (``tests/test_nn_planted.py``; 1 of 10
               seeds): at xi = 1 a confidently wrong network lowers its CE by shrinking any
               branch, so dCE/dxi can have the wrong sign for a needed block.
``reinforce``  score function with a moving-average baseline ``b`` (unbiased for ``0 < theta
               < 1``): ``(CE - b) (xi - theta) / (theta (1 - theta))``; blocks sampled off are
               skipped.  High variance with many gates: one needed gate sampled off moves the
               CE of the step, and that lands on every other gate's estimate.

All three are checked against exact enumeration on a toy network (tests, ``benchmarks/
gate_estimators.py``).  The gates themselves cost no pass over the activations
(:meth:`GatedResNet._tail`).  :mod:`nn.variational` runs the training around this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn as tnn

from nn.complexity import count_macs, count_params, layer_macs
from nn.models import ResNet
from nn.structures import build_families, layout

__all__ = ["ESTIMATORS", "GatedResNet"]

ESTIMATORS = ("st", "reinforce", "flip")
DEFAULT_ESTIMATOR, DEFAULT_FLIP_UNITS, DEFAULT_FLIP_BLOCKS = "flip", 4, 2


@dataclass(frozen=True)
class _Gate:
    """A gated family: ``name`` (its Family name), ``kind`` (``unit``/``block``), its slice
    ``start:start+size`` of ``theta``."""

    name: str
    kind: str
    start: int
    size: int

    @property
    def slice(self) -> slice:
        return slice(self.start, self.start + self.size)


class GatedResNet(tnn.Module):
    """A dense ResNet with Bernoulli gates; see the module docstring.

    ``net`` (kept as ``self.net``, trained in place), ``input_size`` (channels, height, width:
    for the MAC counts), ``lam``/``beta``/``gamma`` (the cost), ``theta_init`` (every gate's
    initial keep probability, in (0, 1]), ``estimator`` (:data:`ESTIMATORS`),
    ``baseline_decay`` (the REINFORCE baseline's moving average), ``flip_units`` and
    ``flip_blocks`` (unit and block gates flipped per step by the ``flip`` estimator, drawn
    at random among the live ones; None: all).
    """

    def __init__(self, net: ResNet, input_size, *, lam: float = 1.0, beta: float = 0.0,
                 gamma: float = 0.0, theta_init: float = 1.0,
                 estimator: str = DEFAULT_ESTIMATOR, baseline_decay: float = 0.9,
                 flip_units: int | None = DEFAULT_FLIP_UNITS,
                 flip_blocks: int | None = DEFAULT_FLIP_BLOCKS):
        super().__init__()
        if not isinstance(net, ResNet):
            raise ValueError(f"GatedResNet wraps a dense nn.models.ResNet, got "
                             f"{type(net).__name__}")
        for label, v, lo, hi in (("lam", lam, 0, None), ("beta", beta, 0, 1),
                                 ("gamma", gamma, 0, None), ("theta_init", theta_init, 0, 1),
                                 ("baseline_decay", baseline_decay, 0, 1)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < lo or \
                    (hi is not None and v > hi) or v != v:
                raise ValueError(f"{label} must be a number in [{lo}, {hi or 'inf'}], got {v!r}")
        if theta_init <= 0:
            raise ValueError(f"theta_init must be in (0, 1], got {theta_init!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        for label, v in (("flip_units", flip_units), ("flip_blocks", flip_blocks)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{label} must be None or an int >= 1, got {v!r}")
        self.flip_units, self.flip_blocks = flip_units, flip_blocks
        self.net = net
        self.lam, self.beta, self.gamma = float(lam), float(beta), float(gamma)
        self.estimator, self.baseline_decay = estimator, float(baseline_decay)
        self.input_size = tuple(input_size)
        self.families = build_families(net, layer_macs(net, self.input_size))
        self.layout = layout(net)
        self._modules_by_name = dict(net.named_modules())  # a plain dict: not registered
        self._bns = [m for m in self._modules_by_name.values()
                     if isinstance(m, tnn.modules.batchnorm._BatchNorm)]
        gates, start = [], 0
        for kind, fkind in (("unit", "filter"), ("block", "block")):
            for f in self.families:
                if f.kind == fkind:
                    gates.append(_Gate(f.name, kind, start, f.size))
                    start += f.size
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
        self._build_cost_table()
        self._leaf = None     # theta as a leaf of this step's graph (training forward)
        self._xi = None       # this step's sample
        self._cache = None    # (alive bytes, {family: index tensor or None})
        self._inputs = None   # flip: the block inputs of this step's forward

    # ---------------------------------------------------------------- the exact expected cost
    def _build_cost_table(self) -> None:
        """Per parameter tensor: full params, full MACs, out/in unit family, block (-1: none)."""
        fam_index = {g.name: i for i, g in enumerate(self.gates) if g.kind == "unit"}
        out_of, in_of, block_of = {}, {}, {}
        for f in self.families:
            if f.kind == "filter":
                for p in f.writers:
                    out_of[p.param] = fam_index[f.name]
                for p in f.readers:
                    in_of[p.param] = fam_index[f.name]
            elif f.kind == "block":
                for p in f.writers:
                    block_of[p.param] = self.by_name[f.name].start
        lmacs = layer_macs(self.net, self.input_size)
        rows = []
        for name, p in self.net.named_parameters():
            mod = name.rsplit(".", 1)[0]
            macs = lmacs.get(mod, 0) if name.endswith(".weight") else 0
            rows.append((p.numel(), macs, out_of.get(name, -1), in_of.get(name, -1),
                         block_of.get(name, -1)))
        t = torch.tensor(rows, dtype=torch.float64)
        self.register_buffer("_cost_full", t[:, :2].clone(), persistent=False)
        self.register_buffer("_cost_idx", t[:, 2:].long(), persistent=False)
        units = [g for g in self.gates if g.kind == "unit"]
        fam_of = torch.cat([torch.full((g.size,), i) for i, g in enumerate(units)]) \
            if units else torch.zeros(0, dtype=torch.long)
        self.register_buffer("_fam_of", fam_of.long(), persistent=False)
        self.register_buffer("_fam_size", torch.tensor([float(g.size) for g in units],
                                                       dtype=torch.float64), persistent=False)
        self.n_units = int(fam_of.numel())
        self.n_blocks = sum(1 for g in self.gates if g.kind == "block")
        self.dense_macs = count_macs(self.net, self.input_size)
        self.dense_params = count_params(self.net)
        ones = torch.ones(self.theta.shape, dtype=torch.float64, requires_grad=True)
        (unit,) = torch.autograd.grad(self.cost(ones), ones)
        self.register_buffer("unit_cost", unit.float().clamp_min(1e-12), persistent=False)
        """``dR/dtheta_s`` at theta = 1 (without lam): gate s's full normalised cost."""

    def expected(self, theta: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``macs``, ``params``, ``blocks``: exact expectations under independent gates with
        keep probabilities ``theta`` (default: the current ones; dead gates count as 0)."""
        th = (self.theta * self.alive) if theta is None else theta
        th = th.to(torch.float64)
        units, blocks = th[:self.n_units], th[self.n_units:]
        frac = torch.zeros_like(self._fam_size).index_add(0, self._fam_of, units) / self._fam_size
        one = th.new_ones(1)
        fam = torch.cat([frac, one])            # index -1 -> 1 (not gated)
        blk = torch.cat([th, one])
        out_f, in_f, b = (self._cost_idx[:, k] for k in range(3))
        factor = fam[out_f] * fam[in_f] * blk[b]
        full = self._cost_full
        return {"params": (full[:, 0] * factor).sum(), "macs": (full[:, 1] * factor).sum(),
                "blocks": blocks.sum()}

    def cost(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        """``R(theta)`` (module docstring), without ``lam``."""
        e = self.expected(theta)
        r = (1 - self.beta) * e["macs"] / self.dense_macs + self.beta * e["params"] / \
            self.dense_params
        if self.gamma and self.n_blocks:
            r = r + self.gamma * e["blocks"] / self.n_blocks
        return r

    def penalty(self) -> torch.Tensor:
        """``lam * R`` of this step's theta (differentiable through the step's leaf): the
        ``extra_loss`` of :func:`nn.train.train`.  Float32 on theta's device."""
        th = self._leaf if (self._leaf is not None and self.training) else self.theta
        return (self.lam * self.cost(th * self.alive)).float()

    def marginal_costs(self) -> torch.Tensor:
        """``lam * dR/dtheta_s`` at the current theta: the automatic regularisation weight of
        every gate (0 for dead ones)."""
        th = (self.theta * self.alive).detach().double().requires_grad_(True)
        (g,) = torch.autograd.grad(self.lam * self.cost(th), th)
        return g.float() * self.alive

    # ---------------------------------------------------------------- masks
    def deterministic_masks(self) -> dict[str, torch.Tensor]:
        """``{family: bool mask}`` of the deterministic network: a gate is on iff it is alive and
        ``theta >= 0.5``; a unit family left empty keeps its alive unit of largest theta (the
        block gate, not the unit gates, removes a block); a family with no live unit (its block
        is dead) keeps nothing."""
        on = (self.alive & (self.theta >= 0.5)).cpu()
        alive = self.alive.cpu()
        th = torch.where(alive, self.theta.cpu(), -1.0)
        out = {}
        for g in self.gates:
            m = on[g.slice].clone()
            if g.kind == "unit" and not m.any() and alive[g.slice].any():
                m[int(th[g.slice].argmax())] = True
            out[g.name] = m
        return out

    def deterministic_keep(self) -> torch.Tensor:
        """:meth:`deterministic_masks` as one bool vector over all gates (theta's layout)."""
        masks = self.deterministic_masks()
        return torch.cat([masks[g.name] for g in self.gates]).to(self.theta.device)

    def _indices(self):
        """Per unit family: the alive channels (None when all are), cached until ``alive``
        changes."""
        key = self.alive.cpu().numpy().tobytes()
        if self._cache is None or self._cache[0] != key:
            alive = self.alive.cpu()
            idx = {}
            for g in self.gates:
                if g.kind == "unit":
                    a = alive[g.slice]
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
        if self.training:
            idx = self._indices()
            self._leaf = self.theta.detach().clone().requires_grad_(True)
            if xi is None:
                xi = torch.rand_like(self.theta) < self.theta
            elif xi.shape != self.theta.shape or xi.dtype != torch.bool:
                raise ValueError(f"xi must be a bool tensor of shape {tuple(self.theta.shape)}, "
                                 f"got {xi.dtype} {tuple(xi.shape)}")
            xi = xi.to(self.theta.device) & self.alive
            self._xi = xi
            xf = xi.to(self.theta.dtype)
            mult = xf + self._leaf - self._leaf.detach() if self.estimator == "st" else xf
            # st needs every live branch (its gradient); the others skip the sampled-off ones
            compute = (self.alive if self.estimator == "st" else xi).tolist()
        else:  # mean field: every live gate scaled by theta (exactly the 0/1 net at vertices)
            idx = self._indices()
            mult = self.theta * self.alive
            compute = self.alive.tolist()

        # flip re-runs only the blocks after a flipped gate, from these saved block inputs
        self._inputs = [] if (self.training and self.estimator == "flip") else None
        return self._tail(self._stem(x, mult), 0, mult, compute, idx, self._inputs)

    def _stem(self, x, mult):
        net = self.net
        h = F.relu(net.bn1(net.conv1(x)), inplace=True)
        stem = self.by_name.get("conv1")
        if stem is not None:  # ResNet-50 stem filters: multiplied after the ReLU (folded
            # into bn1, st's gradient at a gate sampled off would be relu'(0) = 0), never sliced
            h = h * mult[stem.slice].to(h.dtype)[None, :, None, None]
        return net.maxpool(h)

    def _tail(self, h, start, mult, compute, idx, inputs=None):
        """Blocks ``start:`` and the head on ``h`` (the input of block ``start``), with gate
        multipliers ``mult``, ``compute`` (per gate: is its branch computed) and the alive
        channel indices ``idx``; appends every block's input to ``inputs`` when given.

        No gate costs a pass over the activations: a unit's multiplier scales the input
        channel of the conv that reads it (``conv(relu(a) * m) = conv_{W * m}(relu(a))``), a
        block's scales the affine terms of its last BN (``bn(z) * m``) -- both exact, the
        gradient w.r.t. the multipliers included."""
        net, modules = self.net, self._modules_by_name
        for info in self.layout.blocks[start:]:
            if inputs is not None:
                inputs.append(h)
            blk = modules[info.name]
            bgate = self.by_name.get(f"block.{info.name}")
            if bgate is not None and not compute[bgate.start]:
                continue  # identity shortcut, input is a ReLU output: relu(x + 0) = x
            idn = h if blk.downsample is None else blk.downsample(h)
            out, prev, prev_mult = h, None, None
            k = len(info.convs)
            for i in range(k):
                conv, bn = modules[info.convs[i]], modules[info.bns[i]]
                gate = self.by_name.get(info.convs[i]) if i < k - 1 else None
                sel = idx[gate.name] if gate is not None else None
                w = conv.weight
                if sel is not None:
                    w = w.index_select(0, sel)
                if prev is not None:
                    w = w.index_select(1, prev)
                if prev_mult is not None:
                    w = w * prev_mult.to(w.dtype)[None, :, None, None]
                out = F.conv2d(out, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
                last = i == k - 1
                out = _gated_bn(bn, out, sel, mult[bgate.start] if last and bgate else None)
                if not last:
                    out = F.relu(out, inplace=True)
                    prev_mult = mult[gate.slice] if sel is None else mult[gate.slice][sel]
                prev = sel
            h = F.relu(out + idn, inplace=True)
        return net.fc(torch.flatten(net.avgpool(h), 1))

    # ---------------------------------------------------------------- gradient and update
    def theta_gradient(self, ce: torch.Tensor, batch=None) -> torch.Tensor:
        """The step's gradient estimate w.r.t. theta, after ``backward()`` of a loss that
        contained ``ce`` (this step's cross-entropy, detached) and possibly :meth:`penalty`:
        the leaf's gradient (straight-through and the exact cost part) plus, for ``reinforce``,
        ``(ce - baseline) * score`` (the baseline is updated), for ``flip`` the conditional
        differences on ``batch`` (``(x, y)``, the step's; required)."""
        if self._leaf is None:
            raise RuntimeError("theta_gradient needs a training-mode forward pass first")
        g = self._leaf.grad
        g = torch.zeros_like(self.theta) if g is None else g.detach().clone()
        if self.estimator == "flip":
            if batch is None:
                raise ValueError("the flip estimator needs the step's batch (x, y)")
            return g + self._flip_differences(ce, *batch)
        if self.estimator == "reinforce":
            th, xi = self.theta, self._xi.to(self.theta.dtype)
            inner = (th > 0) & (th < 1) & self.alive
            score = torch.where(inner, (xi - th) / (th * (1 - th)).clamp_min(1e-12),
                                torch.zeros_like(th))
            ce = ce.detach().to(th.dtype)
            base = torch.where(self.baseline_set, self.baseline, ce)
            g = g + (ce - base) * score
            with torch.no_grad():
                self.baseline.copy_(self.baseline_decay * base + (1 - self.baseline_decay) * ce)
                self.baseline_set.fill_(True)
        return g

    @torch.no_grad()
    def _flip_differences(self, ce: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        """``w_s (CE(xi_s=1) - CE(xi_s=0))`` for the live unpinned gates drawn this step
        (``flip_units`` units and ``flip_blocks`` blocks, ``w_s`` = live gates of that kind /
        drawn; the others 0), each from one extra train-mode pass with gate s flipped that
        re-runs only the blocks from gate s's own block on (the earlier ones are unchanged: their
        saved outputs are reused); BN running statistics are left untouched (momentum 0)."""
        xi, inputs = self._xi, self._inputs
        if inputs is None or len(inputs) != len(self.layout.blocks):
            raise RuntimeError("flip needs the block inputs of this step's training forward")
        free = (self.alive & ~self.pinned).cpu()
        flips = _draw(torch.nonzero(free[:self.n_units]).flatten(), self.flip_units) + \
            _draw(torch.nonzero(free[self.n_units:]).flatten() + self.n_units, self.flip_blocks)
        out = torch.zeros_like(self.theta)
        bns = self._bns
        saved = [m.momentum for m in bns]
        on = xi.tolist()
        idx = self._indices()
        ce = ce.detach().float()
        try:
            for m in bns:
                m.momentum = 0.0
            for s, w in flips:
                flipped = xi.clone()
                flipped[s] = not on[s]
                mult, compute = flipped.to(self.theta.dtype), list(on)
                compute[s] = not on[s]
                pos = self._gate_block[s]
                h = self._stem(x, mult) if pos < 0 else inputs[pos].detach()
                other = F.cross_entropy(self._tail(h, max(pos, 0), mult, compute, idx).float(), y)
                out[s] = w * ((ce - other) if on[s] else (other - ce))
        finally:
            for m, mom in zip(bns, saved):
                m.momentum = mom
            self._inputs = None  # used once: do not hold the step's activations any longer
        return out

    @torch.no_grad()
    def step_theta(self, grad: torch.Tensor, lr: float, precondition: bool = True) -> int:
        """Projected SGD: ``theta <- clip(theta - lr P grad, 0, 1)`` on live, unpinned gates,
        with ``P = diag(1 / unit_cost)`` (:attr:`unit_cost`: every gate's marginal cost at
        theta = 1) when ``precondition``, else ``P = I``.  A gate reaching 0 dies for good,
        except a unit family's last live unit, which is pinned at 1.  Returns the number of
        gates that died.

        Why precondition: a block's marginal cost is the sum of its units', so plain SGD moves
        block gates 16-64x faster than unit gates and removes blocks within a few dozen steps
        of the warm-up's end, before the network has learned what to keep.  A positive diagonal
        rescaling keeps the descent direction and the fixed points (KKT points on the box);
        under the cost alone every gate then moves at ``lr * lam`` per step, and the
        cross-entropy gradient counts per unit of cost."""
        free = self.alive & ~self.pinned
        step = grad / self.unit_cost if precondition else grad
        new = torch.where(free, (self.theta - lr * step).clamp(0.0, 1.0), self.theta)
        dying = free & (new <= 0)
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
        yet dead), live units and blocks, mean theta of live gates."""
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
                    "units_alive": int(a[:nu].sum()), "blocks_alive": int(a[nu:].sum()),
                    "theta_mean": float(self.theta[a].mean()) if bool(a.any()) else 0.0,
                    "cost": float(self.cost())}

    def theta_by_family(self) -> dict[str, list[float]]:
        return {g.name: [round(float(v), 5) for v in self.theta[g.slice].tolist()]
                for g in self.gates}


def _draw(gates: torch.Tensor, k: int | None) -> list[tuple[int, float]]:
    """``(gate, weight)`` pairs: ``k`` of ``gates`` drawn without replacement, each weighted
    ``len(gates) / k`` (so a sum over them is unbiased for the sum over all), or all of them
    with weight 1 (``k`` None or at least their number)."""
    n = gates.numel()
    if k is None or n <= k:
        return [(int(s), 1.0) for s in gates]
    return [(int(s), n / k) for s in gates[torch.randperm(n, device="cpu")[:k]]]


def _gated_bn(bn: tnn.BatchNorm2d, x: torch.Tensor, idx: torch.Tensor | None,
              scale: torch.Tensor | None) -> torch.Tensor:
    """``bn`` restricted to channels ``idx`` (None: all), its output multiplied by ``scale``
    (per channel or a scalar, folded into the affine terms; None: 1).  In training the running
    statistics (of ``x``, unscaled) of those channels are updated exactly as the full BN would
    update them."""
    w, b, rm, rv = bn.weight, bn.bias, bn.running_mean, bn.running_var
    if idx is not None:
        w, b, rm, rv = (t.index_select(0, idx) for t in (w, b, rm, rv))
    if scale is not None:
        scale = scale.to(w.dtype)
        w, b = w * scale, b * scale
    if not bn.training:
        return F.batch_norm(x, rm, rv, w, b, False, 0.0, bn.eps)
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else \
        1.0 / float(bn.num_batches_tracked)
    out = F.batch_norm(x, rm, rv, w, b, True, momentum, bn.eps)
    if idx is not None:
        with torch.no_grad():
            bn.running_mean.index_copy_(0, idx, rm)
            bn.running_var.index_copy_(0, idx, rv)
    return out
