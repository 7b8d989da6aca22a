"""Measurement helpers for the benchmarks: interleaved timing, paired ratios, pruning masks for
speed-up studies, and inference-time transforms of a (pruned) ResNet.

Timing: :func:`interleaved_ms` runs several variants round by round (a round times each variant
once; the order rotates every round: AB, BA, ... or ABC, BCA, CAB, ...) after an interleaved
warm-up, so slow drift of the machine (thermal, other jobs) affects every variant alike.
:func:`paired_ratio` compares two variants round by round.

Inference transforms (:func:`inference_variant`) keep the network's function: ``fold_bn``
folds each eval-mode BatchNorm into the convolution before it (``W' = W γ/σ``,
``b' = β - γ μ/σ``, ``σ = sqrt(var + eps)``; exact up to float rounding), ``channels_last``
changes only the memory layout, ``jit`` is ``torch.jit.trace`` + ``torch.jit.freeze`` (which
folds BN itself) + ``optimize_for_inference``, ``compile`` is ``torch.compile`` (inductor, with
its ``freezing`` option: weights become constants, conv-BN folded, prepacked oneDNN
convolutions on CPU).
"""

from __future__ import annotations

import copy
import os
import random
import statistics
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn as tnn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from nn.latency.timing import busy_ticks
from nn.models import Family

__all__ = ["VARIANTS", "interleaved_rounds", "interleaved_ms", "clean_rounds", "kept_rounds",
           "summarize", "paired_ratio", "train_step", "regularizer_step",
           "fraction_masks", "round_masks", "block_masks", "merge_masks",
           "fold_bn", "inference_variant", "max_logit_diff",
           "op_profile", "launch_count", "conv_shapes", "conv_timings", "padded_macs"]

VARIANTS = ("eager", "fold_bn", "fold_bn+channels_last", "jit", "compile")


# ---- timing ----------------------------------------------------------------------------------

def _sync_for(device) -> Callable[[], None]:
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def interleaved_rounds(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 2,
                       device="cpu") -> dict:
    """Wall-clock milliseconds of each call in ``fns``: ``warmup`` untimed rounds, then
    ``repeats`` timed rounds; every round calls each function once, the order rotating by one
    each round.  Synchronises CUDA around every timed call on a CUDA ``device``.

    Returns ``{"ms": {name: [ms per round]}, "foreign_cpu": [...]}``: per round, the share of
    the machine's CPU time (all cores) used by *other* processes (Linux: busy ticks from
    ``/proc/stat`` minus this process's CPU time; ``None`` elsewhere) -- rounds where other
    jobs ran can then be told apart from clean ones."""
    if not fns:
        raise ValueError("fns is empty")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    sync = _sync_for(device)
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync()
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    ncpu = os.cpu_count() or 1
    out: dict[str, list[float]] = {n: [] for n in names}
    foreign: list[float | None] = []
    for r in range(repeats):
        k = r % len(names)
        b0, o0, w0 = busy_ticks(), _own_seconds(), time.perf_counter()
        for n in names[k:] + names[:k]:
            sync()
            t0 = time.perf_counter()
            fns[n]()
            sync()
            out[n].append((time.perf_counter() - t0) * 1e3)
        b1, o1, w1 = busy_ticks(), _own_seconds(), time.perf_counter()
        if b0 is None or b1 is None:
            foreign.append(None)
        else:
            other = (b1 - b0) / hz - (o1 - o0)
            foreign.append(max(0.0, other) / (ncpu * (w1 - w0)))
    return {"ms": out, "foreign_cpu": foreign}


def interleaved_ms(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 2,
                   device="cpu") -> dict[str, list[float]]:
    """The ``"ms"`` part of :func:`interleaved_rounds`."""
    return interleaved_rounds(fns, repeats, warmup, device)["ms"]


def clean_rounds(foreign: list, threshold: float = 0.05, minimum: int = 5) -> list[int]:
    """Indices of rounds whose foreign CPU share is below ``threshold``; all rounds when that
    leaves fewer than ``minimum`` (or when the share is unknown)."""
    idx = [i for i, f in enumerate(foreign) if f is not None and f < threshold]
    return idx if len(idx) >= minimum else list(range(len(foreign)))


