"""Width selection under a budget: the MILP against brute force, hand-solved fixtures, greedy,
the time-limit path, validation and the ``mipprune select`` command line."""

import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mipprune.cli import main
from mipprune.select import (Family, Pairwise, SelectionProblem, SelectionResult, Unary,
                             brute_force, greedy, improve, milp_arrays, random_selection,
                             resnet_selection, solve_selection, solve_selection_pyomo)

from mipprune.select.milp import _highs_lp

from helpers import run_cli, strict_json

REPO = Path(__file__).resolve().parent.parent

# budget fractions of the way from the cheapest to the dearest combination: < 0 infeasible,
# 0 tight (only the cheapest combinations fit), > 1 everything fits
FRACTIONS = (-0.2, 0.0, 0.05, 0.3, 0.6, 1.0, 1.2)


def _random(seed):
    rng = np.random.default_rng(1000 + seed)
    frac = FRACTIONS[seed % len(FRACTIONS)]
    return random_selection(int(rng.integers(1, 7)), int(rng.integers(1, 6)), seed=seed,
                            budget_fraction=frac), frac


def _same_value(a, b):
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


# ---- the MILP is exact ------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(70))
def test_milp_equals_brute_force(seed):
    p, frac = _random(seed)
    b, m = brute_force(p), solve_selection(p, gap=0.0)
    assert m.status == b.status
    if frac < 0 and p.combinations > 1:  # below the cheapest combination
        assert m.status == "infeasible" and m.widths is None
    if b.status == "optimal":
        assert _same_value(m.value, b.value)
        value, cost = p.evaluate(p.choice_of(m.widths))  # reported numbers are the widths' own
        assert (value, cost) == (m.value, m.cost) and p.fits(cost)
        assert m.gap is not None and m.gap <= 1e-9
        if frac == 0.0:  # tight: the budget is the cheapest cost, so the optimum spends it all
            assert abs(m.cost - p.budget) <= p.tol


def test_random_suite_covers_the_hard_cases():
    # the cases the equality test is meant to exercise are really in it
    probs = [_random(s) for s in range(70)]
    assert sum(brute_force(p).status == "infeasible" for p, _ in probs) >= 8
    assert sum(f == 0.0 for _, f in probs) >= 8
    assert sum(any(k == 1 for k in p.sizes) for p, _ in probs) >= 10       # fixed families
    assert sum(len(set(p.sizes)) >= 3 for p, _ in probs) >= 10              # mixed sizes
    assert sum(any(V.any() for *_, V in p.pairs) and any(C.any() for _, _, C, _ in p.pairs)
               for p, _ in probs) >= 20                                     # pairwise cost and value
    assert sum(len(p.pairwise) > len(p.pairs) for p, _ in probs) >= 5       # terms merged on a pair


@pytest.mark.parametrize("seed", range(12))
def test_pyomo_and_highspy_formulations_agree(seed):
    p, _ = _random(seed + 100)
    a, b = solve_selection(p, gap=0.0), solve_selection_pyomo(p, gap=0.0)
    assert a.status == b.status
    if a.found:
        assert _same_value(a.value, b.value) and p.fits(b.cost)


def test_transportation_relaxation_is_integral_on_a_chain():
    # without a binding budget, the LP relaxation of the marginal rows over a chain of pairs is
    # integral (a tree: the local marginal polytope is the marginal polytope): its value is the
    # brute-force optimum; a missing or wrong marginal row would let the LP exceed it
    import highspy

    rng = np.random.default_rng(3)
    fams = tuple(Family(f"f{i}", list(range(4)), rng.normal(size=4)) for i in range(5))
    pw = tuple(Pairwise(f"f{i}", f"f{i + 1}", value=rng.normal(size=(4, 4))) for i in range(4))
    p = SelectionProblem(fams, 1.0, (), pw)
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    h.passModel(_highs_lp(milp_arrays(p), integer=False))
    h.run()
    assert h.getModelStatus() == highspy.HighsModelStatus.kOptimal
    assert _same_value(h.getInfo().objective_function_value, brute_force(p).value)


# ---- hand-solved fixtures -----------------------------------------------------------------
def _knapsack():
    # three removable blocks, (value, cost) = (60, 10), (100, 20), (120, 30), budget 50:
    # the optimum keeps blocks 2 and 3 (value 220, cost 50); greedy by rate removes block 3
    # (rate 4 < 5 < 6) and stops at value 160
    fams = tuple(Family(f"b{i}", [0, 1], [0.0, v]) for i, v in enumerate((60, 100, 120)))
    un = tuple(Unary(f"b{i}", [0.0, c]) for i, c in enumerate((10, 20, 30)))
    return SelectionProblem(fams, 50.0, un)


