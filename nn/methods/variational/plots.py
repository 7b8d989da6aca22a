"""The variational pruner's figures: theta per gate over the epochs, and the expected,
deterministic and live MACs with the live block gates."""

from __future__ import annotations

__all__ = ["gate_plots"]


def gate_plots(hist: list[dict], title: str, save, plt) -> None:
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
