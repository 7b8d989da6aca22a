"""``tp-groupnorm`` and ``tp-magnitude``: Torch-Pruning (DepGraph, Fang et al., CVPR 2023) as
methods of the pipeline, with the library choosing the channels itself, so that a comparison is
against the library as people use it.

* ``tp-groupnorm``: :class:`torch_pruning.pruner.GroupNormPruner`.  Training calls its
  ``regularize(model)`` after every backward pass (the loop's ``after_backward`` hook): for every
  group, ``grad += reg * gamma_j * w_j`` on the group's slices (output filters, BN scales and
  the input slices that read them), ``gamma_j = 16 ** ((max - r_j) / (max - min))`` with
  ``r_j`` the square root of channel j's group-L2 importance: weak channels are pulled towards
  zero up to 16x harder.
  ``reg`` is ``--lam``.  Its group-L2 importance (``GroupMagnitudeImportance(p=2)``) then ranks
  the channels.
* ``tp-magnitude``: :class:`torch_pruning.pruner.MagnitudePruner` with
  ``MagnitudeImportance(p=1)`` or ``(p=2)`` (option ``importance``); plain training.

**What it may prune.**  The internal filter families only (:mod:`nn.models.resnet.structures`:
``conv1`` of a BasicBlock, ``conv1``/``conv2`` of a Bottleneck, the stem where it feeds a
downsample); every other conv and the classifier go to ``ignored_layers``.  On option-A (zero-pad)
shortcuts Torch-Pruning cannot see through the padding: it merges the residual streams into one
group and pruning that group breaks the network, so the streams stay out of its reach there; on
option-B models the same filters are pruned, like the other methods' default ``--structures``.

**Selection.**  Torch-Pruning's global pruning removes the ``k`` lowest-ranked channels of the
allowed groups for ``pruning_ratio = (k - 1/2) / total`` (exactly ``k``: its count is ``total -
int(total (1 - ratio))``), with ``round_to`` rounding each layer's kept width down to a multiple
(the ``round_to`` option, else ``--granularity``: the grid our budgeted selection uses).
Each trial prunes a deep copy with Torch-Pruning, reads the output channels its groups removed
from every family's conv (``pruner.step(interactive=True)``, before ``group.prune()``) and
costs the result: our compressed model counted (:func:`nn.complexity.count_macs` /
``count_params``), or, for a latency budget, the latency the run's table predicts at the kept
widths (:func:`nn.budget_latency.latency_terms`, the same table and dense reference as our own
budgeted selection; Torch-Pruning removes no blocks, so ``--remove-blocks`` is refused).  The
smallest ``k`` whose cost is at most the target (``--mac-target``, or ``--budget macs=F`` /
``params=F`` / ``latency=F``) is found by a scan in ``total / 32`` steps, then channel by
channel from the last scan point over it: the library leaves a layer whole rather than empty it,
so the count is not monotone in ``k`` (it jumps back up where a layer is kept whole, then falls
again as other layers go), and a measured latency table may be a little out of order too; a
bisection could end in the wrong stretch.  The final masks go through our
:func:`nn.models.compress`; the model Torch-Pruning pruned and ours must give the same logits on
a batch (max abs difference at most :data:`LOGITS_TOL`, recorded), else the run stops.

One concept: the adapter between Torch-Pruning and the pipeline (its pruners, the search of
its pruning ratio, the mapping of its channels onto our families and the logits check).
"""

from __future__ import annotations

import copy
import importlib.metadata
import logging
from dataclasses import dataclass

import torch
from torch import nn as tnn

from nn.checks import ConfigError, choice, integer
from nn.methods.base import Method, Training

__all__ = ["TPGroupNorm", "TPMagnitude", "TPGroupNormOptions", "TPMagnitudeOptions",
           "torch_pruning", "prune_with_tp", "VERSION", "LOGITS_TOL"]

log = logging.getLogger(__name__)