def test_knapsack_fixture_and_greedy_shortfall():
    p = _knapsack()
    m = solve_selection(p)
    assert m.status == "optimal" and dict(m.widths) == {"b0": 0, "b1": 1, "b2": 1}
    assert (m.value, m.cost) == (220.0, 50.0)
    g = greedy(p)
    assert g.status == "heuristic" and dict(g.widths) == {"b0": 1, "b1": 1, "b2": 0}
    assert (g.value, g.cost) == (160.0, 30.0) and g.gap is None


def test_improve_finds_the_exchange_greedy_misses():
    # from greedy's (1, 1, 0) no single change fits (adding b2 costs 60 > 50); the exchange
    # b0 -> 0, b2 -> 1 fits exactly and reaches the optimum 220
    p = _knapsack()
    c = improve(p, p.choice_of(greedy(p).widths))
    assert c.tolist() == [0, 1, 1] and p.evaluate(c) == (220.0, 50.0)


@pytest.mark.parametrize("seed", range(10))
def test_improve_keeps_feasibility_and_never_loses_value(seed):
    p = random_selection(7, 5, seed=seed, budget_fraction=0.4, monotone=seed % 2 == 0)
    g = greedy(p)
    assert g.found  # these seeds give greedy a start
    c = improve(p, p.choice_of(g.widths))
    value, cost = p.evaluate(c)
    assert p.fits(cost) and value >= g.value
    assert value <= brute_force(p).value + 1e-9


def test_pairwise_mac_fixture():
    # a conv between families a and b costs a * b MACs; value a: [1, 3], b: [1, 2.5], budget 2:
    # (1,1) v=2 c=1; (1,2) v=3.5 c=2; (2,1) v=4 c=2; (2,2) c=4 > 2  ->  a=2, b=1, value 4
    p = SelectionProblem((Family("a", [1, 2], [1.0, 3.0]), Family("b", [1, 2], [1.0, 2.5])), 2.0,
                         pairwise=(Pairwise("a", "b", cost=[[1, 2], [2, 4]]),))
    for r in (solve_selection(p), solve_selection_pyomo(p), brute_force(p)):
        assert r.status == "optimal" and dict(r.widths) == {"a": 2, "b": 1} and r.value == 4.0


def test_terms_on_the_same_pair_add_up_and_reversed_terms_transpose():
    # V_ab = [[0, 0], [0, 5]] given as a (b, a) value term plus an (a, b) one; cost 3 on
    # (a=1, b=1) from two halves.  Budget 2 forbids (1, 1): the best is then a or b alone (1).
    fams = (Family("a", [0, 1], [0.0, 1.0]), Family("b", [0, 1], [0.0, 0.5]))
    pw = (Pairwise("b", "a", value=[[0, 0], [0, 2]]), Pairwise("a", "b", value=[[0, 0], [0, 3]]),
          Pairwise("a", "b", cost=[[0, 0], [0, 1.5]]), Pairwise("b", "a", cost=[[0, 0], [0, 1.5]]))
    un = (Unary("a", [0, 0.5]), Unary("a", [0, 0.5]), Unary("b", [0, 1]))
    p = SelectionProblem(fams, 10.0, un, pw)
    assert p.evaluate([1, 1]) == (6.5, 5.0)  # 1 + 0.5 + 5, cost 1 + 1 + 3
    assert solve_selection(p).value == 6.5
    tight = SelectionProblem(fams, 2.0, un, pw)
    r = solve_selection(tight)
    assert dict(r.widths) == {"a": 1, "b": 0} and (r.value, r.cost) == (1.0, 1.0)


def test_fixed_families_and_constant():
    # s is fixed at width 8; its pairwise cost with t counts against the budget with the constant
    fams = (Family("s", [8], [2.0]), Family("t", [0, 4, 8], [0.0, 1.0, 1.5]))
    p = SelectionProblem(fams, 10.0, pairwise=(Pairwise("s", "t", cost=[[0, 4, 8]]),), constant=3.0)
    for r in (solve_selection(p), brute_force(p), greedy(p)):
        assert dict(r.widths) == {"s": 8, "t": 4} and (r.value, r.cost) == (3.0, 7.0)


