"""The ``mipprune`` command line: penalty, solve, validate, generate, select.

Bad arguments or a malformed instance file give a one-line error and exit status 2;
``validate`` exits 1 when any check is violated.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage otherwise)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _float(name, lo=None, strict=False):
    def parse(text):
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"{name} must be finite, got {text!r}")
        if lo is not None and (x <= lo if strict else x < lo):
            raise argparse.ArgumentTypeError(f"{name} must be {'>' if strict else '>='} {lo}, got {x:g}")
        return x

    return parse


def _int(name, lo):
    def parse(text):
        try:
            x = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if x < lo:
            raise argparse.ArgumentTypeError(f"{name} must be >= {lo}, got {x}")
        return x

    return parse


def _vector(text):
    try:
        w = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--w must be comma-separated numbers, got {text!r}") from None
    if not w or not all(math.isfinite(x) for x in w):
        raise argparse.ArgumentTypeError(f"--w must be non-empty finite numbers, got {text!r}")
    return w


def _parser():
    p = _Parser(prog="mipprune", description="Structured pruning as a MIP: SPR penalty, exact "
                "solves (Pyomo + HiGHS, branch and bound), validation.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("penalty", help="closed-form SPR of one group: value, case, z*, gradient")
    q.add_argument("--a", type=_float("--a", 0), required=True, help="ridge weight a >= 0")
    q.add_argument("--b", type=_float("--b", 0), required=True, help="cost of keeping b >= 0")
    q.add_argument("--M", type=_float("--M", 0, strict=True), required=True, help="bound M > 0")
    q.add_argument("--w", type=_vector, required=True, help="weights, e.g. 0.3,-0.1,0.2")
    q.add_argument("--bigm", action="store_true", help="also print the big-M-relaxation penalty")
    q.add_argument("--json", action="store_true", help="machine-readable output")

    s = sub.add_parser("solve", help="solve an instance JSON exactly and report bounds")
    s.add_argument("instance", help='JSON: {"Q","c","groups","a","b","M"}')
    s.add_argument("--method", choices=("bnb", "enumerate"), default="bnb")
    s.add_argument("--bounds", choices=("perspective", "bigm"), default="perspective",
                   help="node bounds of branch and bound")
    s.add_argument("--gap-tol", type=_float("--gap-tol", 0), default=1e-6,
                   help="relative gap at which branch and bound stops (default 1e-6)")
    s.add_argument("--time-limit", type=_float("--time-limit", 0, strict=True), default=None)
    s.add_argument("--progress", action="store_true", help="progress bar on stderr")
    s.add_argument("--json", action="store_true")

    v = sub.add_parser("validate", help="check bound ordering and exactness on random instances")
    v.add_argument("--instances", type=_int("--instances", 1), default=10)
    v.add_argument("--groups", type=_int("--groups", 1), default=8)
    v.add_argument("--group-size", type=_int("--group-size", 1), default=3)
    v.add_argument("--kind", choices=("least_squares", "quadratic"), default="least_squares")
    v.add_argument("--seed", type=_int("--seed", 0), default=0)
    v.add_argument("--enumerate-max", type=_int("--enumerate-max", 0), default=10,
                   help="enumerate z only for instances with at most this many groups")
    v.add_argument("--json", action="store_true")

    g = sub.add_parser("generate", help="write a seeded random instance as JSON to stdout")
    g.add_argument("--groups", type=_int("--groups", 1), default=10)
    g.add_argument("--group-size", type=_int("--group-size", 1), default=3)
    g.add_argument("--kind", choices=("least_squares", "quadratic"), default="least_squares")
    g.add_argument("--ridge", type=_float("--ridge", 0), default=0.1)
    g.add_argument("--seed", type=_int("--seed", 0), default=0)

    c = sub.add_parser("select", help="choose one width per family under a cost budget (MILP, HiGHS)")
    c.add_argument("problem", help='JSON file ("-" reads stdin): {"families", "unary", "pairwise", '
                   '"constant", "budget"}')
    c.add_argument("--time-limit", type=_float("--time-limit", 0), default=None,
                   help="seconds for the whole solve (default: none)")
    c.add_argument("--gap", type=_float("--gap", 0), default=1e-6,
                   help="relative gap at which HiGHS stops (default 1e-6)")
    c.add_argument("--json", action="store_true")
    return p


def _penalty(args):
    from .penalty import bigm_value, spr, spr_grad

    w = np.asarray([args.w])
    r = spr(w, args.a, args.b, args.M)
    out = {"value": float(r.value[0]), "case": f"C{int(r.case[0])}", "z": float(r.z[0]),
           "grad": spr_grad(w, args.a, args.b, args.M)[0].tolist()}
    if args.bigm:
        out["bigm_value"] = float(bigm_value(w, args.a, args.b, args.M)[0])
    if args.json:
        print(json.dumps(out))
    else:
        print(f"SPR = {out['value']:.10g}  (case {out['case']}, z* = {out['z']:.6g})")
        print("grad = [" + ", ".join(f"{x:.6g}" for x in out["grad"]) + "]")
        if args.bigm:
            print(f"big-M penalty = {out['bigm_value']:.10g}")
    return 0


def _solve(args):
    from .instance import Instance

    inst = Instance.load(args.instance)  # ValueError -> exit 2 in main
    from .bnb import branch_and_bound
    from .bounds import bigm_bound
    from .enumerate import enumerate_solve
    from .relax import pr_bound_closed_form

    bigm = bigm_bound(inst)
    pr = pr_bound_closed_form(inst)
    if args.method == "bnb":
        r = branch_and_bound(inst, args.bounds, args.gap_tol, args.time_limit, progress=args.progress)
        w, z, obj, lb, gap, secs = r.w, r.z, r.objective, r.lower_bound, r.gap, r.seconds
        extra = {"nodes": r.nodes, "status": r.status, "bounds": args.bounds}
    else:
        r = enumerate_solve(inst)
        w, z, obj, lb, gap, secs = r.w, r.z, r.value, r.value, 0.0, r.seconds
        extra = {"patterns": r.patterns, "status": "optimal"}
    out = {"objective": obj, "w": w.tolist(), "z": [int(round(x)) for x in z], "lower_bound": lb,
           "gap": gap, "bigm_bound": bigm.value, "pr_bound": pr.lower_bound, "seconds": secs,
           "method": args.method, **extra}
    if args.json:
        print(json.dumps(out))
    else:
        kept = int(np.sum(z))
        print(f"objective   {obj:.10g}   ({args.method}, {extra['status']}, "
              f"{kept}/{inst.n_groups} groups kept)")
        print(f"lower bound {lb:.10g}   gap {gap:.2e}   {secs:.3f} s"
              + (f"   {extra['nodes']} nodes" if "nodes" in extra else ""))
        print(f"root bounds: big-M {bigm.value:.10g}  <=  perspective {pr.lower_bound:.10g}")
        print("z = " + "".join(str(int(round(x))) for x in z))
    return 0


def _validate(args):
    from .validate import format_table, to_json, validate

    checks = validate(args.instances, args.groups, args.seed, args.group_size, args.kind,
                      args.enumerate_max, progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(to_json(checks)))
    else:
        print(format_table(checks))
    return 0 if all(c.ok for c in checks) else 1


def _generate(args):
    from .instance import random_instance

    inst = random_instance(args.groups, args.group_size, args.seed, args.kind, ridge=args.ridge)
    print(json.dumps(inst.to_dict()))
    return 0


def _read_json(path):
    """The JSON document in ``path`` ("-": stdin); ValueError (one line) when unreadable."""
    where = "stdin" if path == "-" else f"file {path}"
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
    except OSError as exc:
        raise ValueError(f"cannot read {where}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where} is not text (JSON expected): {exc.reason}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply") from None


def _select(args):
    from .select import SelectionProblem, solve_selection

    problem = SelectionProblem.from_json(_read_json(args.problem))
    r = solve_selection(problem, time_limit=args.time_limit, gap=args.gap)
    if args.json:
        print(json.dumps(r.to_json(), allow_nan=False))
        return 0
    n = len(problem.families)
    if r.status == "infeasible":
        print(f"infeasible: no choice of widths fits the budget {problem.budget:.10g} "
              f"({n} families, {r.seconds:.3f} s)")
        return 0
    if not r.found:
        print(f"time limit: no feasible choice found within {args.time_limit:g} s "
              f"({n} families, {r.seconds:.3f} s)")
        return 0
    gap = "unknown" if r.gap is None else f"{r.gap:.2e}"
    print(f"{r.status}: value {r.value:.10g}, cost {r.cost:.10g} <= budget {problem.budget:.10g}")
    print(f"gap {gap}   {r.seconds:.3f} s   {n} families")
    wide = max(len(name) for name in r.widths)
    for f in problem.families:
        print(f"  {f.name:<{wide}}  {r.widths[f.name]:>5} of {int(f.widths.max())}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    handler = {"penalty": _penalty, "solve": _solve, "validate": _validate,
               "generate": _generate, "select": _select}[args.command]
    try:
        return handler(args)
    except ValueError as exc:
        print(f"mipprune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
