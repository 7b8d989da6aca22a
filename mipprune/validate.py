"""Validation on random instances: the same optimum from independent formulations.

For each instance:   bigM bound <= PR bound <= optimum of (P);
the PR bound computed two ways agrees (HiGHS QP + perspective cuts through Pyomo, and the
closed-form SPR minimised directly);  branch and bound agrees with brute-force enumeration
(where the instance is small enough to enumerate).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .bnb import branch_and_bound
from .bounds import bigm_bound, pr_bound_cuts
from .enumerate import enumerate_solve
from .instance import random_instance
from .relax import pr_bound_closed_form

__all__ = ["Check", "validate", "validate_instance", "format_table"]

_TOL = 1e-6  # relative tolerance of every comparison


@dataclass(frozen=True)
class Check:
    seed: int
    groups: int
    bigm_bound: float
    pr_bound_cuts: float
    pr_bound_closed_form: float
    optimum: float
    enumeration: float | None
    nodes: int
    seconds: float
    violations: tuple

    @property
    def ok(self) -> bool:
        return not self.violations


def _rel(x, y):
    return abs(x - y) / max(1.0, abs(x), abs(y))


def validate_instance(inst, seed: int = 0, enumerate_max: int = 10) -> Check:
    """Run every formulation on one instance and list the violated relations."""
    bigm = bigm_bound(inst)
    cuts = pr_bound_cuts(inst)
    cf = pr_bound_closed_form(inst)
    bnb = branch_and_bound(inst)
    enum = enumerate_solve(inst, max_groups=enumerate_max) if inst.n_groups <= enumerate_max else None
    v = []
    scale = max(1.0, abs(bnb.objective))
    if bigm.value > cf.value + _TOL * scale:
        v.append(f"bigM bound {bigm.value:.10g} > PR bound {cf.value:.10g}")
    if cf.lower_bound > bnb.objective + _TOL * scale:
        v.append(f"PR bound {cf.lower_bound:.10g} > optimum {bnb.objective:.10g}")
    if _rel(cuts.value, cf.value) > _TOL:
        v.append(f"PR bounds disagree: cuts {cuts.value:.10g} vs closed form {cf.value:.10g}")
    if bnb.status != "optimal":
        v.append(f"branch and bound ended {bnb.status} with gap {bnb.gap:.2g}")
    if enum is not None and _rel(enum.value, bnb.objective) > _TOL:
        v.append(f"branch and bound {bnb.objective:.10g} != enumeration {enum.value:.10g}")
    return Check(seed, inst.n_groups, bigm.value, cuts.value, cf.value, bnb.objective,
                 None if enum is None else enum.value, bnb.nodes,
                 bigm.seconds + cuts.seconds + bnb.seconds + (enum.seconds if enum else 0.0),
                 tuple(v))


def validate(instances: int = 10, groups: int = 8, seed: int = 0, group_size: int = 3,
             kind: str = "least_squares", enumerate_max: int = 10, progress: bool = False):
    """Validate ``instances`` random instances (seeds ``seed, seed+1, ...``)."""
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    seeds = range(seed, seed + instances)
    if progress:
        from tqdm import tqdm

        seeds = tqdm(seeds, desc="validate", unit="instance", leave=False)
    return [validate_instance(random_instance(groups, group_size, s, kind), s, enumerate_max)
            for s in seeds]


def format_table(checks) -> str:
    head = f"{'seed':>5} {'G':>3} {'bigM bound':>13} {'PR (cuts)':>13} {'PR (closed)':>13} " \
           f"{'optimum':>13} {'enumeration':>13} {'nodes':>6} {'sec':>6}  ok"
    lines = [head, "-" * len(head)]
    for c in checks:
        enum = f"{c.enumeration:13.7f}" if c.enumeration is not None else f"{'-':>13}"
        lines.append(f"{c.seed:>5} {c.groups:>3} {c.bigm_bound:13.7f} {c.pr_bound_cuts:13.7f} "
                     f"{c.pr_bound_closed_form:13.7f} {c.optimum:13.7f} {enum} {c.nodes:>6} "
                     f"{c.seconds:6.2f}  {'yes' if c.ok else 'NO'}")
        lines.extend(f"      violation: {m}" for m in c.violations)
    bad = sum(not c.ok for c in checks)
    gaps = [(c.pr_bound_closed_form - c.bigm_bound) / (c.optimum - c.bigm_bound)
            for c in checks if c.optimum - c.bigm_bound > 1e-9]
    closed = f"; PR closes a median {100 * np.median(gaps):.0f}% of the big-M gap" if gaps else ""
    skipped = sum(c.enumeration is None for c in checks)
    if skipped == 0:
        passed = "passed every check"
    elif skipped == len(checks):
        passed = ("passed every check run; the enumeration check was skipped on all of them "
                  "(more groups than --enumerate-max)")
    else:
        passed = (f"passed every check run; the enumeration check was skipped on {skipped} "
                  "(more groups than --enumerate-max)")
    lines.append(f"{len(checks) - bad}/{len(checks)} instances {passed}{closed}")
    return "\n".join(lines)


def to_json(checks) -> dict:
    """Every check (``enumeration`` null where skipped), the counts, and ``enumeration_skipped``."""
    return {"instances": [dict(asdict(c), ok=c.ok, violations=list(c.violations)) for c in checks],
            "passed": sum(c.ok for c in checks), "failed": sum(not c.ok for c in checks),
            "enumeration_skipped": sum(c.enumeration is None for c in checks)}
