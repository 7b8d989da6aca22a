"""The ``mipprune`` command line: penalty, solve, validate, generate, select.

One concept: the command-line contract (parsing, one-line errors, Ctrl-C, strict JSON output)
in one place; each command body is a few lines calling the library.

The contract: every bad input a user can give -- arguments, an unreadable, malformed or
invalid input file, a size that cannot fit in memory -- is one line on stderr and exit status 2;
``validate`` exits 1 only when a check is violated; Ctrl-C stops any command within a fraction
of a second with one line on stderr and exit status 130 (no partial result is printed).
Every ``--json`` output is strict JSON: a number that is not finite is ``null`` beside a status
that says why.  ``--time-limit`` caps the whole command (reading the input included) through
one :class:`~mipprune.deadline.Deadline` that every phase checks, and ``seconds`` is the wall
time of the whole command.

Ctrl-C: a Python signal handler runs only between bytecodes of the main thread, and a HiGHS
run or a LAPACK factorisation can keep the thread that called it in C++ for minutes (HiGHS'
MIP calls its interrupt callback only between nodes).  So, as highspy itself does for
KeyboardInterrupt, the command runs in a worker thread while the main thread waits in slices
of ``_POLL`` seconds, ready to run the handler: HiGHS and LAPACK release the GIL, and the
compiled FISTA loop gives it up whenever it reads the clock.  Only C code that holds the GIL
throughout (the JSON parser on a very large file) delays it.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time

import numpy as np

from .deadline import Deadline
from .jsonio import dumps, read_json

__all__ = ["main"]

_COMMANDS = ("penalty", "solve", "validate", "generate", "select")


class _Parser(argparse.ArgumentParser):
    """One-line errors (exit 2), and a record of the options that take a value."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.value_options = set()

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.option_strings and action.nargs is None:
            self.value_options.update(action.option_strings)
        return action

    def error(self, message):  # one line, exit 2 (argparse prints the whole usage otherwise)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _float(name, lo=None, strict=False, below=None):
    """A finite number >= lo (> lo if ``strict``) and < ``below``."""
    def parse(text):
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"{name} must be finite, got {text!r}")
        if below is not None and not (lo <= x < below):
            raise argparse.ArgumentTypeError(f"{name} must be in [{lo:g}, {below:g}), got {x:g}")
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
    parts = text.split(",")
    try:
        w = [float(x) for x in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--w must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(x) for x in w):
        raise argparse.ArgumentTypeError(f"--w must be finite numbers, got {text!r}")
    return w


def _parser():
    p = _Parser(prog="mipprune", description="Structured pruning as a MIP: SPR penalty, exact "
                "solves (branch and bound, enumeration), validation, width selection.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser,
                           metavar="{" + ",".join(_COMMANDS) + "}")
    json_help = "print one strict-JSON object instead of text"

    q = sub.add_parser("penalty", help="closed-form SPR of one group: value, case, z*, gradient")
    q.add_argument("--a", type=_float("--a", 0), required=True, help="ridge weight a >= 0")
    q.add_argument("--b", type=_float("--b", 0), required=True, help="cost of keeping b >= 0")
    q.add_argument("--M", type=_float("--M", 0, strict=True), required=True, help="bound M > 0")
    q.add_argument("--w", type=_vector, required=True,
                   help="weights, comma-separated, e.g. 0.3,-0.1,0.2 (a leading minus is fine)")
    q.add_argument("--bigm", action="store_true", help="also print the big-M-relaxation penalty")
    q.add_argument("--json", action="store_true", help=json_help)

    s = sub.add_parser("solve", help="solve an instance JSON exactly and report bounds")
    s.add_argument("instance", help='JSON file ("-" reads stdin): {"Q","c","groups","a","b","M"}')
    s.add_argument("--method", choices=("bnb", "enumerate"), default="bnb",
                   help="branch and bound (default), or enumeration of every z (at most "
                        "16 groups)")
    s.add_argument("--bounds", choices=("perspective", "bigm"), default="perspective",
                   help="node bounds of branch and bound (default perspective)")
    s.add_argument("--gap-tol", type=_float("--gap-tol", 0, below=1), default=1e-6,
                   help="relative gap in [0, 1) at which branch and bound stops (default 1e-6); "
                        "a gap above 1e-6 is reported 'within tolerance', not 'optimal'")
    s.add_argument("--time-limit", type=_float("--time-limit", 0, strict=True), default=None,
                   help="seconds for the whole command, reading the instance included "
                        "(default: none); the best solution found and its bound are reported")
    s.add_argument("--progress", action="store_true", help="progress bar on stderr")
    s.add_argument("--json", action="store_true", help=json_help)

    v = sub.add_parser("validate", help="check bound ordering and exactness on random instances")
    v.add_argument("--instances", type=_int("--instances", 1), default=10,
                   help="number of random instances, seeds SEED, SEED+1, ... (default 10)")
    v.add_argument("--groups", type=_int("--groups", 1), default=8,
                   help="groups per instance (default 8)")
    v.add_argument("--group-size", type=_int("--group-size", 1), default=3,
                   help="variables per group (default 3)")
    v.add_argument("--kind", choices=("least_squares", "quadratic"), default="least_squares",
                   help="instance family (default least_squares)")
    v.add_argument("--seed", type=_int("--seed", 0), default=0, help="first seed (default 0)")
    v.add_argument("--enumerate-max", type=_int("--enumerate-max", 0), default=10,
                   help="enumerate z only for instances with at most this many groups (default 10); "
                        "the others skip the enumeration check, and the summary says so")
    v.add_argument("--json", action="store_true", help=json_help)

    g = sub.add_parser("generate", help="write a seeded random instance as JSON to stdout")
    g.add_argument("--groups", type=_int("--groups", 1), default=10, help="number of groups (default 10)")
    g.add_argument("--group-size", type=_int("--group-size", 1), default=3,
                   help="variables per group (default 3)")
    g.add_argument("--kind", choices=("least_squares", "quadratic"), default="least_squares",
                   help="least squares of one linear layer (default) or a random convex quadratic")
    g.add_argument("--ridge", type=_float("--ridge", 0), default=0.1,
                   help="ridge weight a relative to the loss curvature (default 0.1)")
    g.add_argument("--seed", type=_int("--seed", 0), default=0, help="random seed (default 0)")

    c = sub.add_parser("select", help="choose one width per family under a cost budget (MILP, HiGHS)")
    c.add_argument("problem", help='JSON file ("-" reads stdin): {"families", "unary", "pairwise", '
                   '"constant", "budget"}')
    c.add_argument("--time-limit", type=_float("--time-limit", 0), default=None,
                   help="seconds for the whole command, reading the problem included (default: none)")
    c.add_argument("--gap", type=_float("--gap", 0), default=1e-6,
                   help="relative gap at which HiGHS stops (default 1e-6); a gap above 1e-6 is "
                        "reported 'within tolerance', not 'optimal'")
    c.add_argument("--json", action="store_true", help=json_help)
    for parser in sub.choices.values():
        p.value_options |= parser.value_options
    return p