def kept_rounds(rounds: dict, threshold: float = 0.05) -> tuple[list[int], bool, dict]:
    """Drop the rounds of :func:`interleaved_rounds` in which other processes used more than
    ``threshold`` of the CPU: returns (kept round indices, whether the foreign load was
    measured and handled, the per-variant times of the kept rounds)."""
    foreign = rounds["foreign_cpu"]
    keep = clean_rounds(foreign, threshold)
    clean = len(keep) < len(foreign) or all(f is not None and f < threshold for f in foreign)
    return keep, clean, {k: [v[i] for i in keep] for k, v in rounds["ms"].items()}


def summarize(ms: list[float]) -> dict:
    """Median (the number to report), quartiles, mean, min, max and count of timings in ms."""
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "q1_ms": q[0], "q3_ms": q[2],
            "mean_ms": statistics.fmean(ms), "min_ms": min(ms), "max_ms": max(ms), "n": len(ms)}


def paired_ratio(base: list[float], other: list[float], n_boot: int = 2000,
                 seed: int = 0) -> dict:
    """``other / base`` from timings taken round by round: the ratio of the medians, the median
    of the per-round ratios, and a percentile-bootstrap 95% interval of the ratio of medians
    (rounds resampled as pairs, seeded)."""
    if len(base) != len(other) or not base:
        raise ValueError("base and other must be non-empty and of equal length")
    rng = random.Random(seed)
    n = len(base)
    boot = []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        boot.append(statistics.median(other[i] for i in idx)
                    / statistics.median(base[i] for i in idx))
    boot.sort()
    return {"ratio_of_medians": statistics.median(other) / statistics.median(base),
            "median_paired_ratio": statistics.median(o / b for o, b in zip(other, base)),
            "ci95": [boot[int(0.025 * n_boot)], boot[int(0.975 * n_boot) - 1]]}


def train_step(model: tnn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, regularizer=None, autocast: torch.dtype | None = None
               ) -> Callable[[], torch.Tensor]:
    """One training step as a closure: zero grads, forward, cross-entropy, backward,
    ``optimizer.step()``; returns the loss (detached).  A ``regularizer`` with ``add_grad_``
    (:class:`nn.SPRRegularizer`) adds its gradient after the backward pass, as the training
    loop does; any other callable is added to the loss (autograd).  ``project_()`` runs after
    the step when the regularizer has it.  ``autocast``: the forward pass and cross-entropy
    under ``torch.autocast`` in that dtype (None: full precision).  The model is put in
    ``train()`` mode."""
    model.train()
    fused = hasattr(regularizer, "add_grad_")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            loss = F.cross_entropy(model(x).float(), y)
        if regularizer is not None and not fused:
            loss = loss + regularizer()
        loss.backward()
        if fused:
            loss = loss.detach() + regularizer.add_grad_()
        optimizer.step()
        if regularizer is not None and hasattr(regularizer, "project_"):
            regularizer.project_()
        return loss.detach()

    return step


