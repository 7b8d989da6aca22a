"""``dense``: no pruning -- the reference every method is measured against."""

from __future__ import annotations

import torch

from nn.methods.base import Method

__all__ = ["Dense"]


class Dense(Method):
    name = "dense"
    summary = "no pruning: plain training, the reference"
    rule = None
    finetunes = False

    def check(self, config):
        if config.selection.budget:
            raise ValueError("method dense prunes nothing: drop --budget")

    def select(self, run, training):
        masks = {f.name: torch.ones(f.size, dtype=torch.bool) for f in run.pruned}
        return masks, {"rule": "none", "summary": "none (dense)"}
