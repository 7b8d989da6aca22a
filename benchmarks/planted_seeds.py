"""How often each gate estimator recovers the planted structure (nn.methods.variational.planted).

For every estimator of ``--estimators`` and every seed of ``--seeds``: the pruner is trained on
the planted problem of that seed (a teacher's units and blocks embedded among distractors),
rounded, BN-recalibrated and compressed; a seed counts as recovered when exactly the teacher's
units and blocks are kept and the compressed network agrees with the teacher on >= 97% of
held-out inputs.  One thread (the problem is tiny; the outcome is deterministic per seed and
thread count).  Printed and written (``<out>.json``, ``<out>.csv``): per estimator the seeds
recovered, and per seed the agreement, what was kept wrongly and the seconds it took.

    python -m benchmarks.planted_seeds                          # batched and flip, seeds 0-9
    python -m benchmarks.planted_seeds --estimators batched --option flip_samples=8
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import _common
from nn.methods.variational import ESTIMATORS
from nn.methods.variational.planted import run


def _option(text: str) -> tuple[str, int]:
    key, _, value = text.partition("=")
    try:
        return key.strip(), int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--option must be name=integer (e.g. flip_samples=8), "
                                         f"got {text!r}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--estimators", default="batched,flip",
                   help=f"comma-separated, of {', '.join(ESTIMATORS)}")
    p.add_argument("--seeds", default="0-9", help="a range a-b or a comma-separated list")
    p.add_argument("--option", type=_option, action="append", default=[],
                   help="an integer VariationalOptions field for every estimator, name=value "
                        "(repeatable)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    ests = [e.strip() for e in args.estimators.split(",") if e.strip()]
    bad = [e for e in ests if e not in ESTIMATORS]
    if bad or not ests:
        p.error(f"--estimators must be among {', '.join(ESTIMATORS)}, got {args.estimators!r}")
    try:
        if "-" in args.seeds:
            lo, hi = (int(v) for v in args.seeds.split("-"))
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [int(v) for v in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be a-b or a comma-separated list of integers, got {args.seeds!r}")
    options = dict(args.option)
    torch.set_num_threads(1)
    info = _common.machine_info()
    print(_common.format_machine(info), flush=True)
    rows, summary = [], []
    for est in ests:
        got = 0
        for seed in seeds:
            try:
                res = run(seed, estimator=est, **options)
            except (TypeError, ValueError) as e:
                p.error(f"bad --option for VariationalOptions: {e}")
            got += res["recovered"]
            rows.append({"estimator": est, **{k: v for k, v in res.items() if k != "theta"},
                         "wrong": ";".join(res["wrong"])})
            print(f"{est} seed {seed}: {'recovered' if res['recovered'] else 'NOT recovered'}, "
                  f"agreement {res['agreement']:.3f}"
                  + (f", wrong: {', '.join(res['wrong'])}" if res["wrong"] else "")
                  + f" ({res['seconds']:.1f} s)", flush=True)
        summary.append({"estimator": est, "recovered": got, "seeds": len(seeds)})
        print(f"{est}: recovered {got} of {len(seeds)} seeds", flush=True)
    out = _common.results_path(args.out, "planted_seeds")
    _common.write_json(out.with_suffix(".json"), {
        "benchmark": "planted_seeds", "machine": info, "options": options, "seeds": seeds,
        "summary": summary, "runs": rows})
    _common.write_csv(out.with_suffix(".csv"), rows)
    print(f"wrote {out.with_suffix('.json')} and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
