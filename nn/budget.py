"""Selection to a stated budget: the width of every pruned family (and, if asked, which blocks
stay) chosen by the OR layer's exact selection (:mod:`mipprune.select`) from the method's
scores and the run's cost, so the pruned size is what the user stated on any machine.
One concept: stating that problem (candidate widths, cost terms, values) and reading its
solution back as masks; how many blocks go is searched in :mod:`nn.budget_depth`.

**The problem** (``mipprune select``'s format; nn passes plain arrays).  Each pruned family
``f`` takes one width ``w_f`` from its candidates (multiples of the granularity ``g``, and its
full size); keeping ``w`` structures keeps the ``w`` best-scored ones, so its value is the sum
of its ``w`` largest scores.  With block removal on, a removable block's first inner family
(its *carrier*) also takes width 0: the block is removed (its value and every cost inside it
go).  The cost of the network is exact as a sum of unary and pairwise terms:

    MACs, params   each parameter tensor costs  full * (w_out / s_out) * (w_in / s_in) * kept_b
                   (the families it is written and read by, and its block)
    latency        each timed layer costs  table(layer, w_in, w_out) * kept_b   (+ a constant)

where a factor of a family that is not pruned is 1, and ``kept_b = [w_carrier > 0]``.  Every
term thus involves at most two pruned families; a term that would couple three (a Bottleneck
conv between two pruned families inside a removable block, with streams pruned) is refused.

**Budgets** (:class:`Budget`): ``macs=0.4`` or ``params=0.3`` (fractions of the dense model's
counts), ``latency=0.5`` (a fraction of the dense model's latency, as the latency table
predicts it on the table's device) or ``latency=12ms``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from nn.cost import TensorCost, tensor_costs

__all__ = ["Budget", "BUDGET_KINDS", "candidate_widths", "carriers",
           "count_terms", "build_problem", "widths_to_masks", "total", "check_reachable",
           "BudgetCost", "budget_cost", "select_to_budget"]

BUDGET_KINDS = ("macs", "params", "latency")


@dataclass(frozen=True)
class Budget:
    """``kind`` of :data:`BUDGET_KINDS`; ``value`` a fraction of the dense model's in (0, 1],
    or, with ``unit="ms"`` (latency only), milliseconds."""

    kind: str
    value: float
    unit: str = "fraction"

    def __post_init__(self):
        from nn.checks import choice, number

        choice("budget kind", self.kind, BUDGET_KINDS)
        choice("budget unit", self.unit, ("fraction", "ms"))
        if self.unit == "ms":
            if self.kind != "latency":
                raise ValueError(f"a budget in ms is a latency budget, got {self.kind}=...ms")
            number("budget", self.value, 0, open_lo=True)
        else:
            number(f"budget {self.kind}", self.value, 0, 1, open_lo=True)

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``macs=0.4``, ``params=0.3``, ``latency=0.5`` or ``latency=12ms``."""
        m = re.fullmatch(r"\s*(\w+)\s*=\s*([0-9.eE+-]+)\s*(ms)?\s*", str(text))
        if not m:
            raise ValueError(f"--budget must be KIND=VALUE with KIND one of "
                             f"{', '.join(BUDGET_KINDS)} (e.g. macs=0.4, latency=12ms), "
                             f"got {text!r}")
        try:
            value = float(m.group(2))
        except ValueError:
            raise ValueError(f"--budget value must be a number, got {m.group(2)!r}") from None
        return cls(m.group(1), value, "ms" if m.group(3) else "fraction")

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}{'ms' if self.unit == 'ms' else ''}"

    def absolute(self, dense: float) -> float:
        """The budget in the cost's own unit, given the dense model's cost."""
        return self.value if self.unit == "ms" else self.value * dense


def candidate_widths(size: int, granularity: int, removable: bool = False) -> list[int]:
    """Multiples of ``granularity`` up to ``size``, and ``size`` itself (at least one
    structure kept), with 0 first when the family carries a removable block."""
    widths = sorted({*range(granularity, size + 1, granularity), size})
    return ([0] if removable else []) + widths


def _members(structures, pruned_names) -> dict[str, list[str]]:
    """``{block family: the pruned filter families inside it, in order}`` (its writers
    contain theirs), for the removable blocks that contain one."""
    out = {}
    for b in (f for f in structures if f.kind == "block"):
        inside = {p.param for p in b.writers}
        fams = [f.name for f in structures if f.kind == "filter" and f.name in pruned_names
                and {p.param for p in f.writers} <= inside]
        if fams:
            out[b.name] = fams
    return out


