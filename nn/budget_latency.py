"""The latency cost of a run: the latency table of its dense model on its device, the terms it
gives a budgeted selection (:mod:`nn.budget`) over the pruned families' widths, and each
structure's marginal latency (the ``latency`` weight of :class:`nn.cost.CostConfig`).

A timed unit (:class:`nn.latency.Layer`) costs ``scale * table(layer, w_in, w_out)``, zero when
its block is removed; the table's fitted constant is the cost of what no unit covers.  The
table is the one given (``--latency-table``), else the cached one for this model and key
(device, threads, dtype, batch, torch version, allocator), else measured now, fitted on whole
networks and cached.  Its batch is the largest of the run's ``latency_batches`` (1 when none).
"""

from __future__ import annotations

import logging

__all__ = ["latency_table_for", "latency_terms", "marginal_latency", "latency_cost"]

log = logging.getLogger(__name__)


def latency_table_for(run):
    """The :class:`nn.latency.LatencyTable` a latency budget of ``run`` reads (module
    docstring); ``ValueError`` for a given table measured under another key."""
    from nn.latency import (current_key, default_path, fit_constant, load_table, measure_table,
                            save_table)
    from nn.latency.timing import timing_settings
    from nn.models.resnet import arch_of

    cfg = run.config
    batch = max(cfg.runtime.latency_batches, default=1)
    threads = cfg.runtime.threads
    with timing_settings(threads, steady=True):
        key = current_key(run.device, "float32", threads, batch)
    if cfg.selection.latency_table:
        return load_table(cfg.selection.latency_table, key)
    path = default_path({"arch": arch_of(run.model), "input_size": list(run.input_size)}, key)
    if path.exists():
        log.info("latency table: %s", path)
        return load_table(path, key)
    log.info("measuring the latency table (%s, batch %d): cached at %s", key.device_name,
             batch, path)
    progress = cfg.runtime.progress
    table = measure_table(run.model, run.input_size, batch, run.device, "float32", threads,
                          granularity=cfg.selection.granularity, progress=progress)
    table = fit_constant(table, run.model, run.input_size, progress=progress)
    save_table(table, path)
    return table


def latency_terms(run, sizes: dict[str, int], block_carriers: dict[str, str]):
    """``(terms, constant, info)`` for :func:`nn.budget.build_problem`: one term per timed
    unit over the pruned families that set its widths (``sizes``) and its block's carrier;
    ``ValueError`` for a unit that three pruned families would couple."""
    from nn.latency import network_layers

    table = latency_table_for(run)
    terms = []
    for ly in network_layers(run.model, run.input_size):
        in_f = ly.in_family if ly.in_family in sizes else None
        out_f = ly.out_family if ly.out_family in sizes else None
        carrier = block_carriers.get(ly.block) if ly.block else None
        fams = sorted({f for f in (in_f, out_f, carrier) if f})
        if len(fams) > 2:
            raise ValueError(f"{ly.name} is scaled by three pruned families {fams}: prune "
                             f"streams or remove blocks, not both, for this model")
        a, b = (fams + [None, None])[:2]

        def fn(wa, wb, ly=ly, in_f=in_f, out_f=out_f, carrier=carrier, a=a, b=b):
            w = {a: wa, b: wb}
            if carrier is not None and w[carrier] == 0:
                return 0.0
            in_w = w[in_f] if in_f else ly.in_channels
            out_w = w[out_f] if out_f else ly.out_channels
            return table.scale * table.lookup(ly, in_w, out_w)

        terms.append((a, b, fn))
    fit = table.meta.get("fit", {})
    dense = [m for c, m in zip(fit.get("configs", []), fit.get("measured_ms", []))
             if not c["widths"] and not c["blocks_kept"]]
    info = {"key": dict(table.key.__dict__), "granularity": table.granularity,
            "constant_ms": table.constant_ms, "scale": table.scale,
            "fit_median_abs_error": fit.get("median_abs_error"),
            "dense_measured_ms": dense[0] if dense else None}
    return terms, table.constant_ms, info


def marginal_latency(table, layers, families) -> dict[str, float]:
    """Milliseconds one structure of each family saves at the dense widths, from ``table``
    (the cost model's ``lat_j``): for a channel family, the slope of its units' latency over
    the last grid step below its dense width (a family no wider than the grid step: its units'
    latency shared equally by its channels); for a block, all of its units.  Never negative:
    where timing noise (or the library's kernels) make the narrower layer no faster, removing
    a channel saves nothing."""
    from nn.latency import candidate_widths

    out = {}
    for f in families:
        if f.kind == "block":
            out[f.name] = table.scale * sum(table.lookup(ly, ly.in_channels, ly.out_channels)
                                            for ly in layers if ly.block == f.name)
            continue
        touching = [ly for ly in layers if f.name in (ly.in_family, ly.out_family)]
        grid = candidate_widths(f.size, table.granularity)
        lower = grid[-2] if len(grid) > 1 else 0
        total = 0.0
        for ly in touching:
            full = table.lookup(ly, ly.in_channels, ly.out_channels)
            if lower == 0:
                total += full / f.size
                continue
            in_w = lower if ly.in_family == f.name else ly.in_channels
            out_w = lower if ly.out_family == f.name else ly.out_channels
            total += (full - table.lookup(ly, in_w, out_w)) / (f.size - lower)
        out[f.name] = max(0.0, table.scale * total)
    return out


def latency_cost(run) -> dict:
    """``{"marginal": {family: ms per structure}, "dense_ms": predicted dense latency}`` of
    ``run``'s model from its latency table: what a ``latency`` cost weight reads
    (:func:`nn.cost.structure_costs`, the variational pruner's cost)."""
    from nn.latency import network_layers, predict

    table = latency_table_for(run)
    layers = network_layers(run.model, run.input_size)
    return {"marginal": marginal_latency(table, layers, run.structures),
            "dense_ms": predict(table, layers)}