VERSION = "1.6.1"
INSTALL = f"pip install torch-pruning=={VERSION}"
LOGITS_TOL = 1e-4
"""Largest allowed max abs difference of the logits of Torch-Pruning's pruned model and ours."""
IMPORTANCES = {"l1": 1, "l2": 2}
SCAN_STEPS = 32
FILTERS_ONLY = ("internal filters only (each block's inner convs, the stem where it feeds a "
                "downsample); streams and classifier are ignored_layers -- on option-A "
                "(zero-pad) shortcuts Torch-Pruning merges the streams into one group it cannot "
                "prune correctly")


def torch_pruning():
    """The ``torch_pruning`` module, or a one-line :class:`ConfigError` saying how to install
    it (``nn`` itself never needs it)."""
    try:
        import torch_pruning as tp
    except ImportError as e:
        raise ConfigError(f"methods tp-groupnorm and tp-magnitude need Torch-Pruning: {INSTALL} "
                          f"({e})") from None
    return tp


def library_version() -> str:
    try:
        return importlib.metadata.version("torch-pruning")
    except importlib.metadata.PackageNotFoundError:  # imported from a source tree
        return getattr(torch_pruning(), "__version__", "unknown")


def _round_to(v):
    if v is not None:
        integer("round_to", v, 1)
    return v


@dataclass(frozen=True)
class TPGroupNormOptions:
    """``round_to``: each pruned layer keeps a multiple of this many channels (None: any)."""

    round_to: int | None = None

    def __post_init__(self):
        _round_to(self.round_to)


@dataclass(frozen=True)
class TPMagnitudeOptions:
    """``importance``: ``l1`` or ``l2`` group magnitude (``MagnitudeImportance(p=1|2)``, the
    library's default ``l2``); ``round_to`` as :class:`TPGroupNormOptions`."""

    importance: str = "l2"
    round_to: int | None = None

    def __post_init__(self):
        choice("importance", self.importance, tuple(IMPORTANCES))
        _round_to(self.round_to)


def _ignored(model: tnn.Module, families) -> list[tnn.Module]:
    """Every conv and linear layer that is not the conv of a prunable filter family (a family
    of one channel cannot be pruned; its group-norm gamma would be 0/0)."""
    keep = {f.conv for f in families if f.size > 1}
    return [m for n, m in model.named_modules()
            if isinstance(m, (tnn.Conv2d, tnn.Linear)) and n not in keep]


@torch.no_grad()
def _example(model: tnn.Module, input_size) -> torch.Tensor:
    p = next(model.parameters())
    return torch.zeros((1, *input_size), dtype=p.dtype, device=p.device)


def _pruner(tp, cls_name: str, model, input_size, families, importance, **kw):
    """A Torch-Pruning pruner of class ``cls_name`` on ``model`` (global pruning, only the
    filter families' convs as roots), its tracing pass leaving the training flags as they
    were."""
    flags = {m: m.training for m in model.modules()}
    try:
        return getattr(tp.pruner, cls_name)(
            model, _example(model, input_size), importance=importance, global_pruning=True,
            ignored_layers=_ignored(model, families), **kw)
    finally:
        for m, f in flags.items():
            m.training = f


def prune_with_tp(tp, cls_name: str, model, input_size, families, importance,
                  ratio: float, round_to: int | None):
    """Prune a deep copy of ``model`` with Torch-Pruning at global ``ratio``; returns the
    physically pruned copy (``eval()``), our masks of ``families`` (True = keep) holding exactly
    the output channels its groups removed from each family's conv, and the number of channels
    the pruner ranks (its ``initial_total_channels``)."""
    m = copy.deepcopy(model)
    pruner = _pruner(tp, cls_name, m, input_size, families, importance, pruning_ratio=ratio,
                     round_to=round_to)
    names = {mod: n for n, mod in m.named_modules()}
    by_conv = {f.conv: f for f in families}
    masks = {f.name: torch.ones(f.size, dtype=torch.bool) for f in families}
    seen = set()
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            mod = dep.target.module
            if isinstance(mod, (tnn.Conv2d, tnn.Linear)) \
                    and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                f = by_conv.get(names.get(mod))
                if f is None or f.name in seen:
                    raise ConfigError(f"Torch-Pruning pruned the output channels of "
                                      f"{names.get(mod)}{' twice' if f is not None else ''}, "
                                      f"which is not one of the filter families it was given")
                seen.add(f.name)
                masks[f.name][torch.as_tensor(list(idxs), dtype=torch.long)] = False
        group.prune()
    return m.eval(), masks, pruner.initial_total_channels


