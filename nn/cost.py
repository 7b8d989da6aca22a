"""The cost model: what a prunable structure costs, with one meaning for every method.

A run states its price of size once, as weights on three normalised costs
(:class:`CostConfig`)::

    cost_j = macs * MACs_j / MACs0 + params * params_j / params0 + blocks * blocks_j / B
             + latency * lat_j / lat0

``MACs0``, ``params0``: the dense model's totals; ``B``: its removable blocks (``blocks_j`` is
1 for a whole-block structure, 0 otherwise); ``lat_j``: the structure's marginal latency from
the run's latency table (:func:`nn.budget_latency.marginal_latency`: what removing one channel
of its family saves at the dense widths, or a whole block's units), ``lat0`` the dense
network's latency.  SPR's per-group weight is ``n_j / N := cost_j``
(``a_j = lam alpha cost_j``, ``b_j = lam (1 - alpha) cost_j``, :mod:`nn.regularizer`); the
variational pruner's price is the same weighted sum of *expected* costs under its gates
(:mod:`nn.methods.variational.cost`).  A structure's ``MACs_j``/``params_j`` count, by ``basis``:

``saved``   its writer *and* reader slices: what physically removing it alone removes (the
            default; for a filter read by one 3x3 conv of its own width, about twice its
            ``own`` count);
``own``     its writer slices only: the filter with its BN pair (``params`` weight 1 and
            ``own`` basis is the SPR authors' weighting, ``n_j`` = the group's own
            parameters).

Latency is the measured cost: its table (:mod:`nn.latency`) is keyed by device, threads,
dtype, batch and torch version, and is read only when the ``latency`` weight is not 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from nn.checks import choice, number

__all__ = ["BASES", "CostConfig", "piece_cost", "structure_costs", "parse_cost", "TensorCost",
           "tensor_costs"]

BASES = ("saved", "own")


@dataclass(frozen=True)
class CostConfig:
    """Weights of the normalised MACs, parameters and blocks (each >= 0, not all 0 unless a
    method ignores cost), and the ``basis`` of a structure's own count (module docstring).
    The defaults are the project's: half MACs, half parameters, no extra price of depth."""

    macs: float = 0.5
    params: float = 0.5
    blocks: float = 0.0
    basis: str = "saved"
    latency: float = 0.0

    def __post_init__(self):
        for name in ("macs", "params", "blocks", "latency"):
            number(f"cost weight {name}", getattr(self, name), 0)
        choice("cost basis", self.basis, BASES)

    def to_dict(self) -> dict:
        return asdict(self)

    def formula(self) -> str:
        text = (f"{self.macs:g} MACs_j/MACs0 + {self.params:g} params_j/params0 + "
                f"{self.blocks:g} blocks_j/B")
        if self.latency:
            text += f" + {self.latency:g} lat_j/lat0"
        return text + f" ({self.basis} counts)"


def parse_cost(text: str) -> dict:
    """The items of ``--cost``: ``key=value`` among ``macs``, ``params``, ``blocks``, ``basis``
    (``macs=0.5,params=0.5``), as a dict of the keys given, each checked as
    :class:`CostConfig` checks it.  ``ValueError`` names the bad item."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        if key not in ("macs", "params", "blocks", "basis", "latency") or not eq or not value:
            raise ValueError(f"--cost takes key=value items with keys macs, params, blocks, "
                             f"latency, basis; got {item!r}")
        try:
            out[key] = value if key == "basis" else float(value)
        except ValueError:
            raise ValueError(f"--cost {key} must be a number, got {value!r}") from None
    CostConfig(**out)
    return out


def piece_cost(shape: torch.Size, dim: int | None, layer_macs: int) -> tuple[int, int]:
    """Parameters and MACs of one structure's slice of a tensor of ``shape`` along ``dim``
    (``None``: the whole tensor), given the MACs of the layer the tensor is a weight of (0 for
    anything else).  A slice along ``dim`` costs ``1 / shape[dim]`` of the tensor; the MACs of
    a conv/linear layer are linear in each of its channel counts, so the same holds for them."""
    n = math.prod(shape)
    if dim is None:
        return n, layer_macs
    return n // shape[dim], layer_macs // shape[dim]


def structure_costs(families, cost: CostConfig, totals: dict,
                    latency: dict | None = None) -> dict[str, torch.Tensor]:
    """``cost_j`` (module docstring) of every structure of ``families``: float64 tensors of
    shape ``(size,)``.  ``totals``: the dense model's ``macs`` and ``params`` and ``blocks``
    (its removable blocks).  Reads ``Family.params``/``Family.macs`` (basis ``saved``) or
    ``Family.own_params``/``Family.own_macs`` (basis ``own``); with a latency weight,
    ``latency`` = ``{"marginal": {family: ms per structure}, "dense_ms": ms}``."""
    if cost.latency and latency is None:
        raise ValueError("a latency cost needs the marginal latencies of the latency table")
    own = cost.basis == "own"
    out = {}
    for f in families:
        if own and (f.own_params is None or f.own_macs is None):
            raise ValueError(f"family {f.name!r} has no own-slice counts: basis 'own' needs them")
        p = torch.tensor(f.own_params if own else f.params, dtype=torch.float64)
        m = torch.tensor(f.own_macs if own else f.macs, dtype=torch.float64)
        share = cost.params * p / totals["params"] + cost.macs * m / max(totals["macs"], 1)
        if cost.blocks and f.kind == "block":
            share = share + cost.blocks / max(totals["blocks"], 1)
        if cost.latency:
            share = share + cost.latency * latency["marginal"].get(f.name, 0.0) \
                / latency["dense_ms"]
        out[f.name] = share
    return out


@dataclass(frozen=True)
class TensorCost:
    """One parameter tensor: its parameters and MACs in the dense model, the pruned families
    that set its output and input axes (None: fixed) and the removable block it lives in."""

    name: str
    params: int
    macs: int
    out_family: str | None
    in_family: str | None
    block: str | None


def tensor_costs(model: torch.nn.Module, structures, lmacs: dict[str, int]) -> list[TensorCost]:
    """Every parameter tensor of ``model`` with the families of ``structures`` that scale it
    (writers along dim 0 set the output axis, readers along dim 1 the input axis; ``block``
    families contain their branch tensors whole)."""
    out_of, in_of, block_of = {}, {}, {}
    for f in structures:
        if f.kind == "block":
            for p in f.writers:
                block_of[p.param] = f.name
        elif f.kind in ("filter", "stream"):
            for p in f.writers:
                out_of[p.param] = f.name
            for p in f.readers:
                in_of[p.param] = f.name
    rows = []
    for name, p in model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        macs = lmacs.get(layer, 0) if name.endswith(".weight") else 0
        rows.append(TensorCost(name, p.numel(), macs, out_of.get(name), in_of.get(name),
                               block_of.get(name)))
    return rows
