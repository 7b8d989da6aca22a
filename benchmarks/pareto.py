"""Accuracy against MACs and measured latency for every pruning method, over seeds: a Pareto plot.

ResNet-20 on Fashion-MNIST at the ``--quick`` budget of ``python -m nn train`` (15k training
images, 5 epochs + 2 fine-tuning epochs, the same data, model, schedule and augmentation for
every method; ``dense`` trains 5 + 2 = 7 plain epochs, the same number of passes, unpruned).
Every pruning method is taken to every stated budget of ``--macs`` (``--budget macs=F`` with
``--macs-flags``, default ``--granularity 1``) and of ``--latency`` (``--budget latency=F`` with
``--latency-flags``, default ``--remove-blocks --granularity 8``; ``--remove-blocks`` dropped for
methods that remove no blocks, the Torch-Pruning ones, whose ``round_to`` is the granularity) for
every seed of ``--seeds``.

**One training per method and seed.**  Most methods' training does not depend on the budget
(with the default ``--cost``), so the first budget of a (method, seed) runs the whole pipeline
and every other budget starts from its trained network (``variational``, whose price of size
follows the budget, trains once per budget): its ``train/`` stage copied into the budget's run
folder with a ``config.json`` of the budget's command (the pipeline then resumes at the
selection; ``branch.json`` names the source).  Methods with plain training (they do not override
:meth:`nn.methods.Method.training`: ``random``, ``l1-filter``, ``tp-magnitude``) share one
training, so their comparison is paired.  A budget a method cannot take (``python -m nn train``
refuses it in one line, exit 2) is recorded as unsupported with that line; a run that crashes
is reported and retried (resumed) by the next invocation; finished runs are read back.
``--jobs`` runs go at once, each with ``--threads`` torch threads, its output in
``<run folder>.log`` (the runs of ``--threads-compare``'s other thread count share the same
``--jobs`` x ``--threads`` threads: with the defaults, its 2-thread runs go one at a time).
Latency budgets read one latency table per thread count, measured here before the runs start,
alone (``<runs>/latency-table-*.json``), at the largest batch of ``--run-latency`` (the batches
the runs themselves time).

After the runs every saved model is timed together with the dense network (BN folded,
interleaved rounds, quiet rounds only: :func:`nn.latency.measure_networks`) at each batch of
``--batches``, on ``--threads`` threads (the latency budgets' own).  Written: every point (method,
budget, seed, accuracy, MACs and latency ratios, parameters, blocks kept, command) and the mean
and standard deviation over seeds per method and budget, to ``<out>.json``, ``<out>.csv`` (the
points), ``<out>_summary.csv`` (the aggregates) and ``<out>.png`` (accuracy against the MACs ratio
and against the measured latency ratio per batch, one line per method and budget kind).
``--threads-compare`` reruns the first seed at the other thread count (1 <-> 2): runs are
deterministic per thread count, not across counts, and that spread is reported beside the seeds'.

    python -m benchmarks.pareto                        # 3 seeds, 9 methods, 8 budgets: hours
    python -m benchmarks.pareto --methods spr,l1-filter --seeds 0 --latency ''
    python -m benchmarks.pareto --full --macs 0.5,0.2 --latency '' --seeds 0   # 60k images
    python -m benchmarks.pareto --tiny --out /tmp/p/result --runs /tmp/p/runs   # ~20 s test
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from benchmarks import _common

METHODS = ("dense", "random", "l1-filter", "slimming", "spr", "bigm", "variational",
           "tp-groupnorm", "tp-magnitude")
KINDS = ("macs", "latency")
FULL = {"methods": ",".join(METHODS), "macs": "0.5,0.3,0.2,0.1", "latency": "0.5,0.3,0.2,0.1",
        "latency_flags": "--remove-blocks --granularity 8", "seeds": "0,1,2", "epochs": 5,
        "finetune_epochs": 2, "run_latency": "64", "repeats": 20, "patience": 120.0,
        "wait_load": 1.0, "runs": "runs/pareto", "out": None}
TINY = {"methods": "dense,spr", "macs": "0.5", "latency": "0.8",
        "latency_flags": "--remove-blocks --granularity 2", "seeds": "0", "epochs": 1,
        "finetune_epochs": 1, "run_latency": "", "repeats": 3, "patience": 0.0,
        "wait_load": 0.0, "runs": "runs/pareto-tiny", "out": "runs/pareto-tiny/result"}
FULL_BUDGET = {"epochs": 4, "finetune_epochs": 2, "runs": "runs/pareto-full"}
"""Defaults of the options left unset: :data:`FULL` without ``--tiny``, :data:`TINY` with it;
``--full`` takes these three over :data:`FULL`'s."""
BASE = {"quick": ["--quick", "--data", "fashion-mnist"],
        "full": ["--data", "fashion-mnist"],
        "tiny": ["--data", "synthetic", "--synthetic", "n_train=256,n_test=128,image_size=8",
                 "--width", "0.25", "--latency-repeats", "3", "--bisect-images", "128"]}
