"""``bigm``: the ablation of SPR -- the big-M relaxation's penalty ``a ||w||^2 + b
min(||w||_inf / M, 1)`` in its place, everything else as :mod:`nn.methods.spr`."""

from __future__ import annotations

from nn.methods.spr import SPR

__all__ = ["BigM"]


class BigM(SPR):
    name = "bigm"
    summary = "ablation: the big-M relaxation's penalty instead of SPR"
    penalty = "bigm"
