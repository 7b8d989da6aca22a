"""SGD and its learning-rate schedule: warm-up, then cosine, multistep or constant.

Learning rate of optimizer step ``s = 0, 1, ...`` (:func:`lr_at`), with ``S`` steps an epoch,
``T = epochs S`` steps in all and ``W = round(warmup_epochs S)`` warm-up steps::

    lr(s) = lr * warm(s) * decay(s),   warm(s) = min(1, (s + 1) / W)   (1 when W = 0)
    cosine     decay = (1 + cos(pi p)) / 2,  p = max(0, s - W) / (T - W)   (p < 1 on every step)
    multistep  decay = gamma ** #{milestones m : s >= round(m S)}   (m in epochs; fractions
               of ``epochs`` are turned into epochs first)
    constant   decay = 1

With ``restart_step`` K (``0 < K < T``; learning-rate rewinding, Renda, Frankle and Carbin,
ICLR 2020) the steps from K on replay the schedule after its warm-up, compressed to the steps
left: ``lr(s) = lr * decay(W + (s - K) (T - W) / (T - K))`` for ``s >= K`` -- a cosine starts
again at ``lr``, multistep milestones fall at the same fractions of the steps left.  A
pruner that fixes its network at step K trains that network on a whole schedule.  With
``restart_warmup`` V > 0 that rate is also multiplied by ``min(1, (s - K + 1) / V)``: a warm-up
after the restart, for a network that has just changed under it.
"""

from __future__ import annotations

import math

import torch
from torch import nn as tnn
from torch.optim.lr_scheduler import LambdaLR

from nn.training.config import TrainConfig

__all__ = ["lr_at", "make_optimizer"]


def lr_at(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based); formula in the module docstring."""
    S, lr = steps_per_epoch, config.lr
    T, W = config.epochs * S, round(config.warmup_epochs * S)
    K = config.restart_step
    if K is not None and 0 < K < T and step >= K:  # rewound: the schedule again, compressed
        return lr * _warm(step - K, config.restart_warmup) * _decay(
            config, W + (step - K) * (T - W) / (T - K), S, T, W)
    return lr * _warm(step, W) * _decay(config, step, S, T, W)


def _warm(i: int, n: int) -> float:
    """The linear warm-up factor of the ``i``-th step (0-based) of an ``n``-step warm-up."""
    return min(1.0, (i + 1) / n) if n > 0 else 1.0


def _decay(config: TrainConfig, step: float, S: int, T: int, W: int) -> float:
    """The schedule's decay factor at (possibly fractional) step ``step``."""
    if config.schedule == "cosine":
        p = min(1.0, max(0, step - W) / max(1, T - W))
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if config.schedule == "multistep":
        scale = config.epochs if isinstance(config.milestones[0], float) else 1
        passed = sum(step >= round(m * scale * S) for m in config.milestones) \
            if config.milestones else 0
        return config.gamma ** passed
    return 1.0


def make_optimizer(module: tnn.Module, config: TrainConfig, steps_per_epoch: int):
    """``(SGD, LambdaLR)`` as :func:`~nn.training.loop.train` builds them: the scheduler is
    stepped after every optimizer step, so step ``s`` runs at :func:`lr_at`
    ``(config, s, steps_per_epoch)``."""
    if not isinstance(steps_per_epoch, int) or isinstance(steps_per_epoch, bool) \
            or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be an int >= 1, got {steps_per_epoch!r}")
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                          nesterov=config.nesterov, weight_decay=config.weight_decay)
    sched = LambdaLR(opt, lambda s: lr_at(config, s, steps_per_epoch) / config.lr)
    return opt, sched