"""The training budget every run shares: ``--quick`` on Fashion-MNIST, the whole of
Fashion-MNIST (``--full``: 60k training images, ``python -m nn train``'s own defaults but the
epochs, the schedule of ``benchmarks/fmnist_methods.py``), or the tiny test set."""
DATA = {"quick": "Fashion-MNIST, --quick budget", "full": "Fashion-MNIST, full budget (60k)",
        "tiny": "synthetic data (--tiny)"}


@dataclass(frozen=True)
class Point:
    """One run: a method at one budget (None for dense) for one seed, on ``threads`` threads."""

    method: str
    kind: str | None
    value: float | None
    seed: int
    threads: int

    @property
    def budget(self) -> str:
        return "none" if self.kind is None else f"{self.kind}={self.value:g}"

    def folder(self, runs) -> Path:
        return Path(runs) / f"t{self.threads}" / f"seed{self.seed}" / self.method / \
            self.budget.replace("=", "-")

    def label(self, main_threads: int) -> str:
        extra = "" if self.threads == main_threads else f", {self.threads} threads"
        return f"{self.method} {self.budget} seed {self.seed}{extra}"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", help=f"comma-separated (default {FULL['methods']}); "
                   "methods not registered in nn.methods are skipped with a note")
    p.add_argument("--macs", help="MAC budgets, fractions of dense ('' for none; default "
                   f"{FULL['macs']})")
    p.add_argument("--latency", help="measured-latency budgets, fractions of dense ('' for none; "
                   f"default {FULL['latency']})")
    p.add_argument("--macs-flags", default="--granularity 1",
                   help="options every MAC budget run gets; default '--granularity 1'")
    p.add_argument("--latency-flags", help="options every latency budget run gets; default "
                   f"{FULL['latency_flags']!r}")
    p.add_argument("--seeds", help=f"default {FULL['seeds']}")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of every run, of the latency tables and of the final "
                   "timing (default 1)")
    p.add_argument("--threads-compare", action="store_true",
                   help="rerun the first seed at the other thread count (1 <-> 2)")
    p.add_argument("--epochs", type=int, help="training epochs of every run (default 5, the "
                   "--quick budget; 4 with --full); dense trains epochs + fine-tuning epochs")
    p.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs (default 2)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: its own)")
    p.add_argument("--extra", default="", help="more options for every run (one string; not "
                   "the epochs)")
    p.add_argument("--run-latency", help="--latency-batches of the runs: the largest is the "
                   "latency tables' batch ('' for none: batch 1); default 64")
    p.add_argument("--batches", default="1,64", help="batches of the final timing")
    p.add_argument("--repeats", type=int, help="timed rounds (tables and final timing); "
                   "default 20")
    p.add_argument("--patience", type=float, help="seconds of extra rounds while the machine "
                   "is busy (default 120)")
    p.add_argument("--wait-load", type=float, help="before timing, wait (up to 15 min) for a "
                   "1-minute load average below this; 0: do not wait (default 1.0)")
    p.add_argument("--runs", help=f"run folders (default {FULL['runs']})")
    p.add_argument("--out", help="result stem (default benchmarks/results/pareto_fmnist_cpu)")
    p.add_argument("--tiny", action="store_true", help="test settings: synthetic 8x8 images, "
                   "ResNet-20 width 0.25, 1 + 1 epochs, dense and spr, budgets macs=0.5 and "
                   "latency=0.8, seed 0, 3 timed rounds, no waiting; runs under "
                   f"{TINY['runs']} unless --runs")
    p.add_argument("--full", action="store_true", help="the full budget: all 60k training "
                   "images (no --quick), 4 + 2 epochs unless --epochs/--finetune-epochs, the "
                   "schedule of benchmarks/fmnist_methods.py; runs under "
                   f"{FULL_BUDGET['runs']} unless --runs")
    args = p.parse_args(argv)
    if args.tiny and args.full:
        p.error("--tiny and --full exclude each other")
    args.budget_mode = "tiny" if args.tiny else "full" if args.full else "quick"
    defaults = TINY if args.tiny else {**FULL, **FULL_BUDGET} if args.full else FULL
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if min(args.jobs, args.threads, args.repeats, args.epochs) < 1 or args.finetune_epochs < 0:
        p.error("--jobs, --threads, --repeats and --epochs must be >= 1, --finetune-epochs >= 0")
    try:
        args.seed_list = _numbers(args.seeds, int)
        args.budgets = {k: _numbers(getattr(args, k), float) for k in KINDS}
        args.batch_list = _numbers(args.batches, int)
    except ValueError as e:
        p.error(str(e))
    if not args.seed_list or any(not 0 < v < 1 for b in args.budgets.values() for v in b):
        p.error("--seeds must name a seed, and budgets must be fractions in (0, 1)")
    return args


