"""How the exact solvers name a finished solve, shared so every command says the same thing.

A solver that stops because its relative gap reached the requested tolerance has proved the
optimum only when that gap is about zero: ``optimal`` is kept for gaps of at most
``OPTIMAL_GAP`` (the default tolerance); a looser tolerance reached is ``within_tolerance``.
"""

from __future__ import annotations

__all__ = ["OPTIMAL_GAP", "converged_status"]

OPTIMAL_GAP = 1e-6


def converged_status(gap: float | None) -> str:
    """``optimal`` for a certified relative gap of at most ``OPTIMAL_GAP`` (round-off allowed),
    ``within_tolerance`` for a larger or unknown one."""
    return "optimal" if gap is not None and gap <= OPTIMAL_GAP * (1 + 1e-9) else "within_tolerance"
