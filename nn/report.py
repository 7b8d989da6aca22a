"""The final report of a pipeline run: one JSON object (configuration, code version, accuracies,
MACs/params/latency of the dense and the physically pruned model, layer widths, blocks, selection
trace, histories, timings), PNG plots (matplotlib, Agg backend) and a printable table.

Plots: ``widths.png`` (output channels of every conv before/after), ``training.png`` (accuracy,
loss and penalty per epoch: regularised training, then fine-tuning), ``cases.png`` (share of
SPR groups in cases C1/C2/C3 per epoch; spr and bigm only -- for bigm the cases SPR would put the
groups in), ``selection.png`` (the bisection / MAC-target evaluations against the cut);
variational only: ``theta.png`` (every gate's keep probability per epoch, units and blocks) and
``gates.png`` (expected, deterministic and live MACs, live blocks per epoch).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch
from torch import nn as tnn

__all__ = ["build_report", "layer_widths", "block_summary", "git_info", "write_plots",
           "format_table"]

FORMAT = "mipprune.nn.pipeline-report/1"


def git_info() -> dict:
    """``commit`` (HEAD) and ``dirty`` (tracked files modified) of the source checkout, or
    None values outside a git checkout."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                               timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _spec_blocks(spec: dict) -> dict[str, dict]:
    return {b["source"]: b for stage in spec["stages"] for b in stage}


def layer_widths(dense_model: tnn.Module, spec: dict) -> list[dict]:
    """Output channels of every conv of the dense model, before and after pruning (0: the conv
    is gone -- a removed block or a cut branch), read from the pruned model's spec."""
    blocks = _spec_blocks(spec)
    rows = []
    for name, mod in dense_model.named_modules():
        if not isinstance(mod, tnn.Conv2d):
            continue
        if name == "conv1":
            after = spec["stem"]["out"]
        else:
            blk_name, rest = name.split(".")[0] + "." + name.split(".")[1], name.split(".", 2)[2]
            b = blocks.get(blk_name)
            if b is None:
                after = 0
            elif rest.startswith("downsample"):
                after = b["out"]
            elif b["branch"] != "convs":
                after = 0
            else:
                i = int(rest[len("conv"):]) - 1
                widths = b["mid"] + [b["out"] if b["index"] is None else len(b["index"])]
                after = widths[i]
        rows.append({"name": name, "dense": mod.out_channels, "pruned": after})
    return rows


def block_summary(dense_model: tnn.Module, spec: dict) -> list[dict]:
    """Every residual block of the dense model: ``branch`` ``convs`` (still computed),
    ``const`` (input cut: a per-channel constant is added), ``none`` or ``removed``, and the
    stream width it writes."""
    blocks = _spec_blocks(spec)
    rows = []
    for s, stage in enumerate(dense_model.stages()):
        for b in range(len(stage)):
            name = f"layer{s + 1}.{b}"
            sb = blocks.get(name)
            rows.append({"name": name, "branch": sb["branch"] if sb else "removed",
                         "mid": sb["mid"] if sb else [], "out": sb["out"] if sb else None})
    return rows