def _numbers(text: str, kind) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None


# ---- the runs ---------------------------------------------------------------------------------

def _argv(p: Point, args, table: Path | None) -> list[str]:
    """The ``python -m nn train`` command of point ``p``."""
    argv = [sys.executable, "-m", "nn", "train", "--method", p.method, "--model", "resnet20",
            *BASE[args.budget_mode], "--threads", str(p.threads), "--seed", str(p.seed),
            "--no-progress", "--latency-batches", args.run_latency, "--out",
            str(p.folder(args.runs))]
    if args.data_dir and not args.tiny:
        argv += ["--data-dir", args.data_dir]
    if p.kind is None:
        argv += ["--epochs", str(args.epochs + args.finetune_epochs), "--finetune-epochs", "0"]
    else:
        argv += ["--epochs", str(args.epochs), "--finetune-epochs", str(args.finetune_epochs),
                 "--budget", p.budget, *_flags(p.method, getattr(args, f"{p.kind}_flags"))]
    if table is not None:
        argv += ["--latency-table", str(table)]
    return argv + shlex.split(args.extra)


def _flags(method: str, flags: str) -> list[str]:
    """A budget kind's flags for ``method``: ``--remove-blocks`` dropped where the method
    removes no blocks (the Torch-Pruning methods), so it meets the same budget by width."""
    from nn.methods import get_method

    out = shlex.split(flags)
    return out if get_method(method).removes_blocks else [f for f in out
                                                          if f != "--remove-blocks"]


def _config(argv: list[str]):
    """``(RunConfig, None)`` of a ``python -m nn train`` argv, or ``(None, its one-line error)``
    -- what the command itself would refuse before any work."""
    from nn.cli import build_parser, config_from_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return config_from_args(build_parser().parse_args(argv[3:])), None
    except SystemExit:
        return None, (err.getvalue().strip().splitlines() or ["bad arguments"])[-1]
    except ValueError as e:
        return None, " ".join(str(e).split())


def _table_path(cfg, args) -> Path:
    """Where the latency table of ``cfg``'s latency budget lives: under ``--runs``, named by
    what it was measured for."""
    m, batch = cfg.model, max(cfg.runtime.latency_batches, default=1)
    return Path(args.runs) / (f"latency-table-{m.name}-w{m.width:g}-g{cfg.selection.granularity}"
                              f"-b{batch}-t{cfg.runtime.threads}.json")