def carriers(structures, pruned_names) -> dict[str, str]:
    """``{block family: the first pruned filter family inside it}`` (its carrier: width 0
    removes the block), for the removable blocks that contain a pruned family."""
    return {b: fams[0] for b, fams in _members(structures, pruned_names).items()}


def _inside(structures, pruned_names, block_carriers) -> dict[str, str]:
    """``{family: carrier}`` for pruned filter families inside a block with a carrier that
    are not the carrier (they go with the block)."""
    return {f: block_carriers[b] for b, fams in _members(structures, pruned_names).items()
            if b in block_carriers for f in fams[1:]}


def count_terms(tensors: list[TensorCost], kind: str, sizes: dict[str, int],
                block_carriers: dict[str, str]) -> list[tuple]:
    """The MAC or parameter cost terms of :func:`build_problem`: one per tensor, the product
    of its factors (``w / size`` for the families setting its axes, ``[w > 0]`` for its
    block's carrier; fixed families contribute 1).  ``ValueError`` for a tensor scaled by
    three pruned families."""
    terms = []
    for t in tensors:
        full = t.macs if kind == "macs" else t.params
        if not full:
            continue
        roles = [(f, "width") for f in (t.out_family, t.in_family) if f in sizes]
        carrier = block_carriers.get(t.block) if t.block else None
        if carrier is not None and carrier not in {f for f, _ in roles}:
            roles.append((carrier, "kept"))
        fams = sorted({f for f, _ in roles})
        if len(fams) > 2:
            raise ValueError(f"{t.name} is scaled by three pruned families {fams}: prune "
                             f"streams or remove blocks, not both, for this model")
        a, b = (fams + [None, None])[:2]

        def fn(wa, wb, roles=roles, a=a, full=full):
            x = float(full)
            for f, role in roles:
                w = wa if f == a else wb
                x *= (w / sizes[f]) if role == "width" else float(w > 0)
            return x

        terms.append((a, b, fn))
    return terms


def build_problem(families, scores: dict[str, torch.Tensor], terms, budget_abs: float,
                  constant: float, granularity: int, block_carriers: dict[str, str],
                  inside: dict[str, str]) -> dict:
    """The selection problem (``mipprune select``'s JSON form).

    ``families``: the pruned families; ``scores``: their structure scores; ``terms``: cost
    terms ``(fam_a | None, fam_b | None, fn)`` where ``fn(w_a, w_b)`` is the cost at those
    widths (a missing family passes None), already including the block factor; ``constant``:
    the cost of everything no pruned family scales; ``inside``: ``{family: carrier}`` for
    pruned families inside a removable block other than its carrier (their value counts only
    while the block stays)."""
    carried = set(block_carriers.values())
    widths = {f.name: candidate_widths(f.size, granularity, f.name in carried) for f in families}
    fams, unary, pairwise = [], {}, {}
    for f in families:
        s = torch.sort(scores[f.name].double(), descending=True).values
        top = torch.cat([s.new_zeros(1), torch.cumsum(s, 0)])
        value = [float(top[w]) for w in widths[f.name]]
        if f.name in inside:  # counts only while its block stays: a pairwise value
            c = inside[f.name]
            pairwise.setdefault((c, f.name), {"cost": 0.0, "value": 0.0})
            pairwise[(c, f.name)]["value"] = torch.tensor(
                [[v if wc > 0 else 0.0 for v in value] for wc in widths[c]], dtype=torch.float64)
            value = [0.0] * len(value)
        fams.append({"name": f.name, "widths": widths[f.name], "value": value})
    for a, b, fn in terms:
        if a is None and b is None:
            constant += float(fn(None, None))
        elif b is None or a is None:
            f = a if a is not None else b
            row = torch.tensor([fn(w, None) if a is not None else fn(None, w)
                                for w in widths[f]], dtype=torch.float64)
            unary[f] = unary.get(f, 0.0) + row
        else:
            if (b, a) in pairwise:
                a, b, fn = b, a, (lambda x, y, fn=fn: fn(y, x))
            m = torch.tensor([[fn(x, y) for y in widths[b]] for x in widths[a]],
                             dtype=torch.float64)
            entry = pairwise.setdefault((a, b), {"cost": 0.0, "value": 0.0})
            entry["cost"] = entry["cost"] + m
    return {"families": fams,
            "unary": [{"family": f, "cost": c.tolist()} for f, c in unary.items()],
            "pairwise": [{"a": a, "b": b,
                          **({"cost": e["cost"].tolist()} if torch.is_tensor(e["cost"]) else {}),
                          **({"value": e["value"].tolist()} if torch.is_tensor(e["value"])
                             else {})}
                         for (a, b), e in pairwise.items()],
            "constant": constant, "budget": budget_abs}


