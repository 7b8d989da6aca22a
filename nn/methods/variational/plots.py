"""The variational pruner's figures: theta per unit family (quantile bands) and per block gate
over the epochs, and the expected, deterministic and live MACs with the live block gates."""

from __future__ import annotations

__all__ = ["gate_plots"]


def _quantiles(values: list[float], qs=(0.1, 0.25, 0.5, 0.75, 0.9)) -> list[float]:
    """Linear-interpolated quantiles of ``values`` (numpy's default rule)."""
    v = sorted(values)
    out = []
    for q in qs:
        i = q * (len(v) - 1)
        lo = int(i)
        hi = min(lo + 1, len(v) - 1)
        out.append(v[lo] + (i - lo) * (v[hi] - v[lo]))
    return out


def gate_plots(hist: list[dict], title: str, save, plt) -> None:
    """``theta.png``: one small panel per unit family -- the median theta of its gates over the
    epochs with the 25-75% and 10-90% bands, and the share of its gates still alive (theta >
    0, dashed) -- and a last panel with every block gate; ``gates.png``: the MACs over the
    epochs."""
    ep = [0] + [h["epoch"] for h in hist]
    names = list(hist[0]["theta"])
    units = [n for n in names if not n.startswith("block.")]
    blocks = [n for n in names if n.startswith("block.")]
    cols = min(len(units) + bool(blocks), 6)
    rows = -(-(len(units) + bool(blocks)) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 1.9 * rows), sharex=True,
                             sharey=True, squeeze=False)
    flat = [a for row in axes for a in row]
    for ax, name in zip(flat, units):
        q = [[1.0] * 5] + [_quantiles(h["theta"][name]) for h in hist]
        alive = [1.0] + [sum(v > 0 for v in h["theta"][name]) / len(h["theta"][name])
                         for h in hist]
        ax.fill_between(ep, [r[0] for r in q], [r[4] for r in q], color="C0", alpha=0.15,
                        lw=0, label="10-90%")
        ax.fill_between(ep, [r[1] for r in q], [r[3] for r in q], color="C0", alpha=0.35,
                        lw=0, label="25-75%")
        ax.plot(ep, [r[2] for r in q], color="C0", lw=1.5, label="median")
        ax.plot(ep, alive, "--", color="C3", lw=1, label="alive share")
        ax.set_title(f"{name} ({len(hist[0]['theta'][name])})", fontsize=7)
        ax.tick_params(labelsize=6)
    if blocks:
        ax = flat[len(units)]
        for name in blocks:
            ax.plot(ep, [1.0] + [h["theta"][name][0] for h in hist], lw=1,
                    label=name[len("block."):])
        ax.set_title("block gates", fontsize=7)
        ax.legend(fontsize=5, ncol=2)
        ax.tick_params(labelsize=6)
    for ax in flat[len(units) + bool(blocks):]:
        ax.axis("off")
    flat[0].set_ylim(-0.02, 1.02)
    flat[0].legend(fontsize=5, loc="lower left")
    fig.supxlabel("epoch", fontsize=8)
    fig.supylabel("theta (keep probability)", fontsize=8)
    fig.suptitle(f"{title}: theta per unit family (median, bands) and block gates", fontsize=9)
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