def _ratio(k: int, total: int) -> float:
    """The global ``pruning_ratio`` under which Torch-Pruning removes exactly ``k`` of
    ``total`` ranked channels (``total - int(total (1 - ratio)) = k``, half a channel from
    either rounding edge)."""
    return 0.0 if k == 0 else (k - 0.5) / total


class _TorchPruning(Method):
    """What both methods share: the filters-only scope, the checks, the selection."""

    pruner_class = ""
    removes_blocks = False

    def importance(self, tp, options):
        raise NotImplementedError

    def importance_name(self, options) -> str:
        raise NotImplementedError

    def score_name(self, run):
        return self.importance_name(run.config.method.options)

    def check(self, config):
        torch_pruning()  # installed, or one line saying how
        if tuple(config.method.structures) != ("filter",):
            raise ConfigError(f"method {self.name} prunes the internal filters only (structures "
                              f"'filter'), got {'+'.join(config.method.structures)}")
        sel = config.selection
        if sel.rule == "bisection":
            raise ConfigError(f"method {self.name} selects by Torch-Pruning's pruning ratio to a "
                              f"cost: --select mac-target (the default) or --budget macs=F / "
                              f"params=F / latency=F, not bisection")
        if sel.remove_blocks:
            raise ConfigError(f"method {self.name} removes no blocks (Torch-Pruning prunes "
                              f"channels): drop --remove-blocks")
        rt = config.method.options.round_to
        if sel.granularity != 1 and rt is not None and rt != sel.granularity:
            raise ConfigError(f"method {self.name}: --granularity {sel.granularity} is "
                              f"Torch-Pruning's round_to, which --round-to sets to {rt}: give "
                              f"one of them")

    @staticmethod
    def round_to(config) -> int | None:
        """Torch-Pruning's ``round_to``: the option, else ``--granularity`` when above 1 (each
        pruned layer keeps a multiple of it, the grid of our budgeted selection)."""
        rt = config.method.options.round_to
        g = config.selection.granularity
        return rt if rt is not None else (g if g > 1 else None)

    def _cost(self, run, kind):
        """``(counter(model, masks) -> cost, dense cost, latency table info or None)`` of
        ``kind``: our MAC or parameter count of the compressed model, or the latency the run's
        table predicts at the kept widths (Torch-Pruning removes no blocks), its dense cost the
        table's measured dense network."""
        from nn.complexity import count_macs, count_params
        from nn.models import compress

        if kind == "macs":
            return (lambda model, masks: count_macs(compress(model, masks), run.input_size),
                    run.dense["macs"], None)
        if kind == "params":
            return (lambda model, masks: count_params(compress(model, masks)),
                    run.dense["params"], None)
        from nn.budget import total
        from nn.budget_latency import latency_terms

        sizes = {f.name: f.size for f in run.pruned}
        terms, constant, info = latency_terms(run, sizes, {})

        def predicted(model, masks):
            return total(terms, sizes, {n: int(m.sum()) for n, m in masks.items()}) + constant

        return predicted, info.get("dense_measured_ms") or total(terms, sizes) + constant, info

    def select(self, run, training):
        from nn.budget import Budget
        from nn.complexity import count_macs
        from nn.models import compress

        tp = torch_pruning()
        cfg, opts = run.config.selection, run.config.method.options
        round_to = self.round_to(run.config)
        fams, model = list(run.pruned), training.module
        rule = cfg.rule if cfg.rule != "auto" else "budget" if cfg.budget else self.rule
        budget = Budget.parse(cfg.budget) if rule == "budget" else None
        kind = budget.kind if budget else "macs"
        counter, dense_cost, table_info = self._cost(run, kind)
        limit = budget.absolute(dense_cost) if budget else cfg.mac_target * dense_cost
        total = sum(f.size for f in fams if f.size > 1)
        imp = self.importance(tp, opts)
        trials = {}

        def trial(k):
            pruned, masks, ranked = prune_with_tp(tp, self.pruner_class, model, run.input_size,
                                                  fams, imp, _ratio(k, total), round_to)
            assert ranked == total, (ranked, total)  # TP ranks exactly our filter channels
            value = counter(model, masks)
            trials[k] = {"candidate": k, "ratio": _ratio(k, total), "value": value,
                         "ok": value <= limit,
                         "removed": int(sum(int((~m).sum()) for m in masks.values()))}
            bar.set_postfix(k=k, **{kind: f"{value / dense_cost:.3f}"})
            bar.update()
            return pruned, masks, value

        step = max(1, -(-total // SCAN_STEPS))
        grid = [k for k in range(step, total, step)] + ([total - 1] if total > 1 else [])
        with run.progress(len(grid) + step, f"selection: Torch-Pruning global ratio to {kind} <= "
                                         f"{limit:.6g}, scan of {total} channels in steps of "
                                         f"{step}, then channel by channel") as bar:
            lo, hi = 0, None
            if trial(0)[2] <= limit:
                hi = 0
            else:
                for k in sorted(set(grid)):  # the whole scan: a layer left whole (fewer
                    if trial(k)[2] <= limit:  # channels removed) is no end, later k prune on
                        hi = k
                        break
                    lo = k
                if hi is None:
                    best = min(trials.values(), key=lambda t: t["value"])
                    raise ConfigError(
                        f"method {self.name}: Torch-Pruning's global pruning cannot bring {kind} "
                        f"to {limit:.6g}; the least it reached is {best['value']:.6g} "
                        f"({best['value'] / dense_cost:.3f} of dense) at pruning ratio "
                        f"{best['ratio']:.4f} over a scan of every {step} of {total} channels "
                        f"(it leaves a layer whole rather than empty it): raise the target")
                # the first k past the last infeasible scan point that meets it, one by one
                # (every k below it since lo is then tried: value_previous is among them)
                hi = next(j for j in range(lo + 1, hi + 1) if trial(j)[2] <= limit)
            tp_model, masks, value = trial(hi)
        ours = compress(model, masks)
        diff = self._logits_difference(run, tp_model, ours)
        if not diff <= LOGITS_TOL:
            raise ConfigError(f"method {self.name}: the model Torch-Pruning pruned and our "
                              f"compressed model differ by {diff:.3g} in the logits (allowed "
                              f"{LOGITS_TOL:g}): its groups do not match our families here")
        removed = {n: int((~m).sum()) for n, m in masks.items()}
        sel = {"rule": rule, "score": self.score_name(run), "library": "torch-pruning",
               "version": library_version(), "pruner": self.pruner_class,
               "importance": self.importance_name(opts), "round_to": round_to,
               "global_pruning": True, "pruning_ratio": _ratio(hi, total), "cut": hi,
               "structures": total, "cost_kind": kind, "limit": limit, "value": value,
               "dense_cost": dense_cost, "value_ratio": value / dense_cost,
               "value_previous": trials[hi - 1]["value"] if hi else None,
               "macs_at_cut": count_macs(ours, run.input_size), "tp_model_macs":
               count_macs(tp_model, run.input_size), "logits_max_abs_diff": diff,
               "logits_tolerance": LOGITS_TOL, "removed": removed,
               "pruned_families": "filter",
               "shortcut": getattr(model, "arch", {}).get("shortcut")}
        if table_info is not None:
            sel["latency_table"] = table_info
        steps = sorted(trials.values(), key=lambda t: t["candidate"])
        if rule == "budget":
            sel.update(budget=str(budget), budget_abs=limit, trials=steps)
        else:
            sel.update(mac_target=cfg.mac_target, target_reached=True, trace=steps)
        sel["summary"] = (
            f"Torch-Pruning {sel['version']} {self.pruner_class}, {sel['importance']} importance, "
            f"global pruning ratio {sel['pruning_ratio']:.4f} (round_to {round_to}): "
            f"removed {sum(removed.values())} of {total} internal filters; {kind} "
            f"{value / dense_cost:.4f} of dense <= "
            + (f"budget {budget}" if budget else f"MAC target {cfg.mac_target}")
            + (f" (one channel fewer pruned: {trials[hi - 1]['value'] / dense_cost:.4f})"
               if hi else "") + f"; logits vs Torch-Pruning's model: max diff {diff:.2g}")
        return masks, sel

    @torch.no_grad()
    def _logits_difference(self, run, a: tnn.Module, b: tnn.Module) -> float:
        """Max abs difference of the logits of ``a`` and ``b`` (``eval()``) on up to 64
        calibration images (seeded noise when the run has no data)."""
        p = next(b.parameters())
        if run.bundle is not None:
            x = next(iter(run.calibration()))[0][:64]
        else:
            g = torch.Generator().manual_seed(run.config.runtime.seed)
            x = torch.randn((8, *run.input_size), generator=g)
        x = x.to(p.device, p.dtype)
        return float((a.eval()(x).float() - b.eval()(x).float()).abs().max())

    def section(self, run, training):
        opts = run.config.method.options
        return {"library": "torch-pruning", "version": library_version(), "pinned": VERSION,
                "pruner": self.pruner_class, "importance": self.importance_name(opts),
                "round_to": self.round_to(run.config), "global_pruning": True,
                "pruned": FILTERS_ONLY,
                "ratio": "the smallest global pruning_ratio whose compressed model meets the "
                         "target (scan, then bisection to one channel): see the selection"}


class TPGroupNorm(_TorchPruning):
    name = "tp-groupnorm"
    summary = ("Torch-Pruning's GroupNormPruner (DepGraph): its group regulariser in training, "
               "group-L2 global pruning to a MAC target; internal filters only (option-A "
               "shortcuts hide the streams from it)")
    lam = 5e-4
    options = TPGroupNormOptions
    pruner_class = "GroupNormPruner"

    def importance(self, tp, options):
        return tp.importance.GroupMagnitudeImportance(p=2)

    def importance_name(self, options):
        return "group L2 (GroupMagnitudeImportance(p=2))"

    def training(self, run):
        from nn.training.runtime import autocast_dtype

        tp = torch_pruning()
        if autocast_dtype(run.config.runtime.amp, run.device) is torch.float16:
            raise ConfigError(f"method {self.name} adds to the gradients, which fp16's loss "
                              f"scaling scales: use --amp bf16 or --amp off")
        pruner = _pruner(tp, self.pruner_class, run.model, run.input_size, run.pruned,
                         self.importance(tp, run.config.method.options),
                         reg=run.config.method.lam)
        calls = [0]  # regularised steps this epoch

        def regularize(module, ce, x, y):
            pruner.regularize(module)
            calls[0] += 1

        def steps(module, epoch):
            n, calls[0] = calls[0], 0
            return {"tp_regularized_steps": n}

        return Training(run.model, dict(after_backward=regularize, epoch_metrics=steps), pruner)

    def section(self, run, training):
        return super().section(run, training) | {
            "reg": run.config.method.lam,
            "regularizer": "after every backward pass, pruner.regularize(model): grad += reg * "
                           "gamma_j * w_j over each group's slices, gamma_j = 16 ** ((max - "
                           "r_j) / (max - min)), r_j = sqrt(group-L2 importance); the run's "
                           "weight decay stays on (Torch-Pruning's CIFAR recipe turns it off)"}


class TPMagnitude(_TorchPruning):
    name = "tp-magnitude"
    summary = ("Torch-Pruning's MagnitudePruner: group L1/L2 magnitude, global pruning to a "
               "MAC target, plain training; internal filters only (as tp-groupnorm)")
    options = TPMagnitudeOptions
    pruner_class = "MagnitudePruner"

    def importance(self, tp, options):
        return tp.importance.MagnitudeImportance(p=IMPORTANCES[options.importance])

    def importance_name(self, options):
        return (f"group {options.importance.upper()} (MagnitudeImportance("
                f"p={IMPORTANCES[options.importance]}))")
