"""mipprune: structured pruning as a mixed-integer program (the OR layer).

Importing the package loads only numpy and the pure formulas (``penalty``, ``instance``), so the
torch layer ``nn`` can use the closed-form SPR on machines without pyomo, highspy or numba;
the solvers load on first use.  This package never imports torch.

Modules, one concept each: ``penalty`` (the closed-form SPR), ``instance`` (the data of (P)),
``models`` (Pyomo models), ``highs`` (everything that talks to HiGHS), ``bounds`` (root big-M
and perspective bounds), ``enumerate`` (the optimum by enumerating z), ``relax`` (node
relaxations), ``bnb`` (branch and bound), ``scip`` (the optional external peer), ``select``
(width selection under a budget: the MILP, brute force, greedy), ``validate`` and ``cli``;
``deadline`` (one time limit shared by every phase of a solve), ``status`` (how a finished
solve is named) and ``jsonio`` (the command line's JSON in and out).
Once loaded, the submodule ``mipprune.enumerate`` is a global of this file: do not call the
builtin ``enumerate`` here.
"""

from importlib import import_module

from .instance import Instance, least_squares_instance, random_instance
from .penalty import C1, C2, C3, SPR, bigm_grad, bigm_value, spr, spr_grad, spr_numeric, spr_value

__version__ = "0.1.0"

_LAZY = {
    "BnBResult": "bnb",
    "branch_and_bound": "bnb",
    "NodeRelaxation": "relax",
    "RelaxResult": "relax",
    "pr_bound_closed_form": "relax",
    "bigm_bound": "bounds",
    "pr_bound_cuts": "bounds",
    "enumerate_solve": "enumerate",
    "solve_fixed_z": "enumerate",
    "scip_solve": "scip",
    "validate": "validate",
    "SelectionProblem": "select",
    "SelectionResult": "select",
    "solve_selection": "select",
    "solve_selection_pyomo": "select",
    "brute_force": "select",
    "greedy": "select",
    "random_selection": "select",
    "resnet_selection": "select",
}

__all__ = [
    "C1", "C2", "C3", "SPR", "spr", "spr_value", "spr_grad", "bigm_value", "bigm_grad",
    "spr_numeric", "Instance", "least_squares_instance", "random_instance", *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mipprune' has no attribute {name!r}")