def _join_negative_values(argv, options):
    """``--w -0.3,0.1`` as ``--w=-0.3,0.1``: argparse takes a token that starts with '-' and is
    not a plain negative number for an option, so a value-taking option followed by a token
    that starts with '-' and a digit, '.', 'inf' or 'nan' (no option of ours does) is joined."""
    out = []
    for i, tok in enumerate(argv):
        if tok == "--":
            return out + list(argv[i:])
        rest = tok[1:2].isdigit() or tok[1:2] == "." or tok[1:4].lower() in ("inf", "nan")
        if out and out[-1] in options and tok.startswith("-") and rest:
            out[-1] = f"{out[-1]}={tok}"
        else:
            out.append(tok)
    return out


def _number(x, fmt=".10g"):
    """``x`` formatted, or "unknown" when it is not finite."""
    return format(x, fmt) if x is not None and math.isfinite(x) else "unknown"


def _penalty(args, deadline):
    from .penalty import bigm_value, spr, spr_grad

    w = np.asarray([args.w])
    with np.errstate(all="ignore"):  # overflow is reported below, naming what overflowed
        r = spr(w, args.a, args.b, args.M)
        out = {"value": float(r.value[0]), "case": f"C{int(r.case[0])}", "z": float(r.z[0]),
               "grad": spr_grad(w, args.a, args.b, args.M)[0].tolist()}
        if args.bigm:
            out["bigm_value"] = float(bigm_value(w, args.a, args.b, args.M)[0])
    bad = [k for k in ("value", "z", "grad", "bigm_value")
           if k in out and not np.all(np.isfinite(out[k]))]
    if bad:
        raise ValueError(f"the penalty overflows double precision for these inputs ({', '.join(bad)} "
                         f"not finite): a, b, w and b/M must keep a||w||^2 + b and the gradient "
                         f"below {sys.float_info.max:.3g}")
    if args.json:
        print(dumps(out))
    else:
        print(f"SPR = {out['value']:.10g}  (case {out['case']}, z* = {out['z']:.6g})")
        print("grad = [" + ", ".join(f"{x:.6g}" for x in out["grad"]) + "]")
        if args.bigm:
            print(f"big-M penalty = {out['bigm_value']:.10g}")
    return 0


_ENUMERATE_MAX = 16  # groups: 2^16 patterns