def regularizer_step(penalty: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The penalty's own forward + backward as a closure.  Gradients accumulate into existing
    ``.grad`` tensors, as they do inside a training step (call it after one step so they
    exist); they are not zeroed, so values are meaningless -- only the time is."""
    def step():
        v = penalty()
        v.backward()
        return v.detach()

    return step


# ---- masks for speed-up studies --------------------------------------------------------------

def _pick(n_remove: int, size: int, rng: torch.Generator, scores: torch.Tensor | None):
    keep = torch.ones(size, dtype=torch.bool)
    if n_remove <= 0:
        return keep
    if scores is None:
        drop = torch.randperm(size, generator=rng)[:n_remove]
    else:
        drop = torch.argsort(scores, stable=True)[:n_remove]
    keep[drop] = False
    return keep


def _l1_scores(model: tnn.Module, fam: Family) -> torch.Tensor:
    params = dict(model.named_parameters())
    score = torch.zeros(fam.size, dtype=torch.float64)
    for p in fam.writers:
        t = params[p.param].detach().to("cpu", torch.float64)
        score += t.abs().movedim(p.dim, 0).reshape(fam.size, -1).sum(1)
    return score


def fraction_masks(families: list[Family], fraction: float, seed: int = 0,
                   kind: str = "filter", selection: str = "random",
                   model: tnn.Module | None = None) -> dict[str, torch.Tensor]:
    """Remove ``round(fraction * size)`` structures of every family of ``kind`` (at least one
    kept per family).  ``selection="random"``: uniformly at random (``torch.Generator`` seeded
    with ``seed``, families in order); ``"l1"``: smallest L1 norm of the writer slices of
    ``model`` (ties by index)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    if selection not in ("random", "l1"):
        raise ValueError(f"selection must be 'random' or 'l1', got {selection!r}")
    if selection == "l1" and model is None:
        raise ValueError("selection='l1' needs the model")
    rng = torch.Generator().manual_seed(seed)
    out = {}
    for f in families:
        if f.kind != kind:
            continue
        n = min(int(round(fraction * f.size)), f.size - 1)
        out[f.name] = _pick(n, f.size, rng, _l1_scores(model, f) if selection == "l1" else None)
    return out


def round_masks(families: list[Family], masks: Mapping[str, torch.Tensor], multiple: int = 8,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """``masks`` with every family's kept count rounded to the nearest multiple of ``multiple``
    (at least ``multiple``, at most the family size): kept structures stay kept when the count
    grows (restored ones drawn at random, seeded); when it shrinks, random kept ones go."""
    rng = torch.Generator().manual_seed(seed)
    sizes = {f.name: f.size for f in families}
    out = {}
    for name, m in masks.items():
        m = m.clone()
        k = int(m.sum())
        target = min(sizes[name], max(multiple, multiple * int(round(k / multiple))))
        if target > k:
            off = torch.nonzero(~m).flatten()
            m[off[torch.randperm(len(off), generator=rng)[:target - k]]] = True
        elif target < k:
            on = torch.nonzero(m).flatten()
            m[on[torch.randperm(len(on), generator=rng)[:k - target]]] = False
        out[name] = m
    return out


def block_masks(families: list[Family], fraction: float, seed: int = 0
                ) -> dict[str, torch.Tensor]:
    """Remove ``round(fraction * n)`` of the ``n`` removable blocks, chosen at random (seeded)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    blocks = [f.name for f in families if f.kind == "block"]
    rng = torch.Generator().manual_seed(seed)
    drop = set(torch.randperm(len(blocks), generator=rng)[:int(round(fraction * len(blocks)))]
               .tolist())
    return {name: torch.tensor([i not in drop]) for i, name in enumerate(blocks)}


def merge_masks(*masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Union of mask dicts (a structure is kept only if every dict that names it keeps it)."""
    out: dict[str, torch.Tensor] = {}
    for m in masks:
        for k, v in m.items():
            out[k] = out[k] & v if k in out else v.clone()
    return out


# ---- inference transforms --------------------------------------------------------------------

def fold_bn(model: tnn.Module) -> tnn.Module:
    """A deep copy of ``model`` in ``eval()`` with every eval-mode BatchNorm folded into the
    convolution that feeds it (the BN becomes ``nn.Identity``).

    Pairs are found by name: sibling modules ``convK``/``bnK`` (``conv1``/``bn1`` stems and
    the convs of every block of :class:`~nn.models.ResNet` and
    :class:`~nn.models.PrunedResNet`), and ``Conv2d`` followed by ``BatchNorm2d`` inside an
    ``nn.Sequential`` (option-B shortcuts).  Exact up to float rounding in ``eval()``."""
    model = copy.deepcopy(model).eval()
    for mod in list(model.modules()):
        children = dict(mod.named_children())
        if isinstance(mod, tnn.Sequential):
            keys = list(children)
            for a, b in zip(keys, keys[1:]):
                if isinstance(children[a], tnn.Conv2d) and \
                        isinstance(children[b], tnn.BatchNorm2d):
                    setattr(mod, a, fuse_conv_bn_eval(children[a], children[b]))
                    setattr(mod, b, tnn.Identity())
            continue
        for name, conv in children.items():
            if not (name.startswith("conv") and isinstance(conv, tnn.Conv2d)):
                continue
            bn = children.get("bn" + name[len("conv"):])
            if isinstance(bn, tnn.BatchNorm2d):
                setattr(mod, name, fuse_conv_bn_eval(conv, bn))
                setattr(mod, "bn" + name[len("conv"):], tnn.Identity())
    return model


def inference_variant(model: tnn.Module, variant: str, example: torch.Tensor):
    """``(callable, input)`` for timing ``model`` under ``variant`` (one of :data:`VARIANTS`)
    on a batch like ``example``; the callable runs one forward pass (call it under
    ``torch.inference_mode``/``no_grad``; ``jit`` and ``compile`` are built here, their first
    calls -- compilation -- are part of the caller's warm-up)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    model = copy.deepcopy(model).eval()
    x = example
    if variant == "eager":
        return model, x
    if variant in ("fold_bn", "fold_bn+channels_last"):
        model = fold_bn(model)
        if variant.endswith("channels_last"):
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        return model, x
    if variant == "jit":
        with torch.no_grad():
            traced = torch.jit.trace(model, x, check_trace=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        return frozen, x
    # isolate_recompiles: every model gets its own compiled entries (PrunedResNets share one
    # forward(), and dynamo's default recompile limit of 8 would send later models to eager)
    return torch.compile(model, options={"freezing": True}, isolate_recompiles=True), x


def max_logit_diff(reference: tnn.Module, other: Callable, x: torch.Tensor,
                   x_other: torch.Tensor | None = None) -> dict:
    """Largest absolute difference of the two models' outputs on ``x`` (inference mode), and
    that difference relative to the largest absolute reference output."""
    with torch.inference_mode():
        a = reference.eval()(x)
        b = other(x if x_other is None else x_other)
    diff = float((a - b.to(a.dtype)).abs().max())
    return {"max_abs_diff": diff, "max_rel_diff": diff / max(float(a.abs().max()), 1e-30)}


# ---- where the time goes ---------------------------------------------------------------------

_NOT_KERNELS = frozenset(
    "aten::" + n for n in (
        "view as_strided reshape _reshape_alias permute movedim narrow slice select split "
        "split_with_sizes unsqueeze squeeze expand t transpose alias detach unbind chunk "
        "empty empty_like empty_strided to _to_copy ones_like zeros_like full_like "
        "scalar_tensor __and__ __or__ __invert__ lift_fresh resolve_conj resolve_neg").split())


def _is_kernel(name: str) -> bool:
    return name.startswith("aten::") and name not in _NOT_KERNELS


def launch_count(fn: Callable[[], object], calls: int = 3) -> dict:
    """Kernel launches of one ``fn()`` call, counted by ``torch.profiler`` over ``calls`` calls
    after one untimed call.

    ``cpu_ops``: ``aten`` operators that compute (not views, allocations or thin wrappers) and
    are not called from inside another such operator -- on CPU, the launches the same code
    makes on a GPU (a ``_foreach_*`` op counts once: on CUDA it is one multi-tensor kernel per
    few dozen tensors).  ``cuda_kernels``: the CUDA kernels themselves, when ``fn`` runs on a
    GPU (None otherwise).  ``by_op``: the counted operators, per call."""
    fn()  # warm: caches and lazy state are not the steady step
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    by_op: dict[str, float] = {}
    kernels = 0
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            kernels += 1
            continue
        if not _is_kernel(e.name):
            continue
        parent, nested = e.cpu_parent, False
        while parent is not None:
            if _is_kernel(parent.name):
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            by_op[e.name] = by_op.get(e.name, 0) + 1 / calls
    return {"cpu_ops": sum(by_op.values()),
            "cuda_kernels": kernels / calls if torch.cuda.is_available() else None,
            "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1]))}


def op_profile(fn: Callable[[], object], calls: int = 5, top: int = 12) -> dict:
    """``torch.profiler`` over ``calls`` calls of ``fn``: all operator calls per ``fn`` call,
    ``kernel_ops_per_call`` (``aten`` operators other than views, allocations and thin
    wrappers: roughly the kernel launches the same code makes on a GPU) and the ``top``
    operators by self CPU time (ms per ``fn`` call)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev) / 1e3 / calls
    rows = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"ops_per_call": sum(e.count for e in ev) / calls,
            "kernel_ops_per_call": sum(e.count for e in ev if _is_kernel(e.key)) / calls,
            "self_cpu_ms_per_call": total,
            "top": [{"op": e.key, "calls": e.count / calls,
                     "self_cpu_ms": e.self_cpu_time_total / 1e3 / calls} for e in rows]}


