"""The SPR regularizer in torch: the validated formula of :mod:`mipprune.penalty`, evaluated on
weight tensors, plus the recipe that sets its coefficients from a model.

Per group ``j`` (the writer slices of one prunable structure, see :mod:`nn.models`) with
``t = ||w_j||_2``, ``m = ||w_j||_inf``, ``c = sqrt(a_j / b_j)``::

    C1  max(m/M, c t) >= 1 :  a t^2 + b                (also beyond the box m > M: "extend")
    C2  m/M <= c t < 1     :  2 sqrt(a b) t
    C3  c t < m/M < 1      :  a M t^2 / m + b m / M

On a GPU a training step evaluates it flat (:mod:`nn.flat_penalty`): every group at once, in
29 tensor operations for any model, the formula in its clip form ``a t^2 / z* + b z*`` with
``z* = min(1, max(m/M, c t))`` and the gradient in closed form, added to ``.grad`` with one fused
addition (:meth:`SPRRegularizer.add_grad_`).  On the CPU, and in
:meth:`SPRRegularizer.group_penalties` and :meth:`~SPRRegularizer.case_stats`, the penalty *is*
``mipprune.penalty.spr`` called on torch tensors (array-API code, one copy, autograd through
double ``where``s); the tests hold the two paths equal in value and gradient.

Coefficients: ``a_j = lam alpha cost_j``, ``b_j = lam (1 - alpha) cost_j`` with ``cost_j`` the
run's price of structure ``j`` (:func:`nn.cost.structure_costs`: a weighted sum of its
normalised MACs, parameters and blocks, counted as what its removal saves or as its own
slices).  The SPR authors' code takes ``cost_j = n_j / N``, the group's own parameters over the
model's: ``CostConfig(macs=0, params=1, basis="own")``.
``M_j = M_scale * max|w|`` over the family's writer tensors (one conv-BN block for a filter
family) in a reference model.

Beyond ``M`` (``beyond_M``): ``"extend"`` uses C1 there (published behaviour; convex when
``c M >= 1``, with a concave kink at ``m = M`` when ``c M < 1``); ``"project"`` keeps weights in the box: call :meth:`SPRRegularizer.project_` after
every ``optimizer.step()`` (it clamps each writer tensor to ``[-M, M]``; a no-op for "extend",
so a training loop can always call it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn as tnn

from mipprune.penalty import C1, C2, C3, bigm_value, spr, spr_value
from nn.checks import FLOAT32_MAX, choice, integer, number
from nn.complexity import count_params, layer_macs
from nn.cost import CostConfig, structure_costs
from nn.flat_penalty import FlatPenalty, accumulate_grads_
from nn.models import KINDS, Family, build_families, group_weights
from nn.weights import check_shapes, read_state_dict

__all__ = ["spr_penalty", "bigm_penalty", "SPRConfig", "SPRRegularizer"]


def _checked(w, a, b, M):
    if not isinstance(w, torch.Tensor) or w.ndim != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D floating tensor (groups x weights), got "
                         f"{getattr(w, 'shape', type(w).__name__)}")
    out = []
    for label, x, low, strict in (("a", a, 0.0, False), ("b", b, 0.0, False),
                                  ("M", M, 0.0, True)):
        if isinstance(x, torch.Tensor):
            if x.ndim > 1 or (x.ndim == 1 and x.shape[0] != w.shape[0]):
                raise ValueError(f"{label} must be a scalar or have shape ({w.shape[0]},), "
                                 f"got {tuple(x.shape)}")
            x = x.to(dtype=w.dtype, device=w.device)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            if x < low or (strict and x == low) or x != x:
                raise ValueError(f"{label} must be {'>' if strict else '>='} 0, got {x!r}")
            x = float(x)
        else:
            raise ValueError(f"{label} must be a number or a tensor, got {type(x).__name__}")
        out.append(x)
    return out


def spr_penalty(w: torch.Tensor, a, b, M) -> torch.Tensor:
    """Per-group SPR of the rows of ``w`` (shape ``(groups,)``; see the module docstring).

    ``a``, ``b``, ``M``: scalars or per-group tensors.  Calls ``mipprune.penalty.spr_value``.
    """
    return spr_value(w, *_checked(w, a, b, M))


def bigm_penalty(w: torch.Tensor, a, b, M) -> torch.Tensor:
    """Per-group big-M relaxation penalty ``a ||w||^2 + b min(||w||_inf / M, 1)`` (the ablation;
    calls ``mipprune.penalty.bigm_value``)."""
    return bigm_value(w, *_checked(w, a, b, M))


_PENALTIES = {"spr": spr_penalty, "bigm": bigm_penalty}


@dataclass(frozen=True)
class SPRConfig:
    """Regularizer settings.  ``lam`` (λ >= 0) scales everything; ``alpha`` in [0, 1] splits it
    into ridge ``a`` and cost ``b``; ``M_scale > 0``; ``cost`` the price of a structure
    (:class:`nn.cost.CostConfig`); ``kinds`` the structure kinds regularized; ``beyond_M``
    ``"extend"`` | ``"project"``; ``penalty`` ``"spr"`` | ``"bigm"``; ``group``: one SPR
    group per ``group`` consecutive structures of a family (hardware-aligned widths: they are
    kept or removed together; every family's size must be a multiple).  The defaults are the
    pipeline's (``nn.methods.spr``)."""

    lam: float
    alpha: float = 0.1
    M_scale: float = 2.0
    cost: CostConfig = field(default_factory=CostConfig)
    kinds: tuple[str, ...] = ("filter",)
    beyond_M: str = "extend"
    penalty: str = "spr"
    group: int = 1

    def __post_init__(self):
        integer("group", self.group, 1)
        number("lam", self.lam, 0)
        number("alpha", self.alpha, 0, 1)
        number("M_scale", self.M_scale, 0, open_lo=True)
        if not isinstance(self.cost, CostConfig):
            raise ValueError(f"cost must be an nn.cost.CostConfig, got {self.cost!r}")
        kinds = tuple(self.kinds) if isinstance(self.kinds, (list, tuple)) else None
        if not kinds or any(k not in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
            raise ValueError(f"kinds must be distinct values of {KINDS}, got {self.kinds!r}")
        object.__setattr__(self, "kinds", kinds)
        choice("beyond_M", self.beyond_M, ("extend", "project"))
        choice("penalty", self.penalty, tuple(_PENALTIES))


def _reference_state(reference, model: tnn.Module, families: list[Family]) -> Mapping:
    """The tensors M is read from: the model's own, or ``reference``'s after checking that
    every writer tensor is there with the model's shape."""
    if reference is None:
        return dict(model.named_parameters())
    state = read_state_dict(reference)
    where = f" ({os.fspath(reference)})" if isinstance(reference, (str, os.PathLike)) else ""
    check_shapes(state, model.state_dict(), [p.param for f in families for p in f.writers],
                 f"reference weights{where}")
    return state


class SPRRegularizer:
    """The SPR (or big-M) penalty of a model's structures, as a loss term.

    ``reg = SPRRegularizer(model, SPRConfig(lam=...), input_size=(3, 32, 32), reference=None)``
    (``latency``: the marginal latencies a ``latency`` cost weight reads,
    :func:`nn.budget_latency.latency_cost`); in a training step either ``loss = ce + reg()``
    (autograd) or, faster, ``reg.add_grad_(scale)`` after ``loss.backward()`` (the gradient
    added into ``.grad`` directly; ``train(extra_grad=...)``), then ``reg.project_()`` after
    the optimizer step.  Both read the model's current parameters by name (the model may move
    between devices or memory formats).

    ``path`` (attribute): how the penalty is evaluated.  ``"flat"``: every group at once
    (:mod:`nn.flat_penalty`, 29 kernel launches a step whatever the model: what a GPU needs);
    ``"per-family"``: the formula of :mod:`mipprune.penalty` on each bucket of equal-width
    groups, gradient by autograd (a few hundred small operations but fewer passes over the
    weights: 1.5x faster than flat for ResNet-56 on 2 CPU threads, measured; a launch costs
    nothing there); ``"auto"`` (default): flat on a GPU, per-family on the CPU.  Same values
    and gradients to float32 rounding.
    """

    def __init__(self, model: tnn.Module, config: SPRConfig, input_size=(3, 32, 32),
                 reference=None, latency: dict | None = None):
        if not isinstance(config, SPRConfig):
            raise ValueError(f"config must be an SPRConfig, got {type(config).__name__}")
        self.model, self.config = model, config
        lm = layer_macs(model, input_size) if config.cost.macs > 0 else None
        every = build_families(model, lm)
        self.families: list[Family] = [f for f in every if f.kind in config.kinds]
        if not self.families:
            raise ValueError(f"model has no structures of kinds {config.kinds}")
        totals = {"params": count_params(model), "macs": sum(lm.values()) if lm else 1,
                  "blocks": sum(f.kind == "block" for f in every)}
        g = config.group
        uneven = [f.name for f in self.families if f.size % g]
        if uneven:
            raise ValueError(f"group {g} does not divide family {uneven[0]!r} "
                             f"({len(uneven)} families): choose a group size that divides them")
        self.cost = {n: c.reshape(-1, g).sum(1) for n, c in
                     structure_costs(self.families, config.cost, totals, latency).items()}
        ref = _reference_state(reference, model, self.families)
        self.a, self.b, self.M = {}, {}, {}
        tiny = torch.finfo(torch.float32).tiny
        for f in self.families:
            self.a[f.name] = config.lam * config.alpha * self.cost[f.name]
            self.b[f.name] = config.lam * (1 - config.alpha) * self.cost[f.name]
            top = max(float(ref[p.param].detach().abs().max()) for p in f.writers)
            if top == 0:
                raise ValueError(f"reference weights of {f.name!r} are all zero: M would be 0")
            self.M[f.name] = config.M_scale * top
            if not tiny <= self.M[f.name] <= FLOAT32_MAX:  # NaN fails too
                raise ValueError(f"M of {f.name!r} = M_scale {config.M_scale:g} x max|w| "
                                 f"{top:g} = {self.M[f.name]:g} is not a normal float32 (the "
                                 f"weights are trained in float32): choose M_scale (--M-scale) "
                                 f"so that M lies in [{tiny:g}, {FLOAT32_MAX:g}]")
        widths: dict[int, list[Family]] = {}
        params = dict(model.named_parameters())
        for f in self.families:
            widths.setdefault(self.weights(params, f).shape[1], []).append(f)
        self._buckets = [(fams, *(torch.cat([d[f.name] for f in fams]) for d in (
            self.a, self.b, {f.name: torch.full((f.size // g,), self.M[f.name],
                                                dtype=torch.float64) for f in fams})))
                         for fams in widths.values()]
        self._cache: dict = {}
        self.flat = FlatPenalty(model, self.families, g, self.a, self.b, self.M,
                                config.penalty)
        self.path = "auto"

    def _coeffs(self, i: int, like: torch.Tensor):
        key = (i, like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = tuple(x.to(dtype=like.dtype, device=like.device)
                                     for x in self._buckets[i][1:])
        return self._cache[key]

    def weights(self, params: dict, family: Family) -> torch.Tensor:
        """The SPR groups of ``family``: ``(size / group, group * k)``, row ``j`` the writer
        slices of structures ``j * group .. (j + 1) * group - 1`` concatenated."""
        w = group_weights(params, family)
        return w.reshape(family.size // self.config.group, -1)

    def _groups(self):
        params = dict(self.model.named_parameters())
        for i, (fams, *_) in enumerate(self._buckets):
            w = torch.cat([self.weights(params, f) for f in fams], dim=0)
            yield fams, w, self._coeffs(i, w)

    def group_penalties(self) -> dict[str, torch.Tensor]:
        """Per-group penalty of every regularized family (differentiable)."""
        fn, out = _PENALTIES[self.config.penalty], {}
        for fams, w, (a, b, M) in self._groups():
            for f, v in zip(fams, torch.split(fn(w, a, b, M), [f.size // self.config.group for f in fams])):
                out[f.name] = v
        return out

    def _flat_here(self) -> bool:
        if self.path != "auto":
            return self.path == "flat"
        return next(iter(self.model.parameters())).device.type != "cpu"

    def _per_family(self) -> torch.Tensor:
        fn = _PENALTIES[self.config.penalty]
        return sum(fn(w, a, b, M).sum() for _, w, (a, b, M) in self._groups())

    def __call__(self) -> torch.Tensor:
        """Total penalty: a 0-d differentiable loss term (nothing written into ``.grad``)."""
        return self.flat.value() if self._flat_here() else self._per_family()

    def add_grad_(self, scale: torch.Tensor | float | None = None) -> torch.Tensor:
        """Add the total penalty's gradient (times ``scale``, e.g. the AMP loss scale) into
        every regularized parameter's ``.grad`` in one fused addition; return the penalty
        (0-d, detached).  Call it after the backward pass of the rest of the loss."""
        if self._flat_here():
            return self.flat.add_grad_(scale)
        tensors = self.flat._tensors()
        with torch.enable_grad():
            value = self._per_family()
        grads = list(torch.autograd.grad(value, tensors))
        if scale is not None:
            torch._foreach_mul_(grads, scale)
        accumulate_grads_(tensors, grads)
        return value.detach()

    @torch.no_grad()
    def case_stats(self) -> dict[str, dict[str, float]]:
        """Share of groups in cases C1/C2/C3 of SPR (``mipprune.penalty.spr(...).case``) for every
        family and over all groups (key ``"all"``), plus the number of groups ``"n"``."""
        counts = {}
        for fams, w, (a, b, M) in self._groups():
            case = spr(w, a, b, M).case
            for f, c in zip(fams, torch.split(case, [f.size // self.config.group for f in fams])):
                counts[f.name] = [int((c == k).sum()) for k in (C1, C2, C3)]
        counts["all"] = [sum(v[i] for v in counts.values()) for i in range(3)]
        return {name: {"C1": v[0] / sum(v), "C2": v[1] / sum(v), "C3": v[2] / sum(v),
                       "n": sum(v)} for name, v in counts.items()}

    @torch.no_grad()
    def project_(self) -> None:
        """With ``beyond_M="project"``: clamp every writer tensor of each family to
        ``[-M, M]`` (call after ``optimizer.step()``).  No-op with ``"extend"``."""
        if self.config.beyond_M != "project":
            return
        params = dict(self.model.named_parameters())
        for f in self.families:
            for p in f.writers:
                params[p.param].clamp_(-self.M[f.name], self.M[f.name])
