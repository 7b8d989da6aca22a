"""``python -m nn latency-table``: measure a model's latency table here and cache it.

    python -m nn latency-table --model resnet56 --batch 64 --threads 2
    python -m nn latency-table --model resnet18 --input 3,224,224 --num-classes 1000 \\
        --batch 1 --device cuda --dtype float16 --granularity 32

Measures every unit of the model's inference form at every candidate width
(:func:`nn.latency.measure_table`), fits the constant (and scale) against a few random pruned
networks measured whole (:func:`nn.latency.fit_constant`; ``--fit-networks 0``: none), writes
the table as JSON (atomically; default: :func:`nn.latency.default_path`, named by model and
key) and prints where, with a short summary.  Bad arguments: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from nn.latency.allocator import ALLOCATORS
from nn.latency.measure import fit_constant, measure_table
from nn.latency.files import default_path, save_table
from nn.checks import argtype, max_threads
from nn.latency.table import DTYPES

__all__ = ["add_latency_parser", "run_latency_table"]


def _input(text):
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"--input must be channels,height,width (three "
                                         f"positive ints), got {text!r}")
    return size


def add_latency_parser(sub) -> argparse.ArgumentParser:
    """Add the ``latency-table`` command to the subparsers ``sub`` of ``python -m nn``."""
    p = sub.add_parser("latency-table", help="measure a model's per-layer latency table here",
                       description="Measure every layer shape of a model at every candidate "
                       "width on this machine, fit the constant, cache the table as JSON.")
    p.add_argument("--model", required=True, help="resnet20/32/44/56/110, resnet18/34/50")
    p.add_argument("--width", type=argtype("--width", float, 0, strict=True, hi=64), default=1.0,
                   help="channel multiplier; default 1")
    p.add_argument("--shortcut", choices=("A", "B"), default=None,
                   help="default: the model's published choice")
    p.add_argument("--input", type=_input, default=(3, 32, 32), metavar="C,H,W",
                   help="input shape; default 3,32,32")
    p.add_argument("--num-classes", type=argtype("--num-classes", int, 1), default=10)
    p.add_argument("--batch", type=argtype("--batch", int, 1), required=True)
    p.add_argument("--threads", type=argtype("--threads", int, 1, hi=max_threads()), default=None,
                   help="torch CPU threads; default torch's own")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N; default cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--granularity", type=argtype("--granularity", int, 1), default=8,
                   help="candidate widths: multiples of this up to the dense width; default 8")
    p.add_argument("--repeats", type=argtype("--repeats", int, 1), default=10,
                   help="timed calls per grid point (median); default 10")
    p.add_argument("--warmup", type=argtype("--warmup", int, 0), default=2)
    p.add_argument("--fit-networks", type=argtype("--fit-networks", int, 0), default=8,
                   help="networks measured whole to fit the constant (0: none); default 8")
    p.add_argument("--no-scale", action="store_true",
                   help="fit the constant only (scale stays 1)")
    p.add_argument("--allocator", choices=ALLOCATORS, default="steady",
                   help="steady: keep freed memory for reuse (nn.latency.allocator); default")
    p.add_argument("--seed", type=argtype("--seed", int, 0), default=0)
    p.add_argument("--out", default=None, help="JSON file; default the cache "
                   "(~/.cache/mipprune/latency/<model>__<key>.json)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def run_latency_table(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Measure, fit, write and summarise (module docstring); ``parser.error`` (exit 2) for a
    model, device or setting that cannot be measured."""
    from nn.models import build_model

    try:
        device = torch.device(ns.device)
    except RuntimeError:
        parser.error(f"--device must be cpu, cuda or cuda:N, got {ns.device!r}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu, cuda or cuda:N, got {ns.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if ns.out is not None and Path(ns.out).is_dir():
        parser.error(f"--out must be a JSON file to write, got the folder {ns.out}")
    torch.manual_seed(ns.seed)
    try:
        model = build_model(ns.model, ns.num_classes, ns.input[0], ns.width, ns.shortcut).eval()
    except ValueError as e:
        parser.error(str(e))
    steady = ns.allocator == "steady"
    t0 = time.perf_counter()
    try:
        table = measure_table(model, ns.input, ns.batch, device, ns.dtype, ns.threads,
                              ns.granularity, ns.repeats, ns.warmup, ns.seed, steady=steady,
                              progress=not ns.no_progress)
        if ns.fit_networks:
            table = fit_constant(table, model, ns.input, ns.fit_networks, ns.repeats, ns.warmup,
                                 ns.seed + 1, scale=not ns.no_scale,
                                 progress=not ns.no_progress)
    except (ValueError, RuntimeError) as e:  # e.g. a dtype the device has no kernels for
        parser.error(str(e))
    if steady and table.key.allocator != "steady":
        parser.error("--allocator steady: this platform has no glibc mallopt; use "
                     "--allocator as-is")
    try:
        path = save_table(table, ns.out or default_path(table.model, table.key))
    except OSError as e:
        parser.error(f"cannot write the table: {e}")
    if table.meta["disturbed"] or (table.meta.get("fit") or {}).get("disturbed"):
        print("warning: other processes kept the machine busy while timing (fewer quiet rounds "
              "than --repeats): the table is disturbed; measure again on a quiet machine",
              file=sys.stderr)
    m, fit = table.meta, table.meta.get("fit")
    print(f"wrote {path}")
    print(f"{len(table.entries)} entries ({m['points']} timed points, {m['quiet_rounds']}/"
          f"{m['rounds']} quiet rounds) for {ns.model} under {table.key.slug()}; "
          f"{time.perf_counter() - t0:.1f} s in all, table {m['measure_s']:.1f} s")
    if fit:
        print(f"latency = {table.scale:.4f} x sum of entries + {table.constant_ms:.4f} ms "
              f"(fitted on {fit['networks']} networks: median |error| "
              f"{100 * fit['median_abs_error']:.1f}%)")
    else:
        print("latency = sum of entries (no constant fitted)")
    return 0