def _solve(args, deadline):
    from .instance import Instance

    inst = Instance.load(args.instance)
    if args.method == "enumerate" and inst.n_groups > _ENUMERATE_MAX:
        raise ValueError(f"--method enumerate takes at most {_ENUMERATE_MAX} groups (2^"
                         f"{_ENUMERATE_MAX} patterns), the instance has {inst.n_groups}: use bnb")
    from .bnb import branch_and_bound
    from .enumerate import enumerate_solve
    from .relax import pr_bound_closed_form

    bigm = pr_bound_closed_form(inst, "bigm", time_limit=deadline).lower_bound
    pr = pr_bound_closed_form(inst, time_limit=deadline).lower_bound
    if args.method == "bnb":
        r = branch_and_bound(inst, args.bounds, args.gap_tol, deadline, progress=args.progress)
        w, z, obj, lb, status = r.w, r.z, r.objective, r.lower_bound, r.status
        extra = {"nodes": r.nodes}
    else:
        r = enumerate_solve(inst, max_groups=_ENUMERATE_MAX, time_limit=deadline)
        w, z, obj, status = r.w, r.z, r.value, r.status
        lb = r.value if status == "optimal" else -math.inf
        extra = {"patterns": r.patterns}
    lb = max(lb, bigm, pr)  # every one is a certified lower bound on the optimum
    gap = max(obj - lb, 0.0) / max(abs(obj), 1e-10)
    secs = deadline.elapsed()
    out = {"objective": obj, "w": w, "z": [int(round(x)) for x in z], "lower_bound": lb,
           "gap": gap, "bigm_bound": bigm, "pr_bound": pr, "seconds": secs,
           "method": args.method, **extra, "status": status}
    if args.method == "bnb":
        out["bounds"] = args.bounds
    if args.json:
        print(dumps(out))
        return 0
    kept = int(np.sum(z))
    print(f"objective   {obj:.10g}   ({args.method}, {status.replace('_', ' ')}, "
          f"{kept}/{inst.n_groups} groups kept)")
    print(f"lower bound {_number(lb)}   gap {_number(gap, '.2e')}   {secs:.3f} s"
          + (f"   {extra['nodes']} nodes" if "nodes" in extra else ""))
    print(f"root bounds: big-M {_number(bigm)}  <=  perspective {_number(pr)}")
    print("z = " + "".join(str(int(round(x))) for x in z))
    return 0


def _validate(args, deadline):
    from .validate import format_table, to_json, validate

    checks = validate(args.instances, args.groups, args.seed, args.group_size, args.kind,
                      args.enumerate_max, progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(dumps(to_json(checks)))
    else:
        print(format_table(checks))
    return 0 if all(c.ok for c in checks) else 1


def _generate(args, deadline):
    from .instance import random_instance

    inst = random_instance(args.groups, args.group_size, args.seed, args.kind, ridge=args.ridge)
    print(dumps(inst.to_dict()))
    return 0


def _select(args, deadline):
    from .select import SelectionProblem, solve_selection

    problem = SelectionProblem.from_json(read_json(args.problem, "problem file"))
    r = solve_selection(problem, time_limit=deadline, gap=args.gap)
    secs = deadline.elapsed()
    if args.json:
        print(dumps({**r.to_json(), "seconds": secs}))
        return 0
    n = len(problem.families)
    if r.status == "infeasible":
        print(f"infeasible: no choice of widths fits the budget {problem.budget:.10g} "
              f"({n} families, {secs:.3f} s)")
        return 0
    if not r.found:
        print(f"time limit: no feasible choice found within {args.time_limit:g} s "
              f"({n} families, {secs:.3f} s)")
        return 0
    print(f"{r.status.replace('_', ' ')}: value {r.value:.10g}, cost {r.cost:.10g} "
          f"<= budget {problem.budget:.10g}")
    print(f"gap {_number(r.gap, '.2e')}   {secs:.3f} s   {n} families")
    wide = max(len(name) for name in r.widths)
    for f in problem.families:
        print(f"  {f.name:<{wide}}  {r.widths[f.name]:>5} of {int(f.widths.max())}")
    return 0


def _on_interrupt(command, start):
    """A SIGINT handler: one line on stderr, exit status 130 at once, no result printed."""
    def handler(signum, frame):
        os.write(2, f"mipprune {command}: interrupted after {time.perf_counter() - start:.1f} s; "
                    "no result\n".encode())
        os._exit(128 + signal.SIGINT)

    return handler


_POLL = 0.05  # seconds between two chances of the main thread to run a signal handler


def _in_worker(fn, *args):
    """``fn(*args)`` run in a worker thread while this (main) thread waits in slices of
    ``_POLL`` seconds (module docstring); its exception, if any, is raised here."""
    outcome = {}

    def work():
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    worker = threading.Thread(target=work, name="mipprune-command", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(_POLL)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if not argv:
        parser.print_usage(sys.stderr)
        parser.exit(2, f"mipprune: error: a command is required: {', '.join(_COMMANDS)} "
                       "(mipprune -h for help)\n")
    args = parser.parse_args(_join_negative_values(argv, parser.value_options))
    deadline = Deadline(getattr(args, "time_limit", None))  # before the input is read
    handler = {"penalty": _penalty, "solve": _solve, "validate": _validate,  # (args, deadline)
               "generate": _generate, "select": _select}[args.command]
    main_thread = threading.current_thread() is threading.main_thread()  # signal.signal needs it
    if main_thread:
        previous = signal.signal(signal.SIGINT, _on_interrupt(args.command, deadline.start))
    try:
        code = _in_worker(handler, args, deadline) if main_thread else handler(args, deadline)
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not at interpreter exit
        return code
    except ValueError as exc:
        print(f"mipprune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"mipprune {args.command}: error: out of memory: the input is too large for this "
              "machine", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (mipprune ... | head): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
