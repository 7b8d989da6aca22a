"""Width selection under a budget: one width per prunable family maximising the retained
importance subject to a cost made of unary and pairwise terms (DESIGN §9).

Modules: ``problem`` (the data and its JSON form), ``result`` (the outcome), ``milp`` (the
exact MILP, solved by HiGHS; a Pyomo statement of the same MILP as reference), ``baselines``
(brute force, the greedy knapsack heuristic, the local search that warm-starts the MILP) and
``generate`` (seeded random and ResNet-shaped problems).  Nothing here imports pyomo or highspy
until a solve is called.
"""

from .baselines import MAX_COMBINATIONS, brute_force, greedy, improve
from .generate import random_selection, resnet_selection
from .milp import milp_arrays, solve_selection, solve_selection_pyomo
from .problem import FEAS_RTOL, Family, Pairwise, SelectionProblem, Unary
from .result import SelectionResult

__all__ = ["SelectionProblem", "SelectionResult", "Family", "Unary", "Pairwise", "FEAS_RTOL",
           "solve_selection", "solve_selection_pyomo", "milp_arrays", "brute_force", "greedy", "improve",
           "MAX_COMBINATIONS", "random_selection", "resnet_selection"]