def _measure_table(cfg, path: Path, args) -> None:
    """Measure the latency table a latency budget of ``cfg`` reads, here and alone (no run of
    this benchmark going), unless ``path`` exists: the run's model, input, threads, granularity
    and batch (the largest of its ``latency_batches``)."""
    if path.exists():
        return
    from nn import build_model, load_dataset
    from nn.latency import fit_constant, measure_table, save_table

    d, m = cfg.data, cfg.model
    extra = {"seed": cfg.runtime.seed, **(d.synthetic or {})} if d.name == "synthetic" else {}
    bundle = load_dataset(d.name, d.dir, subset=d.subset, **extra)
    size = (bundle.in_channels, bundle.image_size, bundle.image_size)
    model = build_model(m.name, bundle.num_classes, bundle.in_channels, m.width, m.shortcut)
    batch = max(cfg.runtime.latency_batches, default=1)
    if args.wait_load > 0:
        _common.wait_for_load(args.wait_load)
    print(f"measuring the latency table {path} (batch {batch}, {cfg.runtime.threads} "
          f"threads, granularity {cfg.selection.granularity})", flush=True)
    kw = dict(repeats=args.repeats, patience_s=args.patience, progress=False)
    table = measure_table(model.eval(), size, batch, "cpu", "float32", cfg.runtime.threads,
                          cfg.selection.granularity, **kw)
    save_table(fit_constant(table, model, size, **kw), path)


def _branch(trained: Path, out: Path, cfg) -> None:
    """Start ``out`` from ``trained``'s finished training stage: its ``train/`` folder and the
    ``config.json`` of ``cfg`` (the pipeline then resumes at the selection)."""
    from nn.io import write_json

    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(trained / "train", out / "train", dirs_exist_ok=True)
    write_json(out / "config.json", cfg.to_dict(), checked=True)
    (out / "branch.json").write_text(json.dumps({"train_copied_from": str(trained)}) + "\n")


def _trained_in(out: Path) -> str:
    b = out / "branch.json"
    return json.loads(b.read_text())["train_copied_from"] if b.exists() else str(out)


def _run(out: Path, argv: list[str], cfg, source: Path | None) -> dict:
    """Run (or resume) one pipeline, branched from ``source`` first when it has no training of
    its own; its output goes to ``<out>.log`` beside it.  The outcome: status ``done``,
    ``unsupported`` (exit 2: the command's one-line refusal) or ``failed``."""
    if source is not None and source != out and not (out / "train" / "done.json").exists():
        _branch(source, out, cfg)
    run = argv + (["--resume"] if (out / "config.json").exists() else [])
    log = out.parent / f"{out.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"$ {shlex.join(run)}\n")
        fh.flush()
        start = log.stat().st_size
        rc = subprocess.run(run, stdout=fh, stderr=subprocess.STDOUT, cwd=_common.REPO).returncode
    res = {"seconds": time.monotonic() - t0, "read_back": False}
    if rc == 0:
        return res | {"status": "done"}
    text = log.read_bytes()[start:].decode(errors="replace")  # what this attempt printed
    lines = [ln for ln in text.splitlines() if ln.strip()] or ["(no output)"]
    if rc == 2:
        said = [ln for ln in lines if ": error: " in ln] or lines
        return res | {"status": "unsupported", "error": said[-1].strip()}
    return res | {"status": "failed", "error": f"exit status {rc}: {lines[-1]} (see {log})"}


def _train_key(p: Point) -> str:
    """Points with the same key (and seed, threads) train the same network: methods with
    plain training share one; a method whose training follows the budget trains per budget."""
    from nn.methods import Method, get_method

    method = get_method(p.method)
    if method.trains_to_budget and p.kind is not None:
        return f"{p.method} {p.budget}"
    plain = p.method != "dense" and type(method).training is Method.training
    return "plain" if plain else p.method