def test_infeasible_budget_is_reported_not_relaxed():
    p = SelectionProblem((Family("a", [0, 1], [0.0, 1.0]),), 0.5, (Unary("a", [1.0, 2.0]),))
    for r in (solve_selection(p), solve_selection_pyomo(p), brute_force(p), greedy(p)):
        assert r.status == "infeasible" and r.widths is None and r.value is None
        assert json.loads(json.dumps(r.to_json(), allow_nan=False))["widths"] is None


@pytest.mark.parametrize("seed", range(12))
def test_restricted_equals_brute_force_over_the_allowed_choices(seed):
    # restricting widths keeps every term aligned with the rows it keeps: the restricted
    # problem's value and cost of a choice are the full problem's at the same widths
    p = random_selection(4, 4, seed=seed, budget_fraction=0.5)
    rng = np.random.default_rng(seed)
    allowed = {f.name: rng.choice(f.widths, size=max(1, len(f.widths) // 2), replace=False)
               for f in p.families[::2]}
    q = p.restricted(allowed)
    best = None
    for choice in np.ndindex(*p.sizes):
        w = p.widths_of(choice)
        if any(w[n] not in set(a.tolist()) for n, a in allowed.items()):
            continue
        value, cost = p.evaluate(choice)
        assert q.evaluate(q.choice_of(w)) == pytest.approx((value, cost), abs=1e-12)
        if p.fits(cost) and (best is None or value > best):
            best = value
    r = solve_selection(q, gap=0.0)
    assert (r.status == "infeasible") == (best is None)
    if best is not None:
        assert _same_value(r.value, best)
        assert all(r.widths[n] in set(a.tolist()) for n, a in allowed.items())


def test_restricted_names_the_bad_family_or_width():
    p = SelectionProblem((Family("a", [0, 4, 8], [0.0, 1.0, 2.0]),), 10.0)
    with pytest.raises(ValueError, match="unknown family 'b'"):
        p.restricted({"b": [4]})
    with pytest.raises(ValueError, match=r"'a' has widths \[0, 4, 8\], got \[3\]"):
        p.restricted({"a": [3]})
    with pytest.raises(ValueError, match="got \\[\\]"):
        p.restricted({"a": []})


# ---- greedy, brute force ----------------------------------------------------------------
@pytest.mark.parametrize("seed", range(30))
def test_greedy_is_feasible_and_never_beats_the_milp(seed):
    p = random_selection(6, 5, seed=seed, budget_fraction=(0.1, 0.4, 0.8)[seed % 3],
                         monotone=seed % 2 == 0)
    g, m = greedy(p), solve_selection(p, gap=0.0)
    if g.found:
        assert g.status == "heuristic" and p.fits(g.cost)
        assert (g.value, g.cost) == p.evaluate(p.choice_of(g.widths))
        assert m.status == "optimal" and g.value <= m.value + 1e-9 * max(1, abs(m.value))
    else:
        assert g.status == "infeasible"


def test_greedy_on_monotone_problems_finds_a_solution_when_one_exists():
    # costs increasing with width: the smallest widths are reachable by decreases
    for seed in range(10):
        p = random_selection(5, 4, seed=seed, budget_fraction=0.2, monotone=True)
        assert greedy(p).found == brute_force(p).found


def test_brute_force_refuses_large_problems():
    p = resnet_selection(n=1, granularity=4)
    assert p.combinations > 10
    with pytest.raises(ValueError, match="combinations"):
        brute_force(p, max_combinations=10)


# ---- ResNet-56 size, time limit, wall time ------------------------------------------------------
def test_resnet56_sized_problem_solves_to_gap():
    p = resnet_selection(n=9, granularity=1, streams=True, budget_fraction=0.5, seed=0)
    assert len(p.families) == 30 and len(p.pairs) == 27
    assert sum(0 in f.widths for f in p.families) == 24
    t0 = time.perf_counter()
    r = solve_selection(p, gap=1e-6)
    wall = time.perf_counter() - t0
    assert r.status == "optimal" and r.gap <= 1e-6 and p.fits(r.cost)
    assert r.bound >= r.value
    assert wall < 20  # CI machines vary; benchmarks/select_scaling.py reports the real time
    assert r.seconds <= wall and r.seconds >= 0.9 * wall - 0.05  # seconds is the whole wall time
    g = greedy(p)
    assert g.found and g.value <= r.value


def test_time_limit_returns_best_found_or_says_none():
    p = resnet_selection(n=9, granularity=1, budget_fraction=0.3, seed=1)
    r = solve_selection(p, time_limit=0.0)
    assert r.status == "time_limit" and r.found and p.fits(r.cost)   # the warm start
    assert r.gap is None or r.gap >= 0
    none = solve_selection(p, time_limit=0.0, warm_start=False)
    assert none.status == "time_limit" and none.widths is None and none.gap is None
    d = json.loads(json.dumps(none.to_json(), allow_nan=False))
    assert d["widths"] is None and d["value"] is None and d["status"] == "time_limit"


def test_argument_checks():
    p = _knapsack()
    with pytest.raises(ValueError, match="time_limit"):
        solve_selection(p, time_limit=-1)
    with pytest.raises(ValueError, match="gap"):
        solve_selection(p, gap=float("nan"))


# ---- the data: validation, JSON -------------------------------------------------------------
def _base():
    return {"families": [{"name": "a", "widths": [0, 8, 16], "value": [0, 1, 1.5]},
                         {"name": "s", "widths": [8, 16], "value": [1, 2]}],
            "unary": [{"family": "s", "cost": [8, 16]}],
            "pairwise": [{"a": "a", "b": "s", "cost": [[0, 0], [64, 128], [128, 256]],
                          "value": [[0, 0], [0, 0.1], [0, 0.2]]}],
            "constant": 10.0, "budget": 200.0}


def _set(path, val):
    def mutate(d):
        *head, last = path
        for k in head:
            d = d[k]
        if val is _DEL:
            del d[last]
        else:
            d[last] = val
    return mutate


_DEL = object()

BAD = [
    (_set(["budget"], _DEL), "missing key"),
    (_set(["families", 0, "value"], _DEL), "missing key"),
    (_set(["families", 0, "value"], [0, 1]), "value has 2 entries, widths has 3"),
    (_set(["unary", 0, "cost"], [1, 2, 3]), "cost has 3 entries"),
    (_set(["pairwise", 0, "cost"], [[0, 0], [1, 1]]), "shape"),
    (_set(["pairwise", 0, "value"], [[0], [0], [0]]), "cost has shape (3, 2), value (3, 1)"),
    (_set(["budget"], float("nan")), "finite"),
    (_set(["constant"], float("inf")), "finite"),
    (_set(["families", 1, "value"], [1, float("inf")]), "finite"),
    (_set(["budget"], "10"), "must be a number"),
    (_set(["budget"], True), "must be a number"),
    (_set(["unary", 0, "family"], "nope"), "unknown family 'nope'"),
    (_set(["pairwise", 0, "b"], "nope"), "unknown family 'nope'"),
    (_set(["pairwise", 0, "b"], "a"), "with itself"),
    (_set(["families", 1, "name"], "a"), "duplicate family name 'a'"),
    (_set(["families", 0, "widths"], []), "widths is empty"),
    (_set(["families", 0, "widths"], [0, 8, 8]), "width 8 appears more than once"),
    (_set(["families", 0, "widths"], [0, 8, 1.5]), "integers"),
    (_set(["families", 0, "widths"], [0, 8, -1]), "integers"),
    (_set(["families", 0, "value"], [0, "x", 1]), "must be a number"),
    (_set(["families"], []), "families is empty"),
    (_set(["families"], {"a": 1}), "families must be a list"),
    (_set(["pairwise", 0], {"a": "a", "b": "s"}), "neither cost nor value"),
    (_set(["extra"], 1), "unknown key(s) ['extra']"),
    (_set(["families", 0, "name"], ""), "non-empty string"),
]


@pytest.mark.parametrize("mutate,needle", BAD)
def test_validation_names_the_bad_value(mutate, needle):
    d = _base()
    mutate(d)
    with pytest.raises(ValueError) as exc:
        SelectionProblem.from_json(d)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_json_round_trip_and_merging():
    p = SelectionProblem.from_json(_base())
    q = SelectionProblem.from_json(json.loads(json.dumps(p.to_json())))
    for k in np.ndindex(*p.sizes):
        assert p.evaluate(k) == q.evaluate(k)
    # (a=16, s=16): value 1.5 + 2 + 0.2, cost 10 + 16 + 256
    assert p.evaluate([2, 1]) == (pytest.approx(3.7), 282.0)
    assert p.tol == pytest.approx(1e-9 * (10 + 16 + 256))


def test_problem_arrays_are_read_only_and_results_checked():
    p = SelectionProblem.from_json(_base())
    with pytest.raises(ValueError):
        p.families[0].value[0] = 1.0
    with pytest.raises(ValueError, match="status"):
        SelectionResult("done", None, None, None, None, None, 0.0)
    inf_gap = SelectionResult("time_limit", {"a": 1}, 0.0, 1.0, math.inf, 1.0, 0.1)
    assert json.loads(json.dumps(inf_gap.to_json(), allow_nan=False))["gap"] is None


def test_import_select_leaves_solvers_unloaded():
    code = ("import sys, mipprune.select, mipprune; mipprune.SelectionProblem; "
            "print(' '.join(m.split('.')[0] for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.split()
    assert "mipprune" in out
    assert not {"pyomo", "highspy", "torch"} & set(out)


# ---- command line -----------------------------------------------------------------------------
def _cli(capsys, *argv):
    return run_cli(main, capsys, *argv)


def test_cli_json(capsys, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_base()))
    code, out, err = _cli(capsys, "select", str(path), "--json")
    assert code == 0 and err == ""
    d = strict_json(out)
    assert set(d) == {"widths", "value", "cost", "status", "gap", "seconds"}
    # budget 200: (a=8, s=16) costs 10 + 16 + 128 = 154, value 1 + 2 + 0.1 = 3.1;
    # (a=16, s=8) costs 10 + 8 + 128 = 146, value 1.5 + 1 = 2.5; (a=16, s=16) 282 > 200
    assert d["widths"] == {"a": 8, "s": 16} and d["value"] == pytest.approx(3.1)
    assert d["cost"] == 154.0 and d["status"] == "optimal" and d["gap"] <= 1e-6


def test_cli_text_and_stdin(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(_base())))
    code, out, _ = _cli(capsys, "select", "-")
    assert code == 0 and out.startswith("optimal: value 3.1, cost 154")
    assert "\n  s     16 of 16\n" in out and "\n  a      8 of 16\n" in out


def test_cli_infeasible_and_time_limit_exit_0(capsys, tmp_path):
    d = _base()
    d["budget"] = 5.0  # below the constant 10
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    code, out, _ = _cli(capsys, "select", str(path), "--json")
    assert code == 0 and strict_json(out)["status"] == "infeasible" and strict_json(out)["widths"] is None
    code, out, _ = _cli(capsys, "select", str(path))
    assert code == 0 and out.startswith("infeasible")
    path.write_text(json.dumps(resnet_selection(n=3, seed=2).to_json()))
    code, out, _ = _cli(capsys, "select", str(path), "--time-limit", "0", "--json")
    assert code == 0 and strict_json(out)["status"] == "time_limit"


@pytest.mark.parametrize("mutate,needle", BAD)
def test_cli_bad_problem_one_line_exit_2(capsys, tmp_path, mutate, needle):
    d = _base()
    mutate(d)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))  # NaN/Infinity written as the (non-standard) literals
    code, out, err = _cli(capsys, "select", str(path), "--json")
    assert code == 2 and out == ""
    assert err.startswith("mipprune select: error:") and needle in err and err.count("\n") == 1


