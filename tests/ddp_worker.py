"""Helper of ``tests/test_nn_train.py``, started as ``torchrun --standalone --nproc_per_node=2
tests/ddp_worker.py ROOT`` (CPU, gloo).

Each rank trains, through :func:`nn.training.train` (which initialises and destroys the process
group from torchrun's environment itself), (1) a BN-free net and (2) a tiny ResNet-20 with BN, on
its half of every global batch (:func:`test_nn_train.ddp_case`).  ``train`` is given
``ROOT/<kind>/rank<r>`` as ``out_dir``, so a file written by rank 1 would show up there.  The
worker itself saves each rank's final state and history to ``ROOT/<kind>-rank<r>.pt``.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from nn.training import distributed_env, train
from test_nn_train import ddp_case


def main(root: Path) -> None:
    torch.set_num_threads(1)
    rank, world, _ = distributed_env()
    assert world == 2, world
    for kind in ("plain", "resnet"):
        model, (train_loader, test_loader), config, kw = ddp_case(
            kind, rank, world, root / kind / f"rank{rank}")
        res = train(model, train_loader, test_loader, config, name=f"{kind}{rank}", **kw)
        torch.save({"state": model.state_dict(), "history": res.history,
                    "checkpoint": res.checkpoint, "group_alive": dist.is_initialized()},
                   root / f"{kind}-rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
