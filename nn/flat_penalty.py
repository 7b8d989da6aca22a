"""The SPR (and big-M) penalty of every group at once, in a number of operations that does not
grow with the number of groups: the fast path of :class:`nn.regularizer.SPRRegularizer`.

Every writer tensor of the regularized families is read as one flat vector (one ``cat`` of
views, each tensor in its own memory order so that channels-last weights are views too); each
element carries the index of its group.  A scatter gives every group's ``m = ||w||_inf`` and
one ``index_add`` its ``s = ||w||_2^2`` (in float64) with the number of elements tied at the
maximum; the penalty and its gradient then follow from the clip form of the closed formula
(:mod:`mipprune.penalty`, whose three cases it reproduces):

    z* = min(1, max(u, c t)),  u = m / M,  c = sqrt(a / b),  t = sqrt(s)
    SPR = a s / z* + b z*                                   (C1 z* = 1, C2 z* = c t, C3 z* = u)
    dSPR/dw = (2 a / z*) w  +  [C3] (b - a s / z*^2) / M * e_k sign(w_k)

(Danskin: z* is optimal, so only a binding ``z* = u`` carries a derivative through m; ``e_k``
the maxima of ``|w|``, shared evenly among ties as ``amax``'s autograd does).  Beyond the box
(``u >= 1``) the C1 extension ``a s + b`` holds, as in :mod:`mipprune.penalty`.  The big-M
relaxation is ``a s + b min(u, 1)`` with gradient ``2 a w + [u < 1] b / M e_k sign(w_k)``.

Float64 for the squares and the group algebra: float32 weights square without underflow there,
so no rescaling is needed for tiny weights.  A training step uses :meth:`FlatPenalty.add_grad_`: the
value, and the gradient added straight into every ``.grad`` with one ``_foreach_add_`` after the
backward pass (an autograd term would add it to each parameter's gradient one kernel at a time).
:meth:`FlatPenalty.value` is the same value as a differentiable loss term.
"""

from __future__ import annotations

import torch
from torch import nn as tnn

from nn.models import Family

__all__ = ["FlatPenalty", "PENALTIES", "accumulate_grads_"]

PENALTIES = ("spr", "bigm")
_FLOOR = 1e-200
"""Added to ``u`` and bounding ``ties * m`` below: far under any non-zero float32 |w| (1.4e-45),
far above float64's underflow, so all-zero groups give finite coefficients (times w = 0)."""


def _memory_order(p: torch.Tensor) -> tuple[int, ...] | None:
    """A permutation of ``p``'s axes under which it is contiguous (its memory order), so that
    ``p.permute(perm).view(-1)`` is a view; None if it has gaps or overlaps."""
    perm = tuple(sorted(range(p.ndim), key=lambda d: (-p.stride(d), -d)))
    return perm if p.permute(perm).is_contiguous() else None


