"""Measurements of a model on data: top-1 accuracy (sharded over DDP ranks), and the fixed
unaugmented training subset that selections and BN recalibration evaluate on."""

from __future__ import annotations

import torch
import torch.distributed as dist

from nn.data import StreamLoader, TensorLoader

__all__ = ["evaluate", "subset_loader"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, world: int = 1) -> float:
    """Top-1 accuracy in eval mode, fp32, on the model's device (counts all-reduced over ranks
    when ``world > 1``: pass each rank's shard).  The training flag is restored."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    counts = torch.zeros(2, dtype=torch.float64, device=dev)
    for x, y in loader:
        x, y = x.to(dev), y.to(dev)
        counts += torch.stack([(model(x).argmax(1) == y).sum().double(),
                               torch.tensor(float(len(y)), dtype=torch.float64, device=dev)])
    if world > 1:
        dist.all_reduce(counts)
    model.train(was)
    if counts[1] == 0:
        raise ValueError("evaluation loader yielded no samples")
    return float(counts[0] / counts[1])


def subset_loader(bundle, n: int, batch: int, rank: int, world: int):
    """``n`` evenly spaced training images (indices ``i N // n``: seed-free, the same on every
    call), unaugmented, in file order; sharded over ranks, every image once."""
    N = bundle.num_train
    idx = torch.arange(min(n, N)) * N // min(n, N)
    common = dict(shuffle=False, mean=bundle.mean, std=bundle.std, rank=rank, world_size=world)
    if bundle.streaming:
        sub = torch.utils.data.Subset(bundle.train_set, idx.tolist())
        return StreamLoader(sub, bundle.transforms[1], batch, **common)
    idx = idx.to(bundle.train_x.device)
    return TensorLoader(bundle.train_x[idx], bundle.train_y[idx], batch, **common)
