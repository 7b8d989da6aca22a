"""Does the variational pruner's depth pruning answer its price?  A sweep of gamma (the cost's
block weight), with blocks removed and measured latency.

Every point is one ``python -m nn train --method variational --lam L --gamma G`` run from
scratch at the ``--quick`` budget (Fashion-MNIST, 15k training images, 5 epochs + 2 fine-tuning
epochs) for each G of ``--gammas``, one seed; runs go to ``--runs/gamma-G`` and resume or are
read back.  ``--jobs`` runs at once with ``--threads`` torch threads each.  Afterwards every saved
model is timed with the dense network (BN folded, interleaved quiet rounds:
:func:`nn.latency.measure_networks`) at each batch of ``--batches``, on ``--threads`` threads,
with nothing else running.  Reported per gamma: blocks kept, MACs, parameters, test accuracy,
the measured latency ratio to dense per batch; written to ``<out>.json``, ``<out>.csv`` and
``<out>.png`` (blocks kept and latency ratio against gamma).

    python -m benchmarks.depth_sweep                  # lam 1, gammas 0,1,4,16, seed 0
"""

from __future__ import annotations

import argparse
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import _common
from benchmarks.fmnist_methods import run


def _numbers(kind, lo):
    """An argparse type: comma-separated ``kind`` values, at least one, each >= ``lo``."""
    def parse(text: str) -> list:
        try:
            out = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            out = []
        if not out or any(v < lo for v in out):
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s >= "
                                             f"{lo}, got {text!r}")
        return out
    return parse


_floats, _ints = _numbers(float, 0), _numbers(int, 1)


def command(gamma: float, args) -> list[str]:
    return [sys.executable, "-m", "nn", "train", "--quick", "--method", "variational", "--lam",
            f"{args.lam:g}", "--gamma", f"{gamma:g}", "--seed", str(args.seed), "--threads",
            str(args.threads), "--no-progress", "--latency-batches", "",
            "--out", str(Path(args.runs) / f"gamma-{gamma:g}")] + shlex.split(args.extra)


def time_saved(folders: list[Path], args) -> tuple[list[dict], dict]:
    """Per folder ``{batch: ms}`` of its saved model and the dense network's per batch, all
    timed together in interleaved quiet rounds."""
    import torch

    from nn import build_model, compress, load_pruned
    from nn.latency import inference_form, measure_networks
    from nn.io import read_json

    torch.set_num_threads(args.threads)
    rep = read_json(folders[0] / "report.json")
    m, d = rep["config"]["model"], rep["data"]
    size = tuple(d["input_size"])
    dense = inference_form(compress(build_model(m["name"], d["num_classes"], size[0], m["width"],
                                                m["shortcut"]), {}))
    nets = [dense] + [inference_form(load_pruned(f / "pruned.pt")) for f in folders]
    out, dense_ms = [{} for _ in folders], {}
    for b in args.batches:
        if args.wait_load > 0:
            _common.wait_for_load(args.wait_load)
        print(f"timing {len(nets)} networks at batch {b} ({args.repeats} rounds)", flush=True)
        t, res = measure_networks(nets, size, b, "cpu", "float32", args.threads, args.repeats,
                                  progress=False)
        dense_ms[b] = {"ms": t[0], "quiet_rounds": res["quiet_rounds"],
                       "disturbed": res["disturbed"]}
        for o, v in zip(out, t[1:]):
            o[b] = v
    return out, dense_ms


def plot(rows: list[dict], batches: list[int], path: Path, info: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [r["gamma"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(g, [r["blocks_kept"] for r in rows], "o-", label="blocks kept")
    a1.set(xlabel="gamma (price of a block)", ylabel="blocks kept",
           title=f"variational, lam {rows[0]['lam']:g}: depth against its price")
    b1 = a1.twinx()
    b1.plot(g, [100 * r["test_acc"] for r in rows], "s--", color="C2", label="test acc (right)")
    b1.set_ylabel("test accuracy after fine-tuning (%)")
    for b in batches:
        a2.plot(g, [r[f"latency_ratio_b{b}"] for r in rows], "o-", label=f"batch {b}")
    a2.plot(g, [r["macs_ratio"] for r in rows], "k:", label="MACs ratio")
    a2.set(xlabel="gamma", ylabel="of the dense network", title="measured latency and MACs")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.text(0.01, -0.1, info, fontsize=7, family="monospace")
    _common.write_png(path, fig)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gammas", type=_floats, default=_floats("0,1,4,16"))
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", type=_ints, default=_ints("1,64"))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--wait-load", type=float, default=1.0,
                   help="before timing, wait (up to 15 min) for a 1-minute load below this; "
                        "0: do not wait")
    p.add_argument("--extra", default="", help="more options for every run (one string)")
    p.add_argument("--runs", default="runs/depth-sweep")
    p.add_argument("--out", default=None, help="result stem (default results/depth_sweep)")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.threads < 1 or args.repeats < 3 or args.lam < 0:
        p.error("--jobs and --threads must be >= 1, --repeats >= 3, --lam >= 0")
    argvs = {g: command(g, args) for g in args.gammas}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {g: pool.submit(run, f"gamma {g:g}", argvs[g]) for g in args.gammas}
        reports = {g: f.result() for g, f in futures.items()}
    folders = [Path(args.runs) / f"gamma-{g:g}" for g in args.gammas]
    ms, dense = time_saved(folders, args)
    rows = []
    for g, t in zip(args.gammas, ms):
        rep = reports[g]
        cx = rep["complexity"]
        rows.append({"gamma": g, "lam": args.lam, "seed": args.seed,
                     "test_acc": rep["accuracy"]["test_final"],
                     "blocks_kept": rep["blocks_kept"], "blocks": len(rep["blocks"]),
                     "macs": cx["pruned"]["macs"],
                     "macs_ratio": cx["pruned"]["macs"] / cx["dense"]["macs"],
                     "params": cx["pruned"]["params"],
                     **{f"latency_ms_b{b}": t[b] for b in args.batches},
                     **{f"latency_ratio_b{b}": t[b] / dense[b]["ms"] for b in args.batches},
                     "command": shlex.join(["python"] + argvs[g][1:])})
    info = _common.machine_info("cpu")
    stem = _common.results_path(args.out, "depth_sweep")
    _common.write_json(stem.with_suffix(".json"), {
        "benchmark": "depth_sweep", "machine": info, "settings": vars(args), "dense": dense,
        "rows": rows, "note": "runs trained --jobs at once; the latencies were measured "
                              "afterwards, every model interleaved with the dense one"})
    _common.write_csv(stem.with_suffix(".csv"), rows)
    plot(rows, args.batches, stem.with_suffix(".png"), _common.format_machine(info))
    print(_common.format_machine(info))
    cols = [("gamma", "gamma", "g"), ("blocks_kept", "blocks", "d"),
            ("macs_ratio", "MACs", ".3f"), ("test_acc", "acc", ".4f")]
    cols += [(f"latency_ratio_b{b}", f"lat b{b}", ".3f") for b in args.batches]
    print(_common.table(rows, cols))
    for r in rows:
        print(f"gamma {r['gamma']:g}: {r['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
