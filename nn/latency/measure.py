"""Measuring a latency table (:func:`measure_table`), timing whole pruned networks
(:func:`measure_networks`) and fitting the table's constant against them
(:func:`fit_constant`).

Both time by one protocol (:mod:`nn.latency.timing`: shuffled rounds, median, quiet rounds
only) in ``eval()`` and inference mode, on the requested device, dtype and torch threads, by
default with the steady allocator (:mod:`nn.latency.allocator`).  A table times every grid
point of every distinct unit (:mod:`nn.latency.units`); the grid of a width axis is
:func:`~nn.latency.layers.candidate_widths` of its dense count, so the number of timed points
of a unit is about ``(C_in / g) (C_out / g)`` for granularity ``g``.
"""

from __future__ import annotations

import logging
import random
import statistics
import time

import torch
from torch import nn as tnn
from tqdm.auto import tqdm

from nn.checks import integer, number
from nn.latency.layers import Layer, candidate_widths, layer_families, network_layers, \
    width_masks
from nn.latency.table import DTYPES, Entry, LatencyTable, current_key, predict
from nn.latency.timing import load_average, spare_cores, timed_rounds, timing_settings
from nn.latency.units import Tensors, build_unit, inference_form
from nn.models import compress
from nn.models.resnet.structures import arch_of

__all__ = ["grid_of", "measure_table", "random_config", "measure_networks", "fit_line",
           "fit_configs", "pruned_networks", "fit_table", "fit_constant"]

log = logging.getLogger(__name__)


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return getattr(torch, name)