class FlatPenalty:
    """The penalty of the groups of ``families`` (``group`` consecutive structures per group)
    of ``model``; ``a``, ``b``, ``M``: per family, float64 tensors of one value per group (M may
    be a number).  ``kind``: ``"spr"`` or ``"bigm"``."""

    def __init__(self, model: tnn.Module, families: list[Family], group: int,
                 a: dict, b: dict, M: dict, kind: str = "spr"):
        if kind not in PENALTIES:
            raise ValueError(f"kind must be one of {PENALTIES}, got {kind!r}")
        self.model, self.kind, self.group = model, kind, group
        params = dict(model.named_parameters())
        self.names: list[str] = []  # each regularized tensor once
        self._pieces: list[tuple[int, int, int | None, int]] = []  # (tensor, offset, dim, fam size)
        offset, coeffs = 0, {"a": [], "b": [], "M": []}
        for f in families:
            n = f.size // group
            for p in f.writers:
                if p.param not in params:
                    raise ValueError(f"family {f.name!r}: no parameter {p.param!r}")
                if p.param not in self.names:
                    self.names.append(p.param)
                self._pieces.append((self.names.index(p.param), offset, p.dim, f.size))
            for key, d in (("a", a), ("b", b), ("M", M)):
                v = torch.as_tensor(d[f.name], dtype=torch.float64).reshape(-1)
                coeffs[key].append(v.expand(n) if v.numel() == 1 else v)
            offset += n
        self.n_groups = offset
        a_, b_, M_ = (torch.cat(coeffs[k]) for k in ("a", "b", "M"))
        # the per-group constants of the clip form: c = sqrt(a/b) (huge where b = 0: z* = 1)
        c = torch.where(b_ > 0, (a_ / torch.where(b_ > 0, b_, 1.0)).sqrt(),
                        torch.tensor(torch.finfo(torch.float64).max ** 0.5, dtype=torch.float64))
        self._const = {"a": a_, "b": b_, "two_a": 2 * a_, "inv_M": 1 / M_, "c": c,
                       "floor": torch.full_like(a_, _FLOOR), "one": torch.ones_like(a_)}
        self._layout: dict = {}

    # ---- layout: the flat vector and each element's group ----------------------------------

    def _tensors(self) -> list[torch.Tensor]:
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.names]

    def _plan(self, tensors: list[torch.Tensor]) -> dict:
        """Index tensors for the tensors' current shapes, strides and device (cached)."""
        key = tuple((tuple(t.shape), t.stride(), t.device) for t in tensors)
        plan = self._layout.get(key)
        if plan is not None:
            return plan
        device = tensors[0].device
        orders = [_memory_order(t) for t in tensors]
        starts, n = [], 0
        for t in tensors:
            starts.append(n)
            n += t.numel()
        elem, gid = [], []  # for every (element, group) pair: its flat position and group
        for i, off, dim, size in self._pieces:
            t, perm = tensors[i], orders[i]
            pos = torch.arange(starts[i], starts[i] + t.numel())
            if dim is None:
                g = torch.full(t.shape, off)
            else:
                shape = [1] * t.ndim
                shape[dim] = size
                g = (off + torch.arange(size) // self.group).reshape(shape).expand(t.shape)
            if perm is not None:
                g = g.permute(perm)
            elem.append(pos)
            gid.append(g.reshape(-1))
        elem_t, gid_t = torch.cat(elem), torch.cat(gid)
        plan = {"orders": orders, "sizes": [t.numel() for t in tensors], "n": n,
                # None: every element in exactly one group, in flat order (no gather needed)
                "elem": None if torch.equal(elem_t, torch.arange(n)) else elem_t.to(device),
                "gid": gid_t.to(device),
                "const": {k: v.to(device) for k, v in self._const.items()}}
        self._layout[key] = plan
        return plan

    def _flat(self, tensors, plan) -> torch.Tensor:
        """The elements as one vector: one ``cat`` of views (one batched kernel on CUDA)."""
        views = [t.detach().permute(o).view(-1) if o is not None else t.detach().reshape(-1)
                 for t, o in zip(tensors, plan["orders"])]
        flat = torch.cat(views)
        return flat if plan["elem"] is None else flat.index_select(0, plan["elem"])

    # ---- the penalty ---------------------------------------------------------------------------

    def _evaluate(self, scale=None):
        """``(value, g, tensors, plan)``: the summed penalty (0-d float64) and the gradient of
        every flat element (the tensors' dtype; times ``scale`` if given).
        29 tensor operations whatever the number of groups (``tests/test_flat_penalty.py``)."""
        tensors = self._tensors()
        plan = self._plan(tensors)
        k, gid, G = plan["const"], plan["gid"], self.n_groups
        w = self._flat(tensors, plan)  # the tensors' dtype
        aw = w.abs()
        m = torch.empty(G, dtype=w.dtype, device=w.device).scatter_reduce_(
            0, gid, aw, "amax", include_self=False)  # exact in any precision
        # squares in float64 (float32 ones underflow below 1e-19) and the ties at the maximum,
        # summed per group by one index_add into two columns
        cols = torch.empty(w.shape[0], 2, dtype=torch.float64, device=w.device)
        w64 = w.to(torch.float64)
        torch.mul(w64, w64, out=cols[:, 0])
        torch.eq(aw, m.index_select(0, gid), out=cols[:, 1])
        sums = torch.zeros(G, 2, dtype=torch.float64, device=w.device).index_add_(0, gid, cols)
        s, ties = sums[:, 0], sums[:, 1]
        u = torch.addcmul(k["floor"], m, k["inv_M"])  # m / M (+ a floor: no 0/0 below)
        if self.kind == "spr":
            z = torch.clamp(k["c"] * s.sqrt(), min=u, max=k["one"])  # z*
            q = k["a"] * s / z  # a s / z*
            value = torch.addcmul(q, k["b"], z).sum()
            A = k["two_a"] / z
            # d/dm only where z* = u binds (C3): b - a s / z*^2, zero on the C2|C3 boundary
            B = torch.addcdiv(k["b"], q, z, value=-1).mul_(z == u)
        else:
            value = torch.addcmul(k["a"] * s, k["b"], u.clamp(max=1.0)).sum()
            A, B = k["two_a"], k["b"] * (u < 1)
        # (B / M) e_k sign(w_k) / ties = w B / (M m ties) on the maxima: one coefficient each
        C = (B * k["inv_M"]).div_(torch.addcmul(k["floor"], ties, m))
        coef = torch.addcmul(A.index_select(0, gid), cols[:, 1], C.index_select(0, gid))
        if scale is not None:  # an AMP loss scale: one more operation
            coef.mul_(scale)
        g = torch.mul(coef, w, out=torch.empty_like(w))
        return value, g, tensors, plan

    def value(self) -> torch.Tensor:
        """The summed penalty as a differentiable 0-d loss term (closed-form gradient)."""
        tensors = self._tensors()
        return _Value.apply(self, *tensors)

    @torch.no_grad()
    def value_and_grad(self, scale=None) -> tuple[torch.Tensor, list, list]:
        """``(value, tensors, grads)``: the penalty (0-d float64) and its gradient with respect
        to each tensor (views of one buffer, each with its tensor's shape, strides and dtype;
        times ``scale`` if given)."""
        value, g, tensors, plan = self._evaluate(scale)
        if plan["elem"] is not None:  # a tensor in several groups: sum its elements' terms
            g = torch.zeros(plan["n"], dtype=g.dtype, device=g.device).index_add_(
                0, plan["elem"], g)
        grads = []
        for t, o, piece in zip(tensors, plan["orders"], g.split(plan["sizes"])):
            if o is None:
                grads.append(piece.view(t.shape))
            else:
                inv = [0] * len(o)
                for j, d in enumerate(o):
                    inv[d] = j
                grads.append(piece.view([t.shape[d] for d in o]).permute(inv))
        return value, tensors, grads

    @torch.no_grad()
    def add_grad_(self, scale: torch.Tensor | float | None = None) -> torch.Tensor:
        """Add the penalty's gradient (times ``scale``, e.g. an AMP loss scale) into every
        tensor's ``.grad``; return the value (0-d float64, detached)."""
        value, tensors, grads = self.value_and_grad(scale)
        accumulate_grads_(tensors, grads)
        return value


@torch.no_grad()
def accumulate_grads_(tensors: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """``t.grad += g`` for every pair in one fused ``_foreach_add_`` (``t.grad = g`` where it
    is None)."""
    have = [(t.grad, g) for t, g in zip(tensors, grads) if t.grad is not None]
    for t, g in zip(tensors, grads):
        if t.grad is None:
            t.grad = g.clone(memory_format=torch.preserve_format)
    if have:
        torch._foreach_add_([h for h, _ in have], [g for _, g in have])


class _Value(torch.autograd.Function):
    """The penalty as an autograd node whose backward is the closed-form gradient."""

    @staticmethod
    def forward(ctx, penalty: FlatPenalty, *tensors):
        value, _, grads = penalty.value_and_grad()
        ctx.save_for_backward(*grads)
        return value.to(tensors[0].dtype)

    @staticmethod
    def backward(ctx, out):
        return (None, *(g * out for g in ctx.saved_tensors))
