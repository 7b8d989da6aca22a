"""``spr``: Structured Perspective Regularization.  Training adds the closed-form penalty of the
MIP's perspective relaxation (:class:`nn.regularizer.SPRRegularizer`, the formula of
:mod:`mipprune.penalty`); structures are ranked by their group norm ``t_j = ||w_j||_2`` or by
the indicator the penalty projects out, ``z*_j = min(1, max(||w_j||_inf / M_j, sqrt(a_j/b_j)
t_j))``, and cut by bisection on the training-accuracy drop.

``M_j = M_scale * max|w|`` over family j's writers in ``reference`` (a checkpoint or state_dict
path) or, by default, in the *initial* weights (the model is seeded, so a resumed run rebuilds
the same M).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mipprune.penalty import spr
from nn.checks import existing_file
from nn.methods.base import Method, Training
from nn.regularizer import SPRConfig, SPRRegularizer

__all__ = ["SPR", "SPROptions", "SCORES"]

SCORES = ("norm", "z")
_DEFAULT = SPRConfig(lam=0.0)


@dataclass(frozen=True)
class SPROptions:
    """``alpha`` ridge share (``a = lam alpha cost``), ``M_scale``, ``beyond_M`` (``extend``:
    C1 beyond M; ``project``: clamp after each step), ``reference`` (weights that set M;
    None: the initial ones), ``score`` (``norm`` or ``z``), ``group`` (structures per SPR
    group: trained, scored and kept together; pair it with ``--granularity``).  Defaults:
    :class:`SPRConfig`'s."""

    alpha: float = _DEFAULT.alpha
    M_scale: float = _DEFAULT.M_scale
    beyond_M: str = _DEFAULT.beyond_M
    reference: str | None = None
    score: str = "norm"
    group: int = _DEFAULT.group

    def __post_init__(self):
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.reference is not None:
            existing_file("reference", self.reference)


class SPR(Method):
    name = "spr"
    summary = "SPR: the perspective relaxation's closed-form penalty, bisection on accuracy"
    lam = 4.5
    options = SPROptions
    rule = "bisection"
    uses_cost = True
    penalty = "spr"

    def spr_config(self, config) -> SPRConfig:
        m, o = config.method, config.method.options
        return SPRConfig(lam=m.lam, alpha=o.alpha, M_scale=o.M_scale, cost=m.cost,
                         kinds=m.structures, beyond_M=o.beyond_M, penalty=self.penalty,
                         group=o.group)

    def check(self, config):
        self.spr_config(config)

    def training(self, run):
        # built on the initial weights: M from them
        latency = None
        if run.config.method.cost.latency:
            from nn.budget_latency import latency_cost

            latency = latency_cost(run)
        reg = SPRRegularizer(run.model, self.spr_config(run.config), run.input_size,
                             reference=run.config.method.options.reference, latency=latency)

        def cases(m, epoch):
            with torch.no_grad():
                s = reg.case_stats()["all"]
                return {"spr_C1": s["C1"], "spr_C2": s["C2"], "spr_C3": s["C3"],
                        "penalty": float(reg())}

        return Training(run.model, dict(extra_grad=lambda m, scale: reg.add_grad_(scale),
                                        after_step=lambda m: reg.project_(),
                                        epoch_metrics=cases), reg)

    def score_name(self, run):
        return run.config.method.options.score

    @torch.no_grad()
    def scores(self, run, training):
        reg, params = training.state, dict(training.module.named_parameters())
        if reg is None:  # scoring a model trained elsewhere: the regularizer it would have had
            reg = SPRRegularizer(training.module, self.spr_config(run.config), run.input_size)
        out = {}
        for f in run.pruned:  # a group's score is each of its structures' score
            w = reg.weights(params, f).detach()
            if self.score_name(run) == "z":
                s = spr(w.double(), reg.a[f.name].to(w.device), reg.b[f.name].to(w.device),
                        reg.M[f.name]).z
            else:
                s = w.double().norm(dim=1)
            out[f.name] = s.cpu().repeat_interleave(reg.config.group)
        return out

    def section(self, run, training):
        rc, reg = training.state.config, training.state
        return {"penalty": rc.penalty, "lam": rc.lam, "alpha": rc.alpha, "M_scale": rc.M_scale,
                "cost": rc.cost.to_dict(), "beyond_M": rc.beyond_M, "kinds": list(rc.kinds),
                "a_j": "lam * alpha * cost_j", "b_j": "lam * (1 - alpha) * cost_j",
                "cost_j": rc.cost.formula(),
                "M_j": "M_scale * max|w| over the family's writers in "
                       + (run.config.method.options.reference or "the initial weights (seeded)"),
                "M": {name: float(v) for name, v in reg.M.items()}}

    def plots(self, report, save, plt, title):
        tr = report["history"]["train"]
        if not tr or "spr_C1" not in tr[0]:
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        ep = [h["epoch"] for h in tr]
        ax.stackplot(ep, *[[h[f"spr_C{c}"] for h in tr] for c in (1, 2, 3)],
                     labels=["C1 (z*=1)", "C2 (group lasso)", "C3 (z*=u)"], alpha=0.8)
        ax.set(xlabel="epoch", ylabel="share of groups", ylim=(0, 1),
               title=f"{title}: SPR cases per epoch")
        ax.legend(loc="lower left", fontsize=8)
        save(fig, "cases.png")
