"""Parameters, MACs and latency of any model (dense, masked or physically pruned).

MACs are multiply-accumulates of the convolutions and linear layers (what pruning papers call
"FLOPs"); BatchNorm, ReLU, pooling and additions are not counted.  Two independent counts:

* :func:`count_macs` -- ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass of a
  batch of one, halved (the counter reports 2 FLOPs per MAC);
* :func:`layer_macs` / :func:`analytic_macs` -- per layer from the shapes seen by forward hooks:
  conv ``C_out H_out W_out (C_in / groups) k_h k_w``, linear ``in_features out_features``.

Both count what the model *computes*: a masked (zeroed, same-shape) model costs as much as the
dense one; only a physically pruned model is cheaper.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch
from torch import nn as tnn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_macs", "layer_macs", "analytic_macs", "measure_latency"]


def count_params(model: tnn.Module) -> int:
    """Number of parameters (``numel`` summed over ``model.parameters()``; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _probe_input(model: tnn.Module, input_size, batch_size: int = 1):
    p = next(iter(model.parameters()), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.get_default_dtype()
    device = p.device if p is not None else torch.device("cpu")
    return torch.zeros((batch_size, *input_size), dtype=dtype, device=device)


@contextmanager
def _evaluating(model: tnn.Module):
    """eval() + no_grad for a probe pass, restoring every submodule's training flag after."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, f in flags.items():
            m.training = f


def layer_macs(model: tnn.Module, input_size=(3, 32, 32)) -> dict[str, int]:
    """MACs of every ``Conv2d`` and ``Linear`` module for one input of shape ``input_size``
    (channels, height, width), from the output shapes recorded by forward hooks."""
    macs: dict[str, int] = {}
    hooks = []

    def hook(name):
        def record(mod, inp, out):
            per_out = out[0].numel()  # one sample
            if isinstance(mod, tnn.Conv2d):
                k = (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
            else:
                k = mod.in_features
            macs[name] = macs.get(name, 0) + per_out * k
        return record

    for name, mod in model.named_modules():
        if isinstance(mod, (tnn.Conv2d, tnn.Linear)):
            hooks.append(mod.register_forward_hook(hook(name)))
    try:
        with _evaluating(model):
            model(_probe_input(model, input_size))
    finally:
        for h in hooks:
            h.remove()
    return macs


def analytic_macs(model: tnn.Module, input_size=(3, 32, 32)) -> int:
    """Total MACs from :func:`layer_macs` (the count that does not use the flop counter)."""
    return sum(layer_macs(model, input_size).values())


def count_macs(model: tnn.Module, input_size=(3, 32, 32)) -> int:
    """Total MACs of one forward pass, from ``FlopCounterMode`` (FLOPs / 2)."""
    counter = FlopCounterMode(display=False)
    with _evaluating(model), counter:
        model(_probe_input(model, input_size))
    flops = counter.get_total_flops()
    assert flops % 2 == 0, flops
    return flops // 2


def measure_latency(model: tnn.Module, input_shape=(3, 32, 32), batch_size: int = 1,
                    device="cpu", warmup: int = 10, repeats: int = 50) -> dict:
    """Wall-clock latency of ``model`` on a random batch ``(batch_size, *input_shape)``.

    The model is moved to ``device`` and put in ``eval()`` (left there), runs under
    ``torch.inference_mode``, ``warmup`` untimed runs first, then ``repeats`` timed runs, each
    synchronised on CUDA.  Returns ``median_ms`` (the number to report), ``mean_ms``,
    ``min_ms``, ``max_ms``, ``stdev_ms``, ``throughput`` (samples per second at the median)
    and the settings used.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    device = torch.device(device)
    model = model.to(device).eval()
    p = next(iter(model.parameters()), None)
    dtype = p.dtype if p is not None else torch.get_default_dtype()
    x = torch.randn((batch_size, *input_shape), dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        sync()
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    median = statistics.median(times)
    return {
        "median_ms": median,
        "mean_ms": statistics.fmean(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "stdev_ms": statistics.stdev(times) if len(times) > 1 else 0.0,
        "throughput": batch_size / (median / 1e3) if median > 0 else float("inf"),
        "batch_size": batch_size,
        "input_shape": list(input_shape),
        "device": str(device),
        "warmup": warmup,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }
