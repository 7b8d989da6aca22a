"""``l1-filter``: Li et al. 2017, "Pruning filters for efficient ConvNets".  Plain training;
structure ``j`` scores ``sum_i |w_ji|`` over the conv writers of ``j`` and leaves per layer
(a uniform pruning ratio), to a MAC target."""

from __future__ import annotations

from torch import nn as tnn

from nn.methods.base import Method, per_structure, writer_pieces

__all__ = ["L1Filter"]


class L1Filter(Method):
    name = "l1-filter"
    summary = "Li et al. 2017: L1 norm of the filters, per-layer order, to a MAC target"
    score = "L1"
    per_layer = True

    def scores(self, run, training):
        model = training.module
        return {f.name: per_structure(model, writer_pieces(model, f, tnn.Conv2d), f.size,
                                      lambda t: t.abs().sum(1)) for f in run.pruned}