@pytest.mark.parametrize("argv,text,needle", [
    (["--time-limit", "-1"], None, "--time-limit must be >= 0"),
    (["--time-limit", "x"], None, "--time-limit must be a number"),
    (["--gap", "-0.1"], None, "--gap must be >= 0"),
    (["--gap", "inf"], None, "--gap must be finite"),
    ([], "{not json", "not valid JSON"),
    ([], "[1, 2]", "must be a JSON object"),
    ([], "", "not valid JSON"),
    ([], '{"families": [{"name": "a", "widths": [1], "value": [1e999]}], "budget": 1}', "finite"),
])
def test_cli_bad_arguments_one_line_exit_2(capsys, tmp_path, argv, text, needle):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_base()) if text is None else text)
    code, out, err = _cli(capsys, "select", str(path), *argv)
    assert code == 2 and out == "" and needle in err and err.count("\n") == 1


def test_cli_unreadable_file(capsys, tmp_path):
    code, _, err = _cli(capsys, "select", str(tmp_path / "missing.json"))
    assert code == 2 and "cannot read" in err and err.count("\n") == 1
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    code, _, err = _cli(capsys, "select", str(tmp_path / "bin.json"))
    assert code == 2 and "not text" in err and err.count("\n") == 1


def test_cli_subprocess_stdout_is_only_json():
    # a fresh process: HiGHS prints a banner on its first construction, which must not reach
    # stdout
    r = subprocess.run([sys.executable, "-m", "mipprune", "select", "-", "--json"],
                       input=json.dumps(_base()), capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and r.stderr == ""
    assert strict_json(r.stdout)["widths"] == {"a": 8, "s": 16}
    bad = subprocess.run([sys.executable, "-m", "mipprune", "select", "-"], input="{",
                         capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1