def build_report(cfg, *, bundle, input_size, dense_model, pruned_spec, reg, stages, accuracy,
                 dense, pruned, latency, timing, files, world) -> dict:
    """The report object (see the module docstring); every value plain JSON."""
    from mipprune import __version__

    if reg is not None:
        rc = reg.config
        regularizer = {"penalty": rc.penalty, "lam": rc.lam, "alpha": rc.alpha,
                       "M_scale": rc.M_scale, "cost": rc.cost, "beyond_M": rc.beyond_M,
                       "kinds": list(rc.kinds),
                       "a_j": "lam * alpha * n_j / N", "b_j": "lam * (1 - alpha) * n_j / N",
                       "n_j/N": {"params": "params_j / params", "macs": "macs_j / macs"}.get(
                           rc.cost, f"(1 - {rc.cost}) params_j/params + {rc.cost} macs_j/macs"),
                       "M_j": "M_scale * max|w| over the family's writers in "
                              + (cfg.reference or "the initial weights (seeded)"),
                       "M": {name: float(v) for name, v in reg.M.items()}}
    elif cfg.method == "slimming":
        regularizer = {"penalty": "slimming", "lambda": cfg.slimming_lambda,
                       "term": "lambda * sum |gamma| over the BN writers of the pruned structures"}
    elif cfg.method == "variational":
        regularizer = {"penalty": "variational", "lam": cfg.lam, "beta": cfg.beta,
                       "gamma": cfg.gamma, "theta_lr": cfg.theta_lr,
                       "estimator": cfg.estimator, "flip_units": cfg.flip_units,
                       "flip_blocks": cfg.flip_blocks,
                       "warmup_epochs": cfg.gate_warmup_epochs,
                       "theta_init": cfg.theta_init,
                       "R": "(1 - beta) E[MACs]/MACs0 + beta E[params]/params0 + "
                            "gamma E[blocks]/B (exact, multilinear in theta)"}
    else:
        regularizer = None
    ratio = {k: pruned[k] / dense[k] for k in ("macs", "params")}
    lat = {}
    for b, d in latency.items():
        dm, pm = d["dense"]["median_ms"], d["pruned"]["median_ms"]
        lat[b] = {"dense_ms": dm, "pruned_ms": pm, "speedup": dm / pm if pm > 0 else None,
                  "dense": d["dense"], "pruned": d["pruned"]}
    any_lat = next(iter(latency.values()), {"dense": {}})["dense"]
    blocks = block_summary(dense_model, pruned_spec)
    return {
        "format": FORMAT, "method": cfg.method, "preset": cfg.preset, "config": cfg.to_dict(),
        "git": git_info(), "versions": {"mipprune": str(__version__), "torch": torch.__version__},
        "data": {"name": bundle.name, "train_images": bundle.num_train,
                 "test_images": bundle.num_test, "input_size": list(input_size),
                 "num_classes": bundle.num_classes},
        "regularizer": regularizer,
        "selection": {k: v for k, v in stages["select"].items() if k not in ("ran", "seconds")},
        "accuracy": accuracy,
        "complexity": {"dense": dense, "pruned": pruned, "macs_ratio": ratio["macs"],
                       "params_ratio": ratio["params"], "mac_reduction": 1 - ratio["macs"],
                       "param_reduction": 1 - ratio["params"],
                       "counted_on": "the saved pruned model, reloaded (count_macs, "
                                     "count_params); MACs of one input"},
        "latency": {"device": any_lat.get("device"), "threads": any_lat.get("threads"),
                    "what": "median ms of one forward pass (measure_latency: eval, "
                            "inference_mode, warm-up excluded)", "batches": lat},
        "layers": layer_widths(dense_model, pruned_spec),
        "blocks": blocks,
        "blocks_kept": sum(b["branch"] == "convs" for b in blocks),
        "history": {"train": stages["train"].get("history", []),
                    "finetune": stages["finetune"].get("history", [])},
        "timings": {**{k: float(v) for k, v in timing.items()},
                    "ran": {k: bool(v.get("ran")) for k, v in stages.items()}},
        "files": dict(files),
        "distributed": {"world_size": world,
                        "selection": "every rank, evaluations sharded and all-reduced; rank 0's "
                                     "masks broadcast", "report": "rank 0"},
    }


# ---- plots -----------------------------------------------------------------------------------