def conv_shapes(model: tnn.Module, input_size=(3, 32, 32)) -> list[tuple]:
    """Distinct convolution shapes of one forward pass, in order of first use, each as
    ``(in_c, out_c, kernel, stride, padding, height, width, count)`` (height/width of the
    input; ``count``: how many convs of the model have it)."""
    seen: dict[tuple, int] = {}

    def record(mod, inp, out):
        h, w = inp[0].shape[-2:]
        key = (mod.in_channels, mod.out_channels, mod.kernel_size[0], mod.stride[0],
               mod.padding[0], int(h), int(w))
        seen[key] = seen.get(key, 0) + 1

    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(m, tnn.Conv2d)]
    p = next(model.parameters())
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros((1, *input_size), dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
    return [(*k, n) for k, n in seen.items()]


def padded_macs(model: tnn.Module, input_size=(3, 32, 32), block: int = 16) -> int:
    """Convolution MACs of one input with every convolution's output channels rounded up to a
    multiple of ``block`` (plus the ``Linear`` layers as they are): a cost model for
    convolution libraries that compute output channels in blocks -- oneDNN's fp32 AVX-512
    kernels use blocks of 16, so a conv with 8 output filters costs about as much as one
    with 16.  (``block=1`` gives the plain MAC count of convs and linears.)"""
    total = 0
    for (cin, cout, k, s, pad, h, w, n) in conv_shapes(model, input_size):
        ho, wo = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
        total += n * (-(-cout // block) * block) * ho * wo * cin * k * k
    total += sum(m.in_features * m.out_features for m in model.modules()
                 if isinstance(m, tnn.Linear))
    return total


def conv_timings(shapes, batch: int, repeats: int = 20, warmup: int = 3, device="cpu",
                 channels_last: bool = False, seed: int = 0,
                 clean_threshold: float = 0.05) -> list[dict]:
    """Time a lone ``Conv2d`` (with bias, as after BN folding) of each shape from
    :func:`conv_shapes` at ``batch``, interleaved; returns per shape the median ms (over the
    rounds :func:`clean_rounds` keeps; ``rounds_used`` says how many), MACs and the achieved
    GMAC/s (the convolution library's efficiency at that shape)."""
    g = torch.Generator().manual_seed(seed)
    fns, meta = {}, {}
    for (cin, cout, k, s, pad, h, w, n) in shapes:
        conv = tnn.Conv2d(cin, cout, k, s, pad, bias=True).to(device).eval()
        x = torch.randn((batch, cin, h, w), generator=g).to(device)
        if channels_last:
            conv = conv.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        ho, wo = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
        key = f"{cin}->{cout} k{k} s{s} {h}x{w}"
        fns[key] = (lambda conv=conv, x=x: conv(x))
        meta[key] = {"in_c": cin, "out_c": cout, "kernel": k, "stride": s, "hw": h,
                     "count": n, "macs": batch * cout * ho * wo * cin * k * k}
    with torch.inference_mode():
        res = interleaved_rounds(fns, repeats, warmup, device)
    keep = clean_rounds(res["foreign_cpu"], clean_threshold)
    out = []
    for key, t in res["ms"].items():
        med = statistics.median(t[i] for i in keep)
        out.append({"shape": key, **meta[key], "median_ms": med,
                    "gmacs_per_s": meta[key]["macs"] / med / 1e6, "rounds_used": len(keep)})
    return out