def run_points(points: list[Point], args) -> dict[Point, dict]:
    """Every point's outcome (module docstring): read back, refused up front, or run in
    ``--jobs`` parallel subprocesses, each (method, seed, threads) training once."""
    outcome: dict[Point, dict] = {}
    queue: dict[tuple, list[Point]] = {}  # per training group: points not yet started
    source: dict[tuple, Path] = {}  # per training group: a folder with a finished training
    argvs, cfgs = {}, {}
    n, k = len(points), [0]

    def report(p, res):
        k[0] += 1
        if res["status"] == "done":
            what = "read back (finished earlier)" if res["read_back"] else \
                f"done in {res['seconds']:.1f} s"
        else:
            what = f"{res['status']}: {res['error']}"
        print(f"[{k[0]}/{n}] {p.label(args.threads)}: {what}", flush=True)
        outcome[p] = res

    group = {p: (_train_key(p), p.seed, p.threads) for p in points}
    for p in points:
        out, table = p.folder(args.runs), None
        finished = (out / "report.json").exists()
        if (out / "train" / "done.json").exists():
            source.setdefault(group[p], out)
        if p.kind == "latency":
            cfg, err = _config(_argv(p, args, None))
            table = None if cfg is None else _table_path(cfg, args)
            if table is not None and not finished:
                _measure_table(cfg, table, args)
        argvs[p] = _argv(p, args, table)
        if finished:
            report(p, {"status": "done", "read_back": True, "seconds": 0.0, "argv": argvs[p]})
            continue
        cfgs[p], err = _config(argvs[p])
        if err is not None:
            report(p, {"status": "unsupported", "error": err, "read_back": False,
                       "argv": argvs[p]})
            continue
        queue.setdefault(group[p], []).append(p)

    capacity = args.jobs * args.threads  # the CPU threads granted: --jobs runs of --threads
    # start() alone decides what runs: a worker per granted thread, so a point it starts is
    # running, not waiting in the pool (1-thread runs of --threads 2's compare go 2 x jobs)
    with ThreadPoolExecutor(max_workers=capacity) as pool:
        running, pending = {}, []  # pending: released, waiting for threads to free up

        def release(g):
            """Queue what group ``g`` can run: everything once it has a trained network,
            else its first point alone (which trains it)."""
            todo = queue.get(g, [])
            while todo and (g in source or not any(
                    group[q] == g for q in [*running.values(), *pending])):
                pending.append(todo.pop(0))
                if g not in source:
                    break

        def start():
            """Start pending points in order while their threads fit in ``capacity`` (a run
            of the other thread count of ``--threads-compare`` takes its own share: two
            2-thread runs on 2 granted threads would run at a fraction of the speed)."""
            while pending and (not running or sum(q.threads for q in running.values())
                               + pending[0].threads <= capacity):
                p = pending.pop(0)
                running[pool.submit(_run, p.folder(args.runs), argvs[p], cfgs[p],
                                    source.get(group[p]))] = p

        for g in list(queue):
            release(g)
        start()
        while running:
            ended, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in ended:
                p = running.pop(fut)
                out, g = p.folder(args.runs), group[p]
                try:
                    res = fut.result()
                except Exception as e:  # noqa: BLE001 -- e.g. a copy that failed: retried later
                    res = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                           "seconds": 0.0, "read_back": False}
                report(p, res | {"argv": argvs[p]})
                if (out / "train" / "done.json").exists():
                    source.setdefault(g, out)
                elif res["status"] == "failed" and g not in source:  # its training crashed
                    why = f"the training in {out} crashed; run again to retry"
                    for q in queue.pop(g, []):
                        report(q, {"status": "blocked", "error": why, "read_back": False,
                                   "argv": argvs[q]})
                release(g)
            start()
    return outcome


# ---- timing, rows, aggregates ----------------------------------------------------------------