def widths_to_masks(families, scores: dict[str, torch.Tensor], widths: dict[str, int],
                    block_carriers: dict[str, str]) -> dict[str, torch.Tensor]:
    """Masks keeping the ``w_f`` best-scored structures of every family (ties: lower index
    first), and removing the blocks whose carrier took width 0."""
    masks = {}
    for f in families:
        keep = torch.zeros(f.size, dtype=torch.bool)
        w = widths[f.name]
        if w > 0:
            order = torch.sort(scores[f.name].double(), descending=True, stable=True).indices
            keep[order[:w]] = True
        else:  # a removed block's carrier: its structures go with the block
            keep[:] = True
        masks[f.name] = keep
    for block, carrier in block_carriers.items():
        masks[block] = torch.tensor([widths[carrier] > 0])
    return masks


def total(terms, sizes: dict[str, int], widths: dict[str, int] | None = None) -> float:
    """The cost of ``terms`` at ``widths`` (default: every family at its full size)."""
    widths = widths or sizes
    return sum(float(fn(widths.get(a), widths.get(b))) for a, b, fn in terms)


def _count_problem(run, budget: Budget, block_carriers: dict[str, str]):
    """``(terms, constant)`` of a MAC or parameter budget on ``run``'s pruned families."""
    from nn.complexity import layer_macs

    sizes = {f.name: f.size for f in run.pruned}
    lm = layer_macs(run.model, run.input_size)
    return count_terms(tensor_costs(run.model, run.structures, lm), budget.kind, sizes,
                       block_carriers), 0.0


def _unreachable(budget: Budget, limit: float, floor: float, dense_cost: float):
    from nn.config import ConfigError

    return ConfigError(f"budget {budget} ({limit:.6g}) cannot be met: the smallest network "
                       f"the selection allows costs {floor:.6g} ({floor / dense_cost:.3f} of "
                       f"dense); allow more (--granularity, --remove-blocks) or raise it")


def check_reachable(run) -> None:
    """Before training: a MAC or parameter budget that even the smallest network the
    selection allows (every family at its smallest candidate width, every removable block
    gone) exceeds is a :class:`~nn.config.ConfigError` now, not after the training.  These
    costs do not depend on the weights; a latency budget is checked at the selection, where
    its table is read."""
    cfg = run.config.selection
    budget = Budget.parse(cfg.budget)
    if budget.kind == "latency":
        return
    sizes = {f.name: f.size for f in run.pruned}
    block_carriers = carriers(run.structures, set(sizes)) if cfg.remove_blocks else {}
    terms, constant = _count_problem(run, budget, block_carriers)
    carried = set(block_carriers.values())
    smallest = {n: candidate_widths(s, cfg.granularity, n in carried)[0]
                for n, s in sizes.items()}
    dense_cost = total(terms, sizes) + constant
    limit, floor = budget.absolute(dense_cost), total(terms, sizes, smallest) + constant
    if floor > limit * (1 + 1e-9):
        raise _unreachable(budget, limit, floor, dense_cost)


@dataclass
class BudgetCost:
    """A run's stated budget as a cost over its pruned families' widths (module docstring):
    ``terms`` and ``constant`` (what :func:`build_problem` reads), ``dense_cost`` (the dense
    network's; for latency, the measured dense latency where the table has it) and ``limit``
    (the budget in the cost's unit).  ``cost(widths)`` prices any widths (a carrier at 0: its
    block removed)."""

    budget: Budget
    families: list
    sizes: dict
    block_carriers: dict
    inside: dict
    terms: list
    constant: float
    dense_cost: float
    limit: float
    table_info: dict | None = None

    def cost(self, widths: dict[str, int] | None = None) -> float:
        return total(self.terms, self.sizes, widths) + self.constant


