"""``random``: plain training, then structures removed in a random order (seeded by the run's
seed) to a MAC target -- the floor any pruning criterion has to beat."""

from __future__ import annotations

import torch

from nn.methods.base import Method

__all__ = ["RandomFilters"]


class RandomFilters(Method):
    name = "random"
    summary = "random order of the structures (seeded), to a MAC target: the floor"
    score = "random"

    def scores(self, run, training):
        g = torch.Generator().manual_seed(run.config.runtime.seed)
        return {f.name: torch.rand(f.size, generator=g, dtype=torch.float64)
                for f in run.pruned}
