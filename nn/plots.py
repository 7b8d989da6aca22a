"""The report's figures (matplotlib, Agg backend), written next to ``report.json``:

``widths.png``     output channels of every conv before/after pruning
``training.png``   accuracy, loss and penalty per epoch: regularised training, then fine-tuning
``selection.png``  the bisection / MAC-target evaluations against the cut (scored methods)

and whatever the method adds (:meth:`nn.methods.Method.plots`: SPR's ``cases.png``, the
variational pruner's ``theta.png`` and ``gates.png``).  Matplotlib loads on the first call.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_plots"]


def write_plots(report: dict, out, method=None) -> list[str]:
    """Write the PNGs next to the report, the method's own figures included
    (:meth:`nn.methods.Method.plots`); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, written = Path(out), []
    title = (f"{report['config']['model']['name']} {report['method']} on "
             f"{report['data']['name']}")

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

    if method is not None:
        method.plots(report, save, plt, title)
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
