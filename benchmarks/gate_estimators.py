"""Bias and variance of the gate-gradient estimators against exact enumeration (DESIGN §6).

Toy networks (one CIFAR-style stage of two BasicBlocks on ``1 x 6 x 6`` inputs: two unit
families of ``width`` units plus two removable blocks, ``2 width + 2`` gates), a fixed seeded
batch with random labels, every gate's keep probability drawn uniformly from ``[theta_lo,
theta_hi]``.  All ``2^n`` gate patterns are enumerated with the forced-``xi`` training forward
(batch BN statistics: each pattern's cross-entropy is deterministic), giving

    E[CE] = sum_xi P(xi) CE(xi),   exact gradient_s = E[CE | xi_s = 1] - E[CE | xi_s = 0]

and, from the same pass, the exact mean of the straight-through estimate (``dCE/dxi`` at each
pattern).  Each estimator of :data:`nn.methods.variational.ESTIMATORS` (``flip`` twice: flipping every gate,
and ``flip 2u+1b`` drawing 2 unit gates and 1 block gate a step as the library's default
draws 4 + 2 on real networks) then produces ``K`` estimates the way
training does (sampled forward, cross-entropy, ``backward``, ``GatedResNet.theta_gradient``;
REINFORCE with the library's moving-average baseline, ``--baseline-decay``).  Reported per
setting and estimator: the mean bias per gate (mean estimate - exact), its largest magnitude
and its largest z-score (bias / standard error: |z| < ~4 is sampling noise), the relative bias
``||mean - exact|| / ||exact||``, the per-gate variance (mean over gates), the MSE of one
estimate (mean over gates of ``E[(estimate - exact)^2]``), the cosine between the mean
estimate and the exact gradient, and the median wall time of one estimate (forward +
backward + ``theta_gradient``), the variance split into unit and block gates, and for ``st``
also the exact bias from enumeration (no sampling noise).  Settings: two theta/weight draws of
the width-3 net (8 gates) and one width-4 net (10 gates).

    python -m benchmarks.gate_estimators                       # K = 2000, seed 0, 1 thread

Results: ``benchmarks/results/gate_estimators.{json,csv}``.  The run that wrote them:

    python -m benchmarks.gate_estimators --K 2000 --seed 0
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks import _common
from nn.methods.variational.estimators import batched_flips
from nn.methods.variational.gated import GatedResNet
from nn.models import BasicBlock, ResNet

INPUT = (1, 6, 6)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--K", type=int, default=2000, help="estimates per estimator and setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--theta-lo", type=float, default=0.2)
    p.add_argument("--theta-hi", type=float, default=0.8)
    p.add_argument("--batch", type=int, default=32, help="fixed batch size of the toy problem")
    p.add_argument("--fc-scale", type=float, default=4.0,
                   help="multiplies the random fc weights (larger logits: gates matter more)")
    p.add_argument("--baseline-decay", type=float, default=0.9,
                   help="REINFORCE moving-average baseline decay (the library default)")
    p.add_argument("--widths", type=int, nargs="+", default=[3, 3, 4],
                   help="one setting per entry: units per family (2 width + 2 gates; the "
                   "i-th setting uses seed + i)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--out", default=None, help="output stem (default: benchmarks/results/"
                   "gate_estimators)")
    args = p.parse_args(argv)
    if not 0 < args.theta_lo <= args.theta_hi < 1:
        p.error("need 0 < theta-lo <= theta-hi < 1")
    if args.K < 2:
        p.error("--K must be >= 2")
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variant_list or any(v not in VARIANTS for v in args.variant_list):
        p.error(f"--variants must be among {', '.join(VARIANTS)}, got {args.variants!r}")
    if max(args.widths) > 6:
        p.error("width > 6 means more than 2^14 patterns to enumerate")
    return args


def toy_problem(width: int, seed: int, args) -> tuple[GatedResNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    net = ResNet(BasicBlock, (2,), (width,), "cifar", num_classes=3, in_channels=1,
                 shortcut="A")
    with torch.no_grad():
        net.fc.weight.mul_(args.fc_scale)
    gated = GatedResNet(net, INPUT, baseline_decay=args.baseline_decay).train()
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(args.batch, *INPUT, generator=g)
    y = torch.randint(0, 3, (args.batch,), generator=g)
    theta = args.theta_lo + (args.theta_hi - args.theta_lo) * torch.rand(len(gated.theta),
                                                                         generator=g)
    with torch.no_grad():
        gated.theta.copy_(theta)
    return gated, x, y


def enumerate_exact(gated: GatedResNet, x, y) -> dict:
    """E[CE], the exact gradient and the exact mean of the ST estimate (float64)."""
    n = len(gated.theta)
    gated.estimator = "st"
    pats = torch.tensor(list(itertools.product((False, True), repeat=n)))
    losses, st = [], []
    for p in pats:
        gated.zero_grad(set_to_none=True)
        ce = F.cross_entropy(gated(x, xi=p), y)
        ce.backward()
        losses.append(float(ce.detach()))
        st.append(gated._leaf.grad.double())
    L, G = torch.tensor(losses, dtype=torch.float64), torch.stack(st)
    th = gated.theta.double()
    pf = pats.double()
    prob = (pf * th + (1 - pf) * (1 - th)).prod(1)
    w = prob[:, None] / torch.where(pats, th, 1 - th) * torch.where(pats, 1.0, -1.0).double()
    return {"patterns": len(pats), "E_ce": float(prob @ L), "grad": (w * L[:, None]).sum(0),
            "st_mean": prob @ G, "ce_min": float(L.min()), "ce_max": float(L.max())}


VARIANTS = {"st": ("st", None, None, None), "reinforce": ("reinforce", None, None, None),
            "flip": ("flip", None, None, None), "flip 2u+1b": ("flip", 2, 1, None),
            "batched 12": ("batched", None, None, 12), "batched 8": ("batched", None, None, 8)}
"""label: (estimator, flip_units, flip_blocks, flip_samples).  ``batched``: every gate flipped
on a ghost batch of ``flip_samples`` of the batch, its per-step differences taken raw (before
the running average training keeps, which is not a per-step estimate)."""


def sample(gated: GatedResNet, x, y, variant: str, k: int, seed: int):
    """``k`` estimates as training computes them, and the wall time of each (ms)."""
    est_name, gated.flip_units, gated.flip_blocks, ghost = VARIANTS[variant]
    gated.estimator = est_name
    if ghost is not None:
        gated.flip_samples = ghost
    with torch.no_grad():
        gated.baseline.zero_()
        gated.baseline_set.fill_(False)
    torch.manual_seed(seed)
    out = torch.empty(k, len(gated.theta), dtype=torch.float64)
    ms = []
    for i in range(k):
        t0 = time.perf_counter()
        gated.zero_grad(set_to_none=True)
        ce = F.cross_entropy(gated(x), y)
        ce.backward()
        if est_name == "batched":
            gates, values, _ = batched_flips(gated, x, y)
            est = torch.zeros_like(gated.theta).index_put_((gates,), values)
        else:
            est = gated.theta_gradient(ce.detach(), (x, y))
        ms.append(1e3 * (time.perf_counter() - t0))
        out[i] = est.double()
    return out, ms


def cosine(a, b) -> float:
    d = float(a.norm() * b.norm())
    return float(a @ b) / d if d > 0 else float("nan")


def summarize(est, exact, ms, n_units: int) -> dict:
    k = est.shape[0]
    mean, var = est.mean(0), est.var(0)
    bias = mean - exact
    se = (var / k).sqrt()
    mse = ((est - exact) ** 2).mean(0)
    return {"K": k, "max_abs_bias": float(bias.abs().max()),
            "max_abs_z": float((bias.abs() / se.clamp_min(1e-300)).max()),
            "rel_bias": float(bias.norm() / exact.norm()),
            "mean_var": float(var.mean()), "var_units": float(var[:n_units].mean()),
            "var_blocks": float(var[n_units:].mean()), "mse": float(mse.mean()),
            "cosine": cosine(mean, exact), "ms_per_estimate": statistics.median(ms),
            "bias": bias.tolist(), "mean": mean.tolist(), "var": var.tolist()}


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    rows, settings = [], []
    for i, width in enumerate(args.widths):
        seed = args.seed + i
        gated, x, y = toy_problem(width, seed, args)
        t0 = time.perf_counter()
        ex = enumerate_exact(gated, x, y)
        enum_s = time.perf_counter() - t0
        exact = ex["grad"]
        name = f"w{width}-s{seed}"
        th = gated.theta.double()
        all_off = max(float((1 - th[g.slice]).prod()) for g in gated.gates if g.kind == "unit")
        settings.append({"setting": name, "width": width, "seed": seed, "gates": len(exact),
                         "patterns": ex["patterns"], "E_ce": ex["E_ce"],
                         "p_family_all_off_max": all_off,
                         "ce_range": [ex["ce_min"], ex["ce_max"]], "enumerate_s": enum_s,
                         "theta": gated.theta.tolist(), "exact_grad": exact.tolist(),
                         "st_exact_mean": ex["st_mean"].tolist()})
        for estimator in args.variant_list:
            est, ms = sample(gated, x, y, estimator, args.K, seed=1000 + seed)
            r = {"setting": name, "estimator": estimator, "gates": len(exact),
                 "E_ce": ex["E_ce"], "exact_grad_norm": float(exact.norm()),
                 **summarize(est, exact, ms, gated.n_units)}
            if estimator == "st":
                r["exact_rel_bias"] = float((ex["st_mean"] - exact).norm() / exact.norm())
                r["exact_cosine"] = cosine(ex["st_mean"], exact)
            rows.append(r)

    info = _common.machine_info("cpu")
    vectors = ("bias", "mean", "var")
    result = {"benchmark": "gate_estimators", "config": vars(args), "machine": info,
              "settings": settings, "rows": rows,
              "wall_s": time.perf_counter() - t_start}
    stem = _common.results_path(args.out, "gate_estimators")
    _common.write_json(stem.with_suffix(".json"), result)
    _common.write_csv(stem.with_suffix(".csv"),
                      [{k: v for k, v in r.items() if k not in vectors} for r in rows])

    print(_common.format_machine(info))
    print(f"toy nets: one stage of 2 BasicBlocks, input {INPUT}, batch {args.batch}, fc x "
          f"{args.fc_scale}; theta ~ U[{args.theta_lo}, {args.theta_hi}]; K = {args.K} "
          f"estimates each; REINFORCE baseline decay {args.baseline_decay}")
    for s in settings:
        print(f"  {s['setting']}: {s['gates']} gates, {s['patterns']} patterns enumerated in "
              f"{s['enumerate_s']:.1f} s, E[CE] = {s['E_ce']:.4f}, |exact grad| = "
              f"{float(torch.tensor(s['exact_grad']).norm()):.4f}, P(a unit family all off) "
              f"up to {s['p_family_all_off_max']:.3f}")
    print(_common.table(rows, [("setting", "setting", ""), ("estimator", "estimator", ""),
                               ("max_abs_bias", "max|bias|", ".4f"),
                               ("max_abs_z", "max|z|", ".1f"),
                               ("rel_bias", "rel bias", ".3f"),
                               ("exact_rel_bias", "exact rel bias", ".3f"),
                               ("mean_var", "var/gate", ".4g"),
                               ("var_units", "var units", ".4g"),
                               ("var_blocks", "var blocks", ".4g"), ("mse", "MSE", ".4g"),
                               ("cosine", "cos", ".3f"),
                               ("ms_per_estimate", "ms/est", ".2f")]))
    print("rel bias ||mean - exact|| / ||exact|| of the K-sample mean (includes sampling noise "
          "of size ~sqrt(var/K)); exact rel bias: st's expectation from enumeration")
    print("st on units: when a whole unit family is sampled off, the next BN (train mode) sees "
          "zero batch variance and dCE/dxi is amplified by ~1/sqrt(eps): most of st's unit "
          "variance and bias comes from those patterns")
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
