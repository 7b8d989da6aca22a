"""``variational``: the variational Bernoulli unit + block pruner (DESIGN §6) as a method.

Each step the network weights follow SGD on ``CE + lam R(theta)`` (R does not depend on them);
``theta`` follows projected SGD with its own step ``theta_lr`` on the estimated
``dE[CE]/dtheta + lam dR/dtheta`` (:meth:`GatedResNet.theta_gradient`,
:meth:`GatedResNet.step_theta`), after ``gate_warmup_epochs`` in which it does not move (the
weights first learn something worth keeping).  ``R`` is the run's cost (:mod:`nn.cost`) in
expectation under the gates.  Selection rounds every theta to 0 or 1 and recomputes the BN
statistics of that deterministic network on the calibration images.

With a stated ``--budget`` the price follows the budget (:mod:`.budget`), and at
``budget_freeze`` of the theta training the gates are fixed to the budget's selection: the rest
of the training trains that network, without gate noise.  (Trained under sampled gates to the
end, the network the selection cuts out was 5 points less accurate than SPR's before the
fine-tuning, at macs=0.5, seed 0: many thetas sit mid-way for epochs, and two fine-tuning
epochs did not make that up.)  With ``rewind_lr`` the learning-rate schedule starts again at
that freeze (:attr:`Training.restart_step <nn.methods.base.Training>`): on the tail of the
first schedule the fixed network barely trained, and the pipeline ended 1.5 points below the
same network trained from scratch (quick budget, macs=0.3).  The restarted rate warms up over
``rewind_warmup_epochs`` (a quarter epoch): the network has just been cut, and hit with the
peak rate at once it ended 0.14 and 0.45 points lower at macs=0.3 and 0.2 (quick budget, seeds
0-4; README, Pareto section).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nn.checks import choice, integer, number, optional_count
from nn.config import ConfigError
from nn.methods.base import Method, Training
from nn.methods.variational.estimators import (DEFAULT_ESTIMATOR, DEFAULT_FLIP_BLOCKS,
                                               DEFAULT_FLIP_SAMPLES, DEFAULT_FLIP_UNITS,
                                               ESTIMATORS)
from nn.methods.variational.budget import BUDGET_LAM, BudgetTracker
from nn.methods.variational.gated import GatedResNet

__all__ = ["Variational", "VariationalOptions", "hooks", "recalibrate_bn", "DEAD_SCORE"]

DEAD_SCORE = 0.01
"""What a dead unit (theta 0) is worth to a budgeted selection: below any gate the training
kept, above nothing, so a budget's slack goes to dead units (cheapest first) rather than
unused."""


@dataclass(frozen=True)
class VariationalOptions:
    """``theta_lr``: projected-SGD step on theta; ``estimator``: :data:`ESTIMATORS`;
    ``gate_warmup_epochs``: epochs (may be fractional) before theta moves; ``theta_init``:
    initial keep probability of every gate; ``precondition``: divide each gate's step by its
    marginal cost at theta = 1 (:meth:`GatedResNet.step_theta` says why); ``flip_units``,
    ``flip_blocks``: live unit and block gates flipped per step by ``flip`` and ``batched``
    (None: all); ``flip_samples``: the ghost batch ``batched`` flips them on;
    ``group``: consecutive units of a family under one gate, sampled, scored and kept together
    (pair it with ``--granularity``; every unit family's size must be a multiple);
    ``budget_lam``: with a stated ``--budget``, ``project`` makes ``lam`` the budget's
    multiplier, step by step (:mod:`.budget`), ``fixed`` keeps ``--lam`` and leaves the budget
    to the selection; ``budget_ramp``: the share of the training after the warm-up over which
    the budget's limit glides from dense to the budget; ``budget_freeze``: with a stated
    budget, the share of the training after the warm-up at which the gates are fixed to the
    budget's selection and the rest of the training trains that network, without gate noise
    (1: never, the selection at the end); ``rewind_lr``: the learning-rate schedule starts
    again at that freeze, so the fixed network trains on a whole schedule compressed to the
    steps left (learning-rate rewinding, :mod:`nn.training.schedule`);
    ``rewind_warmup_epochs``: epochs (may be fractional) of linear learning-rate warm-up from
    that restart."""

    theta_lr: float = 0.005
    estimator: str = DEFAULT_ESTIMATOR
    gate_warmup_epochs: float = 1.0
    theta_init: float = 1.0
    precondition: bool = True
    flip_units: int | None = DEFAULT_FLIP_UNITS
    flip_blocks: int | None = DEFAULT_FLIP_BLOCKS
    group: int = 1
    flip_samples: int = DEFAULT_FLIP_SAMPLES
    budget_lam: str = "project"
    budget_ramp: float = 0.5
    budget_freeze: float = 0.5
    rewind_lr: bool = True
    rewind_warmup_epochs: float = 0.25

    def __post_init__(self):
        number("theta_lr", self.theta_lr, 0, open_lo=True)
        number("gate_warmup_epochs", self.gate_warmup_epochs, 0)
        number("rewind_warmup_epochs", self.rewind_warmup_epochs, 0)
        number("theta_init", self.theta_init, 0, 1, open_lo=True)
        optional_count("flip_units", self.flip_units)
        optional_count("flip_blocks", self.flip_blocks)
        integer("group", self.group, 1)
        integer("flip_samples", self.flip_samples, 1)
        choice("budget_lam", self.budget_lam, BUDGET_LAM)
        number("budget_ramp", self.budget_ramp, 0, 1)
        number("budget_freeze", self.budget_freeze, 0, 1)
        for label in ("precondition", "rewind_lr"):
            if not isinstance(getattr(self, label), bool):
                raise ValueError(f"{label} must be a bool, got {getattr(self, label)!r}")
        choice("estimator", self.estimator, ESTIMATORS)


def hooks(gated: GatedResNet, options: VariationalOptions, steps_per_epoch: int,
          tracker: BudgetTracker | None = None, freeze: tuple | None = None) -> dict:
    """``extra_loss``, ``after_backward`` and ``epoch_metrics`` for :func:`nn.training.train`;
    ``tracker`` sets ``lam`` for every theta step; ``freeze``: ``(n, fix)``, after ``n >= 1``
    theta steps ``fix()`` fixes the gates and theta moves no more.  The step counter lives in
    the gated module (a buffer), so a resumed run keeps its warm-up position (and a run resumed
    after the freeze finds its gates fixed in the checkpoint)."""
    warmup = round(options.gate_warmup_epochs * steps_per_epoch)
    counts = {"died": 0}

    def frozen(m: GatedResNet) -> bool:
        return freeze is not None and int(m.steps) - warmup >= freeze[0]

    def after_backward(m: GatedResNet, ce: torch.Tensor, x=None, y=None) -> None:
        if int(m.steps) >= warmup and not frozen(m):  # no estimate during the warm-up
            g = m.theta_gradient(ce, None if x is None else (x, y))
            price = None  # the death rule's: lam dR/dtheta of --cost
            if tracker is not None:  # lam: the budget's multiplier, p its price (.budget)
                p = tracker.price().to(device=g.device, dtype=g.dtype)
                g = g - m.marginal_costs()  # the cross-entropy part alone
                lam = tracker.multiplier(g, p, options.theta_lr, options.precondition,
                                         int(m.steps) - warmup)
                m.lam_now.fill_(lam)
                price = lam * p
                g = g + price
            counts["died"] += m.step_theta(g, options.theta_lr, options.precondition, price)
        m.steps += 1
        if freeze is not None and int(m.steps) - warmup == freeze[0]:
            freeze[1]()

    def epoch_metrics(m: GatedResNet, epoch: int) -> dict:
        from nn.training.loop import LOG_KEY

        st = m.stats()
        out = {f"gates_{k}": v for k, v in st.items()}
        out["gates_died"] = counts["died"]
        counts["died"] = 0
        out["theta"] = m.theta_by_family()
        out["gates_lam"] = m.lam
        budget = ""
        if tracker is not None:
            out["gates_budget_ratio"] = tracker.ratio()
            budget = f"; lam {m.lam:.3g}, budget cost {out['gates_budget_ratio']:.3f} of it"
        out["gates_frozen"] = frozen(m)
        if out["gates_frozen"]:
            budget += "; gates fixed to the budget's selection"
        out[LOG_KEY] = (f"live MACs {st['live_macs'] / 1e6:.2f}M "
                        f"({st['live_macs'] / m.dense_macs:.3f}), deterministic "
                        f"{st['det_macs'] / 1e6:.2f}M ({st['det_macs'] / m.dense_macs:.3f}); "
                        f"units {st['units_alive']}/{m.n_units * m.group}, blocks "
                        f"{st['blocks_alive']}/{m.n_blocks}, died {out['gates_died']}{budget}")
        return out

    return dict(extra_loss=lambda m: m.penalty(), after_backward=after_backward,
                epoch_metrics=epoch_metrics)


@torch.no_grad()
def recalibrate_bn(module: torch.nn.Module, loader, max_batches: int | None = None) -> int:
    """Recompute every BatchNorm's running statistics as the plain average over ``loader``'s
    batches (``momentum=None``), the module in train mode (for a rounded GatedResNet that is
    the deterministic network).  Training with sampled gates leaves statistics of networks
    with some units off; the rounded network needs its own.  Returns the batches used."""
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    was_training = module.training
    device = next(module.parameters()).device
    n = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        module.train()
        for x, _ in loader:
            module(x.to(device))
            n += 1
            if max_batches is not None and n >= max_batches:
                break
    finally:
        for m, (mom, tr) in zip(bns, saved):
            m.momentum = mom
        module.train(was_training)
    return n


class Variational(Method):
    name = "variational"
    summary = "variational Bernoulli gates on units and blocks, pruning while it trains"
    lam = 1.0
    options = VariationalOptions
    rule = None
    uses_cost = True
    trains_to_budget = True  # lam follows the budget (.budget)

    def check(self, config):
        if config.selection.budget and config.method.structures != ("filter",):
            raise ValueError("a budget for method variational selects among its gated units: "
                             "use --structures filter")
        group, granularity = config.method.options.group, config.selection.granularity
        if config.selection.budget and granularity % group:
            raise ValueError(f"a budget for method variational keeps whole gates of --group "
                             f"{group} units: --granularity must be a multiple of {group}, got "
                             f"{granularity}")
        if config.runtime.amp == "fp16":
            raise ValueError("method variational needs --amp bf16 or off (fp16 loss scaling "
                             "would scale the gate gradients)")

    def training(self, run):
        rt = run.config.runtime
        if run.world > 1:
            raise ConfigError("method variational runs in one process (its gate updates are "
                              "not synchronised across DDP ranks yet); drop torchrun")
        if rt.amp in ("auto", "on") and run.device.type == "cuda" \
                and not torch.cuda.is_bf16_supported():
            raise ConfigError("method variational needs --amp bf16 or off (fp16 loss scaling "
                              "would scale the gate gradients)")
        m, o = run.config.method, run.config.method.options
        latency = None
        if m.cost.latency:
            from nn.budget_latency import latency_cost

            latency = latency_cost(run)
        gated = GatedResNet(run.model, run.input_size, lam=m.lam, cost=m.cost,
                            theta_init=o.theta_init, estimator=o.estimator,
                            flip_units=o.flip_units, flip_blocks=o.flip_blocks,
                            latency=latency, group=o.group,
                            flip_samples=o.flip_samples).to(run.device)
        tracker = freeze = None
        warmup = round(o.gate_warmup_epochs * run.steps_per_epoch)  # as hooks() counts it
        theta_steps = max(0, run.config.optim.epochs * run.steps_per_epoch - warmup)
        if run.config.selection.budget and o.budget_lam == "project":
            from nn.budget import budget_cost

            tracker = BudgetTracker(gated, budget_cost(run), run.config.selection.granularity,
                                    ramp=round(o.budget_ramp * theta_steps))
        if run.config.selection.budget and o.budget_freeze < 1:
            def fix():  # the selection's record is the final one (select() reuses it)
                gated.budget_record = {**self._budgeted(run, gated), "fixed_at_step": int(
                    gated.steps)}

            freeze = (max(1, round(o.budget_freeze * theta_steps)), fix)
        # the first optimizer step on the fixed network: its schedule starts again there
        restart = None if freeze is None or not o.rewind_lr else warmup + freeze[0]
        return Training(gated, hooks(gated, o, run.steps_per_epoch, tracker, freeze), gated,
                        restart_step=restart,
                        restart_warmup=round(o.rewind_warmup_epochs * run.steps_per_epoch))

    def score_name(self, run):
        return "theta"

    def scores(self, run, training):
        """Every unit's keep probability (0 once dead; its gate's, shared by the gate's
        ``group`` units), per pruned family (``training``: the Training or its gated module)."""
        gated = getattr(training, "module", training)
        th = (gated.theta * gated.alive).detach().double().cpu()
        return {f.name: gated.by_name[f.name].units(th) for f in run.pruned}

    def _budgeted(self, run, gated: GatedResNet) -> dict:
        """A stated budget: the gates set to the units and blocks the OR layer's selection
        keeps from the thetas (:func:`nn.budget.select_to_budget`; its widths are multiples of
        the group, so it keeps whole gates); returns its record.  The selection decides alone:
        a dead gate scores :data:`DEAD_SCORE`, so once every live unit it can afford is kept it
        fills what is left of the budget with dead ones (else a budget of 0.1 came out at
        0.074 of the MACs), and a block comes back if its carrier keeps units (it would be
        priced as kept otherwise)."""
        from nn.budget import select_to_budget

        scores = {n: s.clamp_min(DEAD_SCORE) for n, s in self.scores(run, gated).items()}
        masks, sel = select_to_budget(run, self, scores)
        with torch.no_grad():
            keep = torch.cat([masks[g.name].reshape(-1, g.group).all(1) if g.name in masks
                              else torch.ones(g.size, dtype=torch.bool)
                              for g in gated.gates]).to(gated.alive.device)
            gated.alive.copy_(keep)
            for b, units in gated._block_units.items():  # a removed block's units go with it
                if not bool(gated.alive[b]):
                    gated.alive[units] = False
            gated.theta.copy_(gated.alive.to(gated.theta.dtype))
        return sel

    def select(self, run, training):
        """Every theta rounded to 0 or 1 (``GatedResNet.round_``; the rule and the counts
        rounded each way go into the record) -- or, with a stated budget, the units the
        budgeted selection keeps -- then the BN statistics of that deterministic network
        recomputed on the calibration images.  Gates fixed to the budget during the training
        (``budget_freeze``) keep that selection."""
        gated = training.module
        if run.config.selection.budget:
            # fixed at the freeze: that selection stands (selecting again would cost a second
            # depth search, and its network is the one trained since); a run resumed after the
            # freeze lost the record and selects again, which keeps the fixed gates (every live
            # gate scores 1, a dead one DEAD_SCORE)
            sel = gated.budget_record or self._budgeted(run, gated)
            masks = gated.deterministic_masks()
            sel["bn_recalibration_batches"] = recalibrate_bn(gated, run.calibration())
            sel["removed"] = {n: int((~k).sum()) for n, k in masks.items()}
            return masks, sel
        before = gated.stats()
        info = gated.round_()
        masks = gated.deterministic_masks()
        batches = recalibrate_bn(gated, run.calibration())
        m = run.config.method
        sel = {"rule": "variational", **info, "before_rounding": before,
               "structures": len(gated.theta), "bn_recalibration_batches": batches,
               "removed": {n: int((~k).sum()) for n, k in masks.items()}}
        sel["summary"] = (
            f"variational gates (lam {m.lam}, cost {m.cost.formula()}, estimator "
            f"{m.options.estimator}): {before['units_alive']} units and "
            f"{before['blocks_alive']} block gates alive at the end; rounded up "
            f"{info['rounded_up']}, down {info['rounded_down']} ({info['rule_text']})")
        return masks, sel

    def section(self, run, training):
        m, o = run.config.method, run.config.method.options
        return {"penalty": "variational", "lam": m.lam, "cost": m.cost.to_dict(),
                "theta_lr": o.theta_lr, "estimator": o.estimator, "flip_units": o.flip_units,
                "flip_blocks": o.flip_blocks, "flip_samples": o.flip_samples,
                "budget_lam": o.budget_lam if run.config.selection.budget else None,
                "budget_ramp": o.budget_ramp if run.config.selection.budget else None,
                "budget_freeze": o.budget_freeze if run.config.selection.budget else None,
                "rewind_lr": o.rewind_lr if run.config.selection.budget else None,
                "rewind_warmup_epochs": o.rewind_warmup_epochs
                if run.config.selection.budget and o.rewind_lr else None,
                "warmup_epochs": o.gate_warmup_epochs,
                "theta_init": o.theta_init, "group": o.group,
                "R": "macs E[MACs]/MACs0 + params E[params]/params0 + blocks E[blocks]/B "
                     "(exact, multilinear in theta)"}

    def plots(self, report, save, plt, title):
        from nn.methods.variational.plots import gate_plots

        tr = report["history"]["train"]
        if tr and "theta" in tr[0]:
            gate_plots(tr, title, save, plt)