def budget_cost(run) -> BudgetCost:
    """The :class:`BudgetCost` of ``run``'s ``--budget`` (its table read, or measured and
    cached, for latency)."""
    cfg = run.config.selection
    budget = Budget.parse(cfg.budget)
    fams = list(run.pruned)
    names = {f.name for f in fams}
    sizes = {f.name: f.size for f in fams}
    block_carriers = carriers(run.structures, names) if cfg.remove_blocks else {}
    inside = _inside(run.structures, names, block_carriers)
    table_info = None
    if budget.kind == "latency":
        from nn.budget_latency import latency_terms

        terms, constant, table_info = latency_terms(run, sizes, block_carriers)
    else:
        terms, constant = _count_problem(run, budget, block_carriers)
    dense_cost = total(terms, sizes) + constant
    if table_info and table_info.get("dense_measured_ms"):  # latency: a share of the measured
        dense_cost = table_info["dense_measured_ms"]
    return BudgetCost(budget, fams, sizes, block_carriers, inside, terms, constant, dense_cost,
                      budget.absolute(dense_cost), table_info)


def select_to_budget(run, method, scores: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Masks and the selection record of a budgeted selection on ``run``
    (:class:`nn.methods.Run`) from ``method``'s ``scores`` (module docstring)."""
    cfg = run.config.selection
    bc = budget_cost(run)
    budget, fams, sizes, block_carriers = bc.budget, bc.families, bc.sizes, bc.block_carriers
    inside, terms, constant, dense_cost = bc.inside, bc.terms, bc.constant, bc.dense_cost
    limit, table_info = bc.limit, bc.table_info
    problem = build_problem(fams, scores, terms, limit, constant, cfg.granularity,
                            block_carriers, inside)
    from nn.config import ConfigError

    try:
        from mipprune.select import SelectionProblem, greedy, solve_selection
    except ImportError as e:
        raise ConfigError(f"--budget needs the OR layer's solver (pyomo and highspy: pip "
                           f"install pyomo highspy): {e}") from None
    sp = SelectionProblem.from_json(problem)
    search = None
    if block_carriers and cfg.depth == "search":
        from nn.budget_depth import depth_search

        res, search = depth_search(run, sp, fams, scores, block_carriers)
    else:
        res = solve_selection(sp)
    if res.status == "infeasible" or res.widths is None:
        smallest = {f["name"]: min(f["widths"]) for f in problem["families"]}
        raise _unreachable(budget, limit, total(terms, sizes, smallest) + constant, dense_cost)
    heuristic = greedy(sp)  # against the exact optimum of the same (unrestricted) problem
    optimum = search["candidates"][-1]["value"] if search else res.value
    masks = widths_to_masks(fams, scores, res.widths, block_carriers)
    rec = {"rule": "budget", "budget": str(budget), "cost_kind": budget.kind,
           "budget_abs": limit, "dense_cost": dense_cost, "cost_predicted": res.cost,
           "cost_ratio_predicted": res.cost / dense_cost, "value": res.value,
           "status": res.status, "gap": res.gap, "solver_seconds": res.seconds,
           "greedy": {"value": heuristic.value, "cost": heuristic.cost,
                      "status": heuristic.status, "milp_value": optimum},
           "granularity": cfg.granularity, "remove_blocks": cfg.remove_blocks,
           "score": method.score_name(run), "widths": dict(res.widths),
           "blocks_removed": sorted(b for b, c in block_carriers.items() if res.widths[c] == 0),
           "removed": {n: int((~m).sum()) for n, m in masks.items()}}
    if table_info is not None:
        rec["latency_table"] = table_info
    if search is not None:
        rec["depth_search"] = search
    rec["summary"] = (
        f"budget {budget}: {budget.kind} {res.cost:.6g} of {limit:.6g} allowed "
        f"({res.cost / dense_cost:.3f} of dense), MILP {res.status} (gap "
        f"{'unknown' if res.gap is None else format(res.gap, '.1e')}), "
        f"score {rec['score']}, granularity {cfg.granularity}, "
        f"{len(rec['blocks_removed'])} blocks removed"
        + (f" (depth searched: {len(search['candidates'])} MILPs, calibration acc "
           f"{100 * search['calibration_acc']:.2f}%)" if search else "") + f"; greedy would keep value "
        f"{heuristic.value:.4g} vs the MILP's {optimum:.4g}")
    return masks, rec