def time_models(done: dict[Point, dict], args) -> tuple[dict[Point, dict], dict]:
    """Every saved model of ``done`` timed with the dense network (its inference form: BN
    folded), all interleaved, per batch of ``--batches``: ``{point: {batch: ms}}`` and the dense
    ms and timing record per batch."""
    import torch

    from nn import build_model, compress, load_pruned
    from nn.latency import inference_form, measure_networks

    torch.set_num_threads(args.threads)
    rep = next(iter(done.values()))["report"]
    m, d = rep["config"]["model"], rep["data"]
    size = tuple(d["input_size"])
    dense = inference_form(compress(build_model(m["name"], d["num_classes"], size[0], m["width"],
                                                m["shortcut"]), {}))
    pts = list(done)
    nets = [dense] + [inference_form(load_pruned(p.folder(args.runs) / "pruned.pt"))
                      for p in pts]
    ms, record = {p: {} for p in pts}, {}
    for b in args.batch_list:
        if args.wait_load > 0:
            _common.wait_for_load(args.wait_load)
        print(f"timing {len(nets)} networks at batch {b} ({args.repeats} rounds, "
              f"{args.threads} threads)", flush=True)
        t, res = measure_networks(nets, size, b, "cpu", "float32", args.threads, args.repeats,
                                  patience_s=args.patience, progress=False)
        record[b] = {"dense_ms": t[0], "rounds": res["rounds"],
                     "quiet_rounds": res["quiet_rounds"], "disturbed": res["disturbed"],
                     "load_average_1_5_15": _common.load_average()}
        for p, v in zip(pts, t[1:]):
            ms[p][b] = v
    return ms, record


def point_row(p: Point, res: dict, ms: dict | None, record: dict, args) -> dict:
    rep = res.get("report") or {}
    cx, acc = rep.get("complexity", {}), rep.get("accuracy", {})
    row = {"method": p.method, "budget": p.budget, "budget_kind": p.kind,
           "budget_value": p.value, "seed": p.seed, "threads": p.threads,
           "status": res["status"], "error": res.get("error"),
           "test_acc": acc.get("test_final"), "test_acc_pruned": acc.get("test_after_pruning"),
           "macs_ratio": cx.get("macs_ratio"), "macs": cx.get("pruned", {}).get("macs"),
           "params": cx.get("pruned", {}).get("params"), "params_ratio": cx.get("params_ratio"),
           "blocks_kept": rep.get("blocks_kept"), "blocks": len(rep.get("blocks", [])) or None}
    for b in args.batch_list:
        t = (ms or {}).get(b)
        row[f"latency_ratio_b{b}"] = None if t is None else t / record[b]["dense_ms"]
        row[f"latency_ms_b{b}"] = t
    t = rep.get("timings", {})
    row |= {"train_s": t.get("train"), "finetune_s": t.get("finetune"),
            "run": str(p.folder(args.runs)), "trained_in": res.get("trained_in"),
            "read_back": res.get("read_back"), "seconds": res.get("seconds"),
            "command": shlex.join(["python", *res["argv"][1:]]) if "argv" in res else None}
    return row


def aggregate(rows: list[dict], args) -> list[dict]:
    """Mean and standard deviation over seeds per method and budget (the ``--threads`` runs)."""
    out, keys = [], []
    for r in rows:
        if r["threads"] == args.threads and (r["method"], r["budget"]) not in keys:
            keys.append((r["method"], r["budget"]))
    for method, budget in keys:
        sub = [r for r in rows if (r["method"], r["budget"], r["threads"])
               == (method, budget, args.threads)]
        ok = [r for r in sub if r["status"] == "done"]
        a = {"method": method, "budget": budget, "budget_kind": sub[0]["budget_kind"],
             "budget_value": sub[0]["budget_value"], "seeds": len(ok),
             "unsupported": sum(r["status"] == "unsupported" for r in sub),
             "failed": sum(r["status"] in ("failed", "blocked") for r in sub)}
        for key in ["test_acc", "macs_ratio", "params", "blocks_kept"] + \
                [f"latency_ratio_b{b}" for b in args.batch_list]:
            a[f"{key}_mean"], a[f"{key}_std"] = _common.mean_std(
                [r[key] for r in ok if r[key] is not None])
        a["macs_ratio_max"] = max((r["macs_ratio"] for r in ok), default=None)
        a["error"] = next((r["error"] for r in sub if r["error"]), None)
        out.append(a)
    return out


