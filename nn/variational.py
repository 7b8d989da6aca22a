"""Training the variational Bernoulli pruner (DESIGN §6) with :func:`nn.train.train`.

    gated = GatedResNet(model, input_size, lam=1.0, beta=0.5, gamma=0.0)
    cfg = VariationalConfig(theta_lr=0.005, warmup_epochs=1)
    train(gated, train_loader, test_loader, TrainConfig(...), **hooks(gated, cfg, len(loader)))
    info = gated.round_()                     # every theta 0 or 1
    small = compress(gated.net, gated.deterministic_masks())

Each step: the network weights follow the usual SGD on ``CE + lam R(theta)`` (R does not
depend on them); ``theta`` follows projected SGD with its own learning rate ``theta_lr`` on the
estimated ``dE[CE]/dtheta + lam dR/dtheta`` (:meth:`GatedResNet.theta_gradient`,
:meth:`GatedResNet.step_theta`), after ``warmup_epochs`` in which it does not move (the
weights first learn something worth keeping).  Per epoch the metrics carry the expected and
deterministic MACs/params/blocks, live units and blocks, and every theta (for the plots).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from nn.gates import (DEFAULT_ESTIMATOR, DEFAULT_FLIP_BLOCKS, DEFAULT_FLIP_UNITS, ESTIMATORS,
                      GatedResNet)

__all__ = ["VariationalConfig", "hooks", "make_gated", "recalibrate_bn"]


@dataclass(frozen=True)
class VariationalConfig:
    """The pruner's settings.  ``lam``, ``beta``, ``gamma``: the three user parameters (DESIGN
    §6); ``theta_lr``: projected-SGD step on theta; ``estimator``: :data:`nn.gates.ESTIMATORS`;
    ``warmup_epochs``: epochs (may be fractional) before theta moves; ``theta_init``: initial
    keep probability of every gate; ``precondition``: divide each gate's step by its marginal
    cost at theta = 1 (:meth:`GatedResNet.step_theta` says why); ``flip_units``,
    ``flip_blocks``: for the ``flip`` estimator, how many live unit and block gates are flipped
    per step (None: all).  The default estimator is ``flip`` with 4 units and 2 blocks a step:
    the one that recovers a planted structure (``tests/test_nn_planted.py``), at 1.9x the
    cost of a plain step on ResNet-20 at theta = 1 (``st``, straight-through, is the free
    alternative: +3.5%; ``benchmarks/gate_overhead.py``)."""

    lam: float = 1.0
    beta: float = 0.5
    gamma: float = 0.0
    theta_lr: float = 0.005
    estimator: str = DEFAULT_ESTIMATOR
    warmup_epochs: float = 1.0
    theta_init: float = 1.0
    precondition: bool = True
    flip_units: int | None = DEFAULT_FLIP_UNITS
    flip_blocks: int | None = DEFAULT_FLIP_BLOCKS

    def __post_init__(self):
        for name, lo, hi in (("lam", 0, math.inf), ("beta", 0, 1), ("gamma", 0, math.inf),
                             ("theta_lr", 0, math.inf), ("warmup_epochs", 0, math.inf),
                             ("theta_init", 0, 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi \
                    or not math.isfinite(v) or (name in ("theta_lr", "theta_init") and v == 0):
                raise ValueError(f"{name} must be a number in [{lo}, {hi}]"
                                 f"{' and > 0' if name in ('theta_lr', 'theta_init') else ''}, "
                                 f"got {v!r}")
        for name in ("flip_units", "flip_blocks"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {v!r}")
        if not isinstance(self.precondition, bool):
            raise ValueError(f"precondition must be a bool, got {self.precondition!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def make_gated(model, input_size, cfg: VariationalConfig) -> GatedResNet:
    """``model`` (a dense ResNet, trained in place) wrapped with gates configured by ``cfg``."""
    return GatedResNet(model, input_size, lam=cfg.lam, beta=cfg.beta, gamma=cfg.gamma,
                       theta_init=cfg.theta_init, estimator=cfg.estimator,
                       flip_units=cfg.flip_units, flip_blocks=cfg.flip_blocks)


def hooks(gated: GatedResNet, cfg: VariationalConfig, steps_per_epoch: int) -> dict:
    """``extra_loss``, ``after_backward`` and ``epoch_metrics`` for :func:`nn.train.train`.
    The step counter lives in the gated module (a buffer), so a resumed run keeps its
    warm-up position."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    counts = {"died": 0}

    def after_backward(m: GatedResNet, ce: torch.Tensor, x=None, y=None) -> None:
        if int(m.steps) >= warmup:  # no estimate during the warm-up (flip costs forward passes)
            g = m.theta_gradient(ce, None if x is None else (x, y))
            counts["died"] += m.step_theta(g, cfg.theta_lr, cfg.precondition)
        m.steps += 1

    def epoch_metrics(m: GatedResNet, epoch: int) -> dict:
        out = {f"gates_{k}": v for k, v in m.stats().items()}
        out["gates_died"] = counts["died"]
        counts["died"] = 0
        out["theta"] = m.theta_by_family()
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