def grid_of(layer: Layer, granularity: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(in widths, out widths)`` of ``layer``'s entry: candidate widths of a family axis, the
    dense count of a fixed one (a tied unit: the same widths twice)."""
    ins = candidate_widths(layer.in_channels, granularity) if layer.in_family else \
        (layer.in_channels,)
    outs = candidate_widths(layer.out_channels, granularity) if layer.out_family else \
        (layer.out_channels,)
    return ins, (ins if layer.tied else outs)


def measure_table(model: tnn.Module, input_size=(3, 32, 32), batch: int = 1, device="cpu",
                  dtype: str = "float32", threads: int | None = None, granularity: int = 8,
                  repeats: int = 10, warmup: int = 2, seed: int = 0,
                  quiet: float | None = 0.05, patience_s: float = 120.0, steady: bool = True,
                  progress: bool = True) -> LatencyTable:
    """Measure every distinct unit of the dense ResNet ``model``'s inference form
    (:func:`~nn.latency.layers.network_layers`) at every grid point (:func:`grid_of`) on a
    batch of ``batch``: the table, with constant 0 and scale 1 (:func:`fit_constant` fits
    them).  ``threads``: torch CPU threads while measuring (None: torch's current number);
    ``steady``: switch to the steady allocator first (the key records the state measured in);
    ``quiet``, ``patience_s``: of :func:`~nn.latency.timing.timed_rounds` (``meta["disturbed"]``
    says whether other processes kept the machine busy throughout)."""
    integer("batch", batch, 1)
    integer("granularity", granularity, 1)
    if threads is not None:
        integer("threads", threads, 1)
    dt = _dtype(dtype)
    device = torch.device(device)
    layers = network_layers(model, tuple(input_size))
    t0 = time.perf_counter()
    grids: dict[str, tuple] = {}
    points: list[tuple[str, int, int]] = []
    for ly in layers:
        if ly.key not in grids:
            ins, outs = grid_of(ly, granularity)
            grids[ly.key] = (ins, outs, ly)
            points += [(ly.key, i, o) for i in ins for o in outs if not ly.tied or i == o]
    with timing_settings(threads, steady):
        key = current_key(device, dtype, threads, batch)
        tensors = Tensors(device, dt, seed)
        fns = [build_unit(grids[k][2], i, o, batch, tensors) for k, i, o in points]
        load0 = load_average()
        with tqdm(total=(warmup + repeats) * len(fns), desc=f"latency table (batch {batch})",
                  unit="call", disable=not progress, leave=False) as bar:
            res = timed_rounds(fns, repeats, warmup, device, seed, bar, quiet,
                               spare_cores(device, threads), patience_s)
    ms = {p: statistics.median(t) for p, t in zip(points, res["ms"])}
    entries = {}
    for k, (ins, outs, ly) in grids.items():
        entries[k] = Entry(ins, outs, tuple(ms[k, w, w] for w in ins), True) if ly.tied else \
            Entry(ins, outs, tuple(tuple(ms[k, i, o] for o in outs) for i in ins))
    meta = {"repeats": repeats, "warmup": warmup, "seed": seed, "quiet": quiet,
            "points": len(points), "rounds": res["rounds"], "quiet_rounds": res["quiet_rounds"],
            "disturbed": res["disturbed"],
            "measure_s": round(time.perf_counter() - t0, 3), "load_average_before": load0,
            "load_average_after": load_average()}
    return LatencyTable(key, entries, granularity,
                        {"arch": arch_of(model), "input_size": list(input_size)}, meta=meta)


def random_config(layers: list[Layer], granularity: int, rng: random.Random,
                  block_drop: float = 0.0, streams: bool = True
                  ) -> tuple[dict[str, int], dict[str, bool]]:
    """A random pruned network: every family's width drawn uniformly from its candidate widths
    (stream families only with ``streams``, else dense), every removable block removed with
    probability ``block_drop``.  Returns ``(widths, blocks_kept)`` for :func:`predict`."""
    number("block_drop", block_drop, 0, 1)
    widths = {f: rng.choice(candidate_widths(d, granularity))
              for f, d in layer_families(layers).items()
              if streams or not f.startswith("stream.")}
    blocks = sorted({ly.block for ly in layers if ly.block is not None})
    return widths, {b: rng.random() >= block_drop for b in blocks}


def measure_networks(nets: list[tnn.Module], input_size, batch: int, device="cpu",
                     dtype: str = "float32", threads: int | None = None, repeats: int = 10,
                     warmup: int = 2, seed: int = 0, quiet: float | None = 0.05,
                     patience_s: float = 120.0, steady: bool = True,
                     progress: bool = True) -> tuple[list[float], dict]:
    """Median latency (ms) of each network of ``nets`` (moved to ``device``/``dtype``,
    ``eval()``) on one random batch of ``batch`` inputs of shape ``input_size``, all networks
    interleaved (module docstring); also the :func:`~nn.latency.timing.timed_rounds` record.
    A disturbed measurement (fewer quiet rounds than ``repeats``) is logged as a warning with
    the load seen: the most cores other processes used in a segment."""
    dt = _dtype(dtype)
    with timing_settings(threads, steady):
        x = Tensors(device, dt, seed).get((batch, *input_size))
        nets = [n.to(device, dt).eval() for n in nets]
        fns = [(lambda n=n: n(x)) for n in nets]
        with tqdm(total=(warmup + repeats) * len(fns), desc=f"networks (batch {batch})",
                  unit="call", disable=not progress, leave=False) as bar:
            res = timed_rounds(fns, repeats, warmup, device, seed, bar, quiet,
                               spare_cores(device, threads), patience_s)
    if res["disturbed"]:
        seen = [c for c in res["foreign_cores"] if c is not None]
        log.warning("latency at batch %d: only %d of %d timed rounds were quiet (other "
                    "processes used up to %s cores): the medians are disturbed; measure again "
                    "on a quiet machine", batch, res["quiet_rounds"], res["rounds"],
                    f"{max(seen):.2f}" if seen else "an unknown number of")
    return [statistics.median(t) for t in res["ms"]], res


def fit_line(sums: list[float], measured: list[float], scale: bool) -> tuple[float, float]:
    """``(a, c)`` minimising the squared relative error ``sum_i ((a S_i + c - M_i) / M_i)^2``
    (``a = 1`` unless ``scale``): least squares with weights ``w_i = 1 / M_i^2``; with ``a = 1``
    ``c = sum_i w_i (M_i - S_i) / sum_i w_i``, else the 2x2 normal equations -- unless they
    give ``a <= 0`` (sums all alike, or timings too noisy to tell): then ``a = 1``."""
    if not sums or len(sums) != len(measured) or min(measured) <= 0:
        raise ValueError("fit_line needs as many positive measured latencies as sums")
    w = [1 / m ** 2 for m in measured]
    sw = sum(w)
    sx = sum(wi * s for wi, s in zip(w, sums))
    sy = sum(wi * m for wi, m in zip(w, measured))
    if scale:
        sxx = sum(wi * s * s for wi, s in zip(w, sums))
        sxy = sum(wi * s * m for wi, s, m in zip(w, sums, measured))
        det = sw * sxx - sx * sx
        a = (sw * sxy - sx * sy) / det if det > 1e-9 * sw * sxx else 0.0
        if a > 0:  # else no slope to fit (all sums alike) or noise swamped it: a = 1
            return a, (sy - a * sx) / sw
    return 1.0, (sy - sx) / sw


def fit_configs(layers: list[Layer], granularity: int, networks: int, seed: int = 1,
                block_drop: float = 0.3) -> list[tuple[dict[str, int], dict[str, bool]]]:
    """The networks a constant is fitted on: the dense one, then ``networks - 1`` drawn by
    :func:`random_config` (``random.Random(seed)``; every other one also removes blocks with
    probability ``block_drop``)."""
    integer("networks", networks, 1)
    rng = random.Random(seed)
    return [({}, {})] + [random_config(layers, granularity, rng, block_drop if n % 2 else 0.0)
                         for n in range(1, networks)]


def pruned_networks(model: tnn.Module, layers: list[Layer], configs) -> list[tnn.Module]:
    """The inference form of ``model`` compressed to each ``(widths, blocks_kept)`` of
    ``configs`` (:func:`~nn.latency.layers.width_masks`, :func:`nn.compress`)."""
    return [inference_form(compress(model, width_masks(layers, w, b))) for w, b in configs]


def fit_table(table: LatencyTable, layers: list[Layer], configs, measured: list[float],
              scale: bool = True, **meta) -> LatencyTable:
    """The table with ``scale`` (unless False) and ``constant_ms`` fitted (:func:`fit_line`) to
    the ``measured`` latencies (ms) of the networks ``configs`` (``(widths, blocks_kept)``
    pairs); ``meta["fit"]`` records them with their sums and relative errors (and ``meta``)."""
    raw = table.with_fit(0.0, 1.0)
    sums = [predict(raw, layers, w, b) for w, b in configs]
    a, c = fit_line(sums, measured, scale)
    errors = [(a * s + c) / m - 1 for s, m in zip(sums, measured)]
    fit = {"networks": len(configs), "scale_fitted": scale,
           "configs": [{"widths": w, "blocks_kept": b} for w, b in configs],
           "sum_ms": sums, "measured_ms": list(measured), "relative_errors": errors,
           "median_abs_error": statistics.median(abs(e) for e in errors), **meta}
    return table.with_fit(c, a, fit=fit)


def fit_constant(table: LatencyTable, model: tnn.Module, input_size=(3, 32, 32),
                 networks: int = 8, repeats: int = 10, warmup: int = 2, seed: int = 1,
                 block_drop: float = 0.3, scale: bool = True, quiet: float | None = 0.05,
                 patience_s: float = 120.0, progress: bool = True) -> LatencyTable:
    """:func:`fit_table` on the :func:`fit_configs` networks of ``model``, measured whole
    (:func:`measure_networks`) here under the table's key: ``ValueError`` if this process's
    key differs (a steady table switches to the steady allocator first)."""
    k = table.key
    with timing_settings(None, k.allocator == "steady"):
        table.check_key(current_key(k.device, k.dtype, k.threads, k.batch))
    layers = network_layers(model, tuple(input_size))
    configs = fit_configs(layers, table.granularity, networks, seed, block_drop)
    t0 = time.perf_counter()
    measured, res = measure_networks(pruned_networks(model, layers, configs), input_size,
                                     k.batch, k.device, k.dtype, k.threads, repeats, warmup,
                                     seed, quiet, patience_s, k.allocator == "steady", progress)
    return fit_table(table, layers, configs, measured, scale, repeats=repeats, seed=seed,
                     rounds=res["rounds"], quiet_rounds=res["quiet_rounds"],
                     disturbed=res["disturbed"], fit_s=round(time.perf_counter() - t0, 3))
