"""The outcome of a selection: the widths, their value and cost, the status and the certified gap."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["SelectionResult", "relative_gap", "STATUSES"]

STATUSES = ("optimal", "within_tolerance", "infeasible", "time_limit", "heuristic")


@dataclass(frozen=True)
class SelectionResult:
    """A selection and how it was obtained.

    ``status``: ``optimal`` (certified gap at most ``status.OPTIMAL_GAP``), ``within_tolerance``
    (a looser requested gap reached), ``infeasible`` (no choice fits the budget), ``time_limit``
    (the best choice found, or none: ``widths is None``) or
    ``heuristic`` (greedy: no optimality claim).  ``bound`` is a certified upper bound on the
    optimal value (the MILP's dual bound; None when unknown) and
    ``gap = (bound - value) / |value|`` (:func:`relative_gap`; None when unknown, ``inf`` when
    the value is 0 below a positive bound, written as null in JSON).
    ``seconds`` is the wall time of the whole call, model building included.
    """

    status: str
    widths: dict | None
    value: float | None
    cost: float | None
    gap: float | None
    bound: float | None
    seconds: float

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if (self.widths is None) != (self.value is None) or (self.widths is None) != (self.cost is None):
            raise ValueError("widths, value and cost are given together or not at all")
        if self.widths is not None:
            object.__setattr__(self, "widths", MappingProxyType(dict(self.widths)))

    @property
    def found(self) -> bool:
        return self.widths is not None

    def to_json(self) -> dict:
        """The CLI's strict-JSON record (no NaN/Infinity: unknown or infinite numbers are null)."""
        def num(x):
            return None if x is None or not math.isfinite(x) else float(x)

        return {"widths": None if self.widths is None else dict(self.widths),
                "value": num(self.value), "cost": num(self.cost), "status": self.status,
                "gap": num(self.gap), "seconds": float(self.seconds)}


def relative_gap(value: float | None, bound: float | None) -> float | None:
    """``(bound - value) / |value|`` clipped at 0 (HiGHS' definition); 0 if both are 0, None
    when either is unknown, ``inf`` when value is 0 and the bound is positive."""
    if value is None or bound is None or not math.isfinite(bound):
        return None
    diff = max(bound - value, 0.0)
    if value == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / abs(value)