def threads_spread(rows: list[dict], aggs: list[dict], args) -> dict | None:
    """The points run at both thread counts side by side; the mean |accuracy difference| beside
    the mean standard deviation over seeds."""
    main = {(r["method"], r["budget"], r["seed"]): r for r in rows
            if r["threads"] == args.threads and r["status"] == "done"}
    pairs = []
    for r in rows:
        b = main.get((r["method"], r["budget"], r["seed"]))
        if r["threads"] != args.threads and r["status"] == "done" and b is not None:
            pairs.append({"method": r["method"], "budget": r["budget"], "seed": r["seed"],
                          "threads": [b["threads"], r["threads"]],
                          "test_acc": [b["test_acc"], r["test_acc"]],
                          "macs_ratio": [b["macs_ratio"], r["macs_ratio"]],
                          "test_acc_diff": r["test_acc"] - b["test_acc"]})
    if not pairs:
        return None
    stds = [a["test_acc_std"] for a in aggs if a["seeds"] > 1]
    return {"threads": pairs[0]["threads"], "pairs": pairs,
            "mean_abs_acc_diff": statistics.fmean(abs(x["test_acc_diff"]) for x in pairs),
            "mean_seed_std_acc": statistics.fmean(stds) if stds else None}


def plot(aggs: list[dict], path: Path, args) -> None:
    """Accuracy against the MACs ratio and the measured latency ratio per batch: one line per
    method and budget kind through the budgets' means, error bars one std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    xs = [("macs_ratio", "MACs / dense")] + [(f"latency_ratio_b{b}", f"measured latency / "
                                              f"dense, batch {b}") for b in args.batch_list]
    fig, axes = plt.subplots(1, len(xs), figsize=(4.6 * len(xs), 4.2), sharey=True,
                             squeeze=False)
    methods = list(dict.fromkeys(a["method"] for a in aggs))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    style = {None: ("*", "none", "unpruned"), "macs": ("o", "-", "MAC budgets"),
             "latency": ("^", "--", "latency budgets")}
    for ax, (key, label) in zip(axes[0], xs):
        for m in methods:
            for kind, (marker, line, _) in style.items():
                sub = sorted((a for a in aggs if a["method"] == m and a["budget_kind"] == kind
                              and a["seeds"] and a[f"{key}_mean"] is not None),
                             key=lambda a: a[f"{key}_mean"])
                if sub:
                    ax.errorbar([a[f"{key}_mean"] for a in sub],
                                [100 * a["test_acc_mean"] for a in sub],
                                xerr=[a[f"{key}_std"] for a in sub],
                                yerr=[100 * a["test_acc_std"] for a in sub], color=colors[m],
                                marker=marker, linestyle=line, ms=9 if kind is None else 5,
                                capsize=2)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%), mean ± std over seeds")
    handles = [Line2D([], [], color=colors[m], lw=2, label=m) for m in methods] + \
        [Line2D([], [], color="gray", marker=mk, linestyle=ls, label=lab)
         for mk, ls, lab in style.values()]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(f"ResNet-20, {DATA[args.budget_mode]}: seeds {args.seeds}, "
                 f"{args.threads} thread(s)")
    fig.tight_layout()
    _common.write_png(path, fig)
    plt.close(fig)


def print_summary(aggs: list[dict], spread: dict | None, args) -> None:
    def pm(a, key, scale=1.0, f=".3f"):
        mean, std = a[f"{key}_mean"], a[f"{key}_std"]
        return "" if mean is None else f"{scale * mean:{f}} ± {scale * std:{f}}"

    lat = [f"latency_ratio_b{b}" for b in args.batch_list]
    shown = [{"method": a["method"], "budget": a["budget"],
              "seeds": f"{a['seeds']}" + (f" ({a['unsupported']} unsupported)"
                                          if a["unsupported"] else ""),
              "acc": pm(a, "test_acc", 100, ".2f"), "macs": pm(a, "macs_ratio"),
              **{k: pm(a, k) for k in lat}} for a in aggs]
    print(_common.table(shown, [("method", "method", ""), ("budget", "budget", ""),
                                ("seeds", "seeds", ""), ("acc", "test acc (%)", ""),
                                ("macs", "MACs / dense", "")]
                        + [(k, f"latency / dense b{k.rsplit('b', 1)[1]}", "") for k in lat]))
    for a in aggs:
        if a["error"]:
            print(f"{a['method']} {a['budget']}: {a['error']}")
    if spread:
        std = spread["mean_seed_std_acc"]
        print(f"threads {spread['threads'][0]} vs {spread['threads'][1]} (seed "
              f"{args.seed_list[0]}, {len(spread['pairs'])} points): mean |accuracy difference| "
              f"{100 * spread['mean_abs_acc_diff']:.2f} pp; mean std over seeds "
              + ("-" if std is None else f"{100 * std:.2f} pp"))


def main(argv=None) -> int:
    args = parse(argv)
    from nn.methods import METHODS as REGISTERED, get_method

    methods, skipped = [], {}
    for m in dict.fromkeys(x.strip() for x in args.methods.split(",") if x.strip()):
        try:
            if m not in REGISTERED:
                raise ValueError("not a registered method of nn.methods")
            get_method(m)
            methods.append(m)
        except Exception as e:  # noqa: BLE001 -- a method that cannot load is skipped, said why
            skipped[m] = " ".join(str(e).split()) or type(e).__name__
            print(f"note: skipping {m}: {skipped[m]}", flush=True)
    if not methods:
        raise SystemExit("no method to run")
    threads = [args.threads] + ([2 if args.threads == 1 else 1] if args.threads_compare else [])
    points = [Point(m, k, v, s, t) for t in threads
              for s in (args.seed_list if t == args.threads else args.seed_list[:1])
              for m in methods
              for k, v in ([(None, None)] if m == "dense" else
                           [(k, v) for k in KINDS for v in args.budgets[k]])]
    info = _common.machine_info("cpu")
    print(_common.format_machine(info), flush=True)
    t0 = time.monotonic()
    outcome = run_points(points, args)
    for p, res in outcome.items():
        out = p.folder(args.runs)
        if res["status"] == "done":
            res["report"] = json.loads((out / "report.json").read_text())
            res["trained_in"] = _trained_in(out)
    done = {p: r for p, r in outcome.items() if r["status"] == "done"}
    ms, record = time_models(done, args) if done else ({}, {})
    rows = [point_row(p, outcome[p], ms.get(p), record, args) for p in points]
    aggs = aggregate(rows, args)
    spread = threads_spread(rows, aggs, args)

    stem = _common.results_path(args.out, "pareto_fmnist_cpu")
    counts = {s: sum(r["status"] == s for r in rows)
              for s in ("done", "unsupported", "failed", "blocked")}
    counts["read_back"] = sum(bool(r["read_back"]) for r in rows)
    _common.write_json(stem.with_suffix(".json"), {
        "benchmark": "pareto", "config": vars(args), "machine": info,
        "skipped_methods": skipped, "counts": counts,
        "timing": {str(b): v for b, v in record.items()}, "aggregates": aggs,
        "threads_compare": spread, "points": rows,
        "note": "runs trained --jobs at once; the latencies were measured afterwards, every "
                "model interleaved with the dense one (BN folded, quiet rounds)"})
    _common.write_csv(stem.with_suffix(".csv"), rows)
    _common.write_csv(stem.parent / f"{stem.name}_summary.csv", aggs)
    plot(aggs, stem.with_suffix(".png"), args)
    print_summary(aggs, spread, args)
    print(f"{len(rows)} points: {counts['done']} done ({counts['read_back']} runs read back), "
          f"{counts['unsupported']} unsupported, {counts['failed'] + counts['blocked']} failed; "
          f"{time.monotonic() - t0:.1f} s; wrote {stem}.{{json,csv,png}} and "
          f"{stem.name}_summary.csv", flush=True)
    return 1 if counts["failed"] + counts["blocked"] else 0


if __name__ == "__main__":
    sys.exit(main())