def write_plots(report: dict, out) -> list[str]:
    """Write the PNGs next to the report; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, written = Path(out), []
    title = f"{report['config']['model']} {report['method']} on {report['data']['name']}"

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(str(out / name))

    rows = report["layers"]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["dense"] for r in rows], 0.4, label="dense", color="#bbb")
    ax.bar([i + 0.2 for i in x], [r["pruned"] for r in rows], 0.4, label="pruned", color="C0")
    ax.set_xticks(list(x), [r["name"] for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title(f"{title}: layer widths (MACs x{report['complexity']['macs_ratio']:.2f})")
    ax.legend()
    save(fig, "widths.png")

    tr, ft = report["history"]["train"], report["history"]["finetune"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a3 = a2.twinx()
    for hist, off, tag, c in ((tr, 0, "regularised", 0), (ft, len(tr), "fine-tune", 2)):
        if not hist:
            continue
        ep = [h["epoch"] + off for h in hist]
        a1.plot(ep, [h["train_acc"] for h in hist], "-o", ms=3, color=f"C{c}",
                label=f"{tag}: train acc")
        a1.plot(ep, [h["test_acc"] for h in hist], "--s", ms=3, color=f"C{c + 1}",
                label=f"{tag}: test acc")
        a2.plot(ep, [h["train_loss"] for h in hist], "-o", ms=3, color=f"C{c}",
                label=f"{tag}: cross-entropy")
        if "train_extra" in hist[0]:
            a3.plot(ep, [h["train_extra"] for h in hist], ":^", ms=3, color="C4",
                    label=f"{tag}: penalty (right axis)")
    if ft:
        for a in (a1, a2):
            a.axvline(len(tr) + 0.5, color="k", lw=0.8, ls="--")
    a1.set(xlabel="epoch", ylabel="accuracy", title=f"{title}: accuracy")
    a2.set(xlabel="epoch", ylabel="cross-entropy (mean per step)", title="loss and penalty")
    a3.set_ylabel("penalty (mean per step)")
    a1.legend(fontsize=7)
    h2, l2 = a2.get_legend_handles_labels()
    h3, l3 = a3.get_legend_handles_labels()
    a2.legend(h2 + h3, l2 + l3, fontsize=7)
    save(fig, "training.png")

    if tr and "spr_C1" in tr[0]:
        fig, ax = plt.subplots(figsize=(6, 4))
        ep = [h["epoch"] for h in tr]
        ax.stackplot(ep, *[[h[f"spr_C{c}"] for h in tr] for c in (1, 2, 3)],
                     labels=["C1 (z*=1)", "C2 (group lasso)", "C3 (z*=u)"], alpha=0.8)
        ax.set(xlabel="epoch", ylabel="share of groups", ylim=(0, 1),
               title=f"{title}: SPR cases per epoch")
        ax.legend(loc="lower left", fontsize=8)
        save(fig, "cases.png")

    if tr and "theta" in tr[0]:
        _gate_plots(tr, title, save, plt)
    sel = report["selection"]
    if sel.get("trace"):
        key = "acc" if sel["rule"] == "bisection" else "value"
        pts = sorted(sel["trace"], key=lambda t: t["candidate"])
        fig, ax = plt.subplots(figsize=(6, 4))
        if key == "acc":
            pts = [{"candidate": 0, "acc": sel["train_acc_unpruned"]}] + [
                t for t in pts if t["candidate"]]
            ax.axhline(sel["train_acc_unpruned"] - sel["tolerance_pp"] / 100, color="C2",
                       ls=":", label=f"unpruned - {sel['tolerance_pp']} pp")
        else:
            ax.axhline(sel["mac_target"] * report["complexity"]["dense"]["macs"], color="C2",
                       ls=":", label=f"target: {sel['mac_target']} x dense")
        ax.plot([t["candidate"] for t in pts], [t[key] for t in pts], "o-")
        ax.axvline(sel["cut"], color="C3", ls="--", label=f"chosen cut: {sel['cut']} removed")
        ax.set(xlabel="structures removed (cut)",
               ylabel="training-subset accuracy" if key == "acc" else "MACs",
               title=f"{title}: selection ({sel['rule']})")
        ax.legend(fontsize=8)
        save(fig, "selection.png")
    return written


def _gate_plots(hist: list[dict], title: str, save, plt) -> None:
    ep = [0] + [h["epoch"] for h in hist]
    names = list(hist[0]["theta"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name in names:
        block = name.startswith("block.")
        ax = a2 if block else a1
        size = len(hist[0]["theta"][name])
        for j in range(size):
            ys = [1.0] + [h["theta"][name][j] for h in hist]
            ax.plot(ep, ys, lw=1.2 if block else 0.5, alpha=0.9 if block else 0.35,
                    label=name[len("block."):] if block else None)
    n_units = sum(len(hist[0]["theta"][n]) for n in names if not n.startswith("block."))
    a1.set(xlabel="epoch", ylabel="theta (keep probability)",
           title=f"{title}: {n_units} unit gates")
    a2.set(xlabel="epoch", title="block gates")
    if any(n.startswith("block.") for n in names):
        a2.legend(fontsize=7)
    save(fig, "theta.png")

    fig, a1 = plt.subplots(figsize=(6, 4))
    e1 = [h["epoch"] for h in hist]
    a1.plot(e1, [h["gates_exp_macs"] / 1e6 for h in hist], "-o", ms=3, label="E[MACs]")
    a1.plot(e1, [h["gates_det_macs"] / 1e6 for h in hist], "--s", ms=3,
            label="MACs of the deterministic net")
    if "gates_live_macs" in hist[0]:
        a1.plot(e1, [h["gates_live_macs"] / 1e6 for h in hist], "-.d", ms=3,
                label="MACs computed a step (live structures)")
    a1.set(xlabel="epoch", ylabel="MACs (M)", title=f"{title}: MACs over epochs")
    a2 = a1.twinx()
    a2.plot(e1, [h["gates_blocks_alive"] for h in hist], ":^", color="C3", ms=3,
            label="live block gates (right)")
    a2.set_ylabel("live block gates")
    h1, l1 = a1.get_legend_handles_labels()
    h2, l2 = a2.get_legend_handles_labels()
    a1.legend(h1 + h2, l1 + l2, fontsize=7)
    save(fig, "gates.png")


# ---- the printed table -----------------------------------------------------------------------

def _si(x) -> str:
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.2f} {unit}"
    return f"{x:g}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def format_table(report: dict) -> str:
    """A readable summary of ``report``."""
    c, a, sel = report["complexity"], report["accuracy"], report["selection"]
    cfg = report["config"]
    lines = [f"== {report['method']} | {cfg['model']} (width {cfg['width']}) | "
             f"{report['data']['name']} ({report['data']['train_images']} train / "
             f"{report['data']['test_images']} test images) | commit "
             f"{(report['git']['commit'] or '?')[:10]}{'+dirty' if report['git']['dirty'] else ''}",
             f"{'':24}{'dense':>14}{'pruned':>14}{'pruned/dense':>14}"]
    for k in ("macs", "params"):
        lines.append(f"{'MACs' if k == 'macs' else 'params':24}{_si(c['dense'][k]):>14}"
                     f"{_si(c['pruned'][k]):>14}{c[k + '_ratio']:>14.3f}")
    lat = report["latency"]
    for b, d in lat["batches"].items():
        lines.append(f"{f'latency ms, batch {b}':24}{d['dense_ms']:>14.3f}{d['pruned_ms']:>14.3f}"
                     f"{d['pruned_ms'] / d['dense_ms']:>14.3f}")
    if lat["batches"]:
        lines.append(f"  (latency: median of {cfg['latency_repeats']} runs on {lat['device']}, "
                     f"{lat['threads']} threads)")
    lines.append(f"test accuracy: before pruning {_pct(a['test_before_pruning'])} | after pruning "
                 f"{_pct(a['test_after_pruning'])} | after fine-tune "
                 f"{_pct(a['test_after_finetune'])} | saved model reloaded "
                 f"{_pct(a['test_reloaded'])} ({'matches' if a['reload_matches'] else 'DIFFERS'})")
    if sel.get("rule") == "bisection":
        lines.append(f"selection: bisection on {sel['train_subset_images']} training images, "
                     f"tolerance {sel['tolerance_pp']} pp, score {sel['score']}: removed "
                     f"{sel['cut']} of {sel['structures']} structures (tau {sel['tau']}); train "
                     f"acc {_pct(sel['train_acc_unpruned'])} -> {_pct(sel['train_acc_pruned'])} "
                     f"in {len(sel['trace'])} evaluations")
    elif sel.get("rule") == "mac-target":
        lines.append(f"selection: MAC target {sel['mac_target']} of dense "
                     f"({'reached' if sel['target_reached'] else 'NOT reached'}), score "
                     f"{sel['score']}, {sel['order']} order: removed {sel['cut']} of "
                     f"{sel['structures']} structures")
    elif sel.get("rule") == "variational":
        b = sel["before_rounding"]
        lines.append(f"selection: variational gates (lam {cfg['lam']}, beta {cfg['beta']}, "
                     f"gamma {cfg['gamma']}, estimator {cfg['estimator']}): "
                     f"{b['units_alive']} units and {b['blocks_alive']} block gates alive at the "
                     f"end; rounded up {sel['rounded_up']}, down {sel['rounded_down']} "
                     f"({sel['rule_text']})")
    else:
        lines.append("selection: none (dense)")
    blocks = report["blocks"]
    lines.append(f"blocks with a conv branch: {report['blocks_kept']}/{len(blocks)}  "
                 + " ".join(f"{b['name']}:{b['branch']}{b['mid'] if b['mid'] else ''}"
                            for b in blocks))
    lines.append("widths: " + ", ".join(f"{r['name']} {r['dense']}->{r['pruned']}"
                                        for r in report["layers"]))
    t = report["timings"]
    skipped = {"finetune": not report["history"]["finetune"] and not t["finetune"]}
    lines.append("time (s): " + ", ".join(
        f"{k} {t[k]:.1f}{'' if t['ran'].get(k, True) else ' (earlier call)'}"
        if not skipped.get(k) else f"{k} skipped"
        for k in ("train", "select", "finetune", "report") if k in t))
    lines.append(f"report: {report['files']['report']}   model: {report['files']['model']}")
    return "\n".join(lines)
