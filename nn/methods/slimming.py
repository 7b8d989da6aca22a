"""``slimming``: Liu et al. 2017, "Learning efficient convolutional networks through network
slimming".  Training adds ``lam * sum |γ|`` over the BN writers of the pruned structures;
structure ``j`` scores ``||γ_j||_2`` (``|γ_j|`` for a filter), one global threshold, to a MAC
target."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn as tnn

from nn.methods.base import Method, Training, per_structure, writer_pieces

__all__ = ["Slimming", "slimming_penalty"]


def slimming_penalty(model: tnn.Module, families: Sequence, lam: float) -> Callable:
    """Network slimming's training term ``lam * sum |γ|`` over the BN writers of ``families``
    (a function of the module, for ``train(extra_loss=...)``)."""
    names = sorted({p.param for f in families for p in writer_pieces(model, f, tnn.BatchNorm2d)})
    if not names:
        raise ValueError("no BatchNorm writers among the pruned structures")

    def term(module: tnn.Module) -> torch.Tensor:
        params = dict(module.named_parameters())
        return lam * sum(params[n].abs().sum() for n in names)

    return term


class Slimming(Method):
    name = "slimming"
    summary = "Liu et al. 2017: L1 on the BN scales during training, global threshold"
    lam = 1e-4
    score = "|gamma|"

    def training(self, run):
        term = slimming_penalty(run.model, run.pruned, run.config.method.lam)
        return Training(run.model, dict(
            extra_loss=term, epoch_metrics=lambda m, e: {"penalty": float(term(m).detach())}))

    def scores(self, run, training):
        model = training.module
        return {f.name: per_structure(model, writer_pieces(model, f, tnn.BatchNorm2d), f.size,
                                      lambda t: t.pow(2).sum(1)).sqrt() for f in run.pruned}

    def section(self, run, training):
        return {"penalty": "slimming", "lambda": run.config.method.lam,
                "term": "lambda * sum |gamma| over the BN writers of the pruned structures"}
