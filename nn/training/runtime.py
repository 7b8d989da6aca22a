"""Where and how a run executes: processes and ranks, the device, mixed precision, seeds and RNG
state, and the library versions a checkpoint records.

**Distributed.**  When ``WORLD_SIZE > 1`` (``torchrun`` sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR/PORT) :func:`~nn.training.loop.train` initialises the process group (nccl on CUDA,
gloo on CPU) unless the caller already did, wraps the model in ``DistributedDataParallel``
(gradients averaged), and after each epoch broadcasts rank 0's buffers (BN running statistics)
so all ranks hold the same model.  ``extra_loss``/``after_step``/``epoch_metrics`` receive the
unwrapped module on every rank.  Only rank 0 writes files and shows progress; a resumed run reads
the checkpoint on rank 0 and broadcasts it.  A process group that ``train`` created, it destroys
at the end; calling ``train`` again in the same torchrun process (training, then fine-tuning) is
safe: each group keeps its keys under a fresh prefix of torchrun's store (:func:`init_group`).

**RNG state** (:func:`rng_state`): torch CPU and CUDA, numpy's global RNG and Python's
``random``, as tensors, lists and plain values, so a checkpoint holding it loads with
``weights_only=True``.
"""

from __future__ import annotations

import itertools
import logging
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from torch import nn as tnn
from torch.nn.parallel import DistributedDataParallel

from nn.checks import ConfigError

__all__ = ["distributed_env", "unwrap", "resolve_device", "seed_all", "init_group",
           "autocast_dtype", "rng_state", "set_rng_state", "library_versions"]

log = logging.getLogger(__name__)


def distributed_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)``: from the process group when one is initialised,
    else from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); ``(0, 1, 0)`` alone."""
    if dist.is_available() and dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size(),
                int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    env = {k: int(os.environ.get(k, d)) for k, d in
           (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))}
    return env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]


def unwrap(model: tnn.Module) -> tnn.Module:
    """The plain module inside ``torch.compile`` and ``DistributedDataParallel`` wrappers."""
    while True:
        if isinstance(model, (DistributedDataParallel, tnn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"``: ``cuda:local_rank`` when CUDA is present, else CPU; ``"cuda"``:
    ``cuda:local_rank``.  A CUDA device that is not there is a :class:`~nn.checks.ConfigError`
    (a ``ValueError``)."""
    asked = spec
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = f"cuda:{local_rank}"
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {asked!r} needs CUDA, and this machine has no CUDA device "
                          f"(or this torch build has no CUDA): use device 'cpu' or 'auto'")
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA "
                          f"device(s) are available")
    return device


_GROUPS = itertools.count()


def init_group(backend: str) -> None:
    """``init_process_group`` from torchrun's environment, its keys under a fresh prefix.

    A second group in the same process (``train`` called twice: regularised training, then
    fine-tuning) would otherwise meet the first group's keys, still in torchrun's store, and
    hang; every rank calls ``train`` equally often, so the prefixes agree."""
    store, rank, world = next(dist.rendezvous("env://"))
    dist.init_process_group(backend, store=dist.PrefixStore(f"nn.train/{next(_GROUPS)}", store),
                            rank=rank, world_size=world)


def autocast_dtype(amp: str, device: torch.device):
    """The autocast dtype of ``TrainConfig.amp`` on ``device``; None: full precision.

    ``"auto"``/``"on"`` on CUDA: bf16 where supported, else fp16; off the GPU only ``"auto"``
    and ``"off"`` are allowed (both give None; the others: :class:`~nn.checks.ConfigError`)."""
    if device.type != "cuda":
        if amp in ("on", "bf16", "fp16"):
            raise ConfigError(f"amp={amp!r} needs a CUDA device, got {device} (use 'auto' or "
                             f"'off')")
        return None
    if amp == "off":
        return None
    if amp == "fp16" or (amp in ("auto", "on") and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's global RNG and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict:
    """This process's RNG states as tensors and plain values (``weights_only``-safe)."""
    key, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": {"key": key, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss},
            "python": {"version": version, "state": list(words), "gauss": gauss_next}}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only on as many devices)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            log.warning("checkpoint has %d CUDA RNG states for %d devices: not restored",
                        len(state["cuda"]), torch.cuda.device_count())
    n = state["numpy"]
    np.random.set_state((n["key"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def library_versions() -> dict:
    """``{"mipprune": ..., "torch": ...}``: the versions a checkpoint records."""
    from mipprune import __version__

    return {"mipprune": str(__version__), "torch": str(torch.__version__)}
