"""The final report of a pipeline run: one JSON object (configuration, code version, accuracies,
MACs/params/latency of the dense and the physically pruned model, layer widths, blocks, selection
trace, histories, timings, the method's own section) and a printable table.  Figures:
:mod:`nn.plots`.
"""

from __future__ import annotations

import torch
from torch import nn as tnn

from nn.plots import write_plots
from nn.provenance import git_info
from nn.selection import percent

__all__ = ["build_report", "layer_widths", "block_summary", "git_info", "write_plots",
           "format_table"]

FORMAT = "mipprune.nn.pipeline-report/1"


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


def build_report(cfg, *, bundle, input_size, dense_model, pruned_spec, section, stages,
                 accuracy, dense, pruned, latency, timing, files, world) -> dict:
    """The report object (see the module docstring); every value plain JSON.  ``section``:
    the method's own part (:meth:`nn.methods.Method.section`), under ``"regularizer"``."""
    from mipprune import __version__

    ratio = {k: pruned[k] / dense[k] for k in ("macs", "params")}
    lat = {}
    for b, d in latency.items():
        dm, pm = d["dense"]["median_ms"], d["pruned"]["median_ms"]
        lat[b] = {"dense_ms": dm, "pruned_ms": pm, "speedup": dm / pm if pm > 0 else None,
                  "dense": d["dense"], "pruned": d["pruned"],
                  "quiet_rounds": d.get("quiet_rounds"), "rounds": d.get("rounds"),
                  "disturbed": d.get("disturbed")}
    any_lat = next(iter(latency.values()), {"dense": {}})["dense"]
    blocks = block_summary(dense_model, pruned_spec)
    return {
        "format": FORMAT, "method": cfg.method.name, "preset": cfg.preset,
        "config": cfg.to_dict(),
        "git": git_info(), "versions": {"mipprune": str(__version__), "torch": torch.__version__},
        "data": {"name": bundle.name, "train_images": bundle.num_train,
                 "test_images": bundle.num_test, "input_size": list(input_size),
                 "num_classes": bundle.num_classes},
        "regularizer": section,
        "selection": {k: v for k, v in stages["select"].items() if k not in ("ran", "seconds")},
        "accuracy": accuracy,
        "complexity": {"dense": dense, "pruned": pruned, "macs_ratio": ratio["macs"],
                       "params_ratio": ratio["params"], "mac_reduction": 1 - ratio["macs"],
                       "param_reduction": 1 - ratio["params"],
                       "counted_on": "the saved pruned model, reloaded (count_macs, "
                                     "count_params); MACs of one input"},
        "latency": {"device": any_lat.get("device"), "threads": any_lat.get("threads"),
                    "what": "median ms of one forward pass of the inference form (BN folded), "
                            "dense and pruned timed together round by round, warm-up "
                            "excluded, rounds with other processes busy skipped "
                            "(nn.latency.measure_networks)", "batches": lat},
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


def _si(x) -> str:
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.2f} {unit}"
    return f"{x:g}"


def format_table(report: dict) -> str:
    """A readable summary of ``report``."""
    c, a, sel = report["complexity"], report["accuracy"], report["selection"]
    cfg = report["config"]
    lines = [f"== {report['method']} | {cfg['model']['name']} (width {cfg['model']['width']}) | "
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
                     f"{d['pruned_ms'] / d['dense_ms']:>14.3f}   speed-up {d['speedup']:.2f}x")
    if lat["batches"]:
        busy = {b: d.get("other_cores") for b, d in lat["batches"].items() if d.get("disturbed")}
        load = [c for c in busy.values() if c is not None]
        lines.append(f"  (latency: BN folded, median of {cfg['runtime']['latency_repeats']} "
                     f"rounds on {lat['device']}, {lat['threads']} threads"
                     + (f"; DISTURBED by other processes at batch {', '.join(busy)}"
                        + (f" (up to {max(load):.1f} other cores busy)" if load else "")
                        + ": not a quiet measurement" if busy else "") + ")")
    lines.append(f"test accuracy: before pruning {percent(a['test_before_pruning'])} | after pruning "
                 f"{percent(a['test_after_pruning'])} | after fine-tune "
                 f"{percent(a['test_after_finetune'])} | saved model reloaded "
                 f"{percent(a['test_reloaded'])} ({'matches' if a['reload_matches'] else 'DIFFERS'})")
    lines.append(f"selection: {sel['summary']}")
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
