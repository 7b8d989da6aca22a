"""Measured latency, the cost model's fourth cost (DESIGN §9): a table of per-unit latencies
keyed by device, threads, dtype, batch, torch version and allocator state, and the network
latency it predicts (the units' entries summed, times a fitted scale, plus a fitted constant).

    layers = network_layers(model, (3, 32, 32))          # the timed units, in execution order
    table = measure_table(model, (3, 32, 32), batch=64, threads=2, granularity=8)
    table = fit_constant(table, model, (3, 32, 32))       # against measured pruned networks
    predict(table, layers, {"stream.layer3": 48, "layer3.0.conv1": 16},
            {"block.layer2.4": False})                    # ms

Modules: :mod:`.layers` (the units, their families, candidate widths), :mod:`.units` (what
each unit runs; the inference form), :mod:`.table` (the table, its key, prediction),
:mod:`.files` (the cache, JSON files), :mod:`.timing` (the timing protocol), :mod:`.allocator`
(the steady allocator timings assume), :mod:`.measure` (tables, whole networks, the fit),
:mod:`.cli` (``python -m nn latency-table``).
"""

from nn.latency.layers import (KINDS, OPS, Layer, candidate_widths, layer_families,
                               network_layers, width_masks)
from nn.latency.allocator import ALLOCATORS, allocator_state, steady_allocator
from nn.latency.measure import (fit_configs, fit_constant, fit_line, fit_table, grid_of,
                                measure_networks, measure_table, pruned_networks,
                                random_config)
from nn.latency.files import cache_dir, default_path, load_table, save_table
from nn.latency.table import (DTYPES, FORMAT, Entry, LatencyKey, LatencyTable, current_key,
                              device_name, predict)
from nn.latency.timing import timed_rounds
from nn.latency.units import Tensors, build_unit, inference_form, pad_channels

__all__ = ["KINDS", "OPS", "Layer", "network_layers", "layer_families", "candidate_widths",
           "width_masks", "build_unit", "inference_form", "Tensors", "pad_channels",
           "DTYPES", "FORMAT", "LatencyKey", "Entry", "LatencyTable", "device_name",
           "current_key", "predict", "cache_dir", "default_path", "save_table", "load_table",
           "timed_rounds", "grid_of", "measure_table", "random_config", "measure_networks",
           "fit_constant", "fit_line", "fit_configs", "fit_table", "pruned_networks",
           "ALLOCATORS", "steady_allocator", "allocator_state"]
