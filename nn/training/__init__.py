"""The training loop and what it is built from.

:func:`train` (:mod:`~nn.training.loop`: one function with named sections) trains a model with
SGD, an optional extra loss, per-epoch evaluation, a metrics log, atomic checkpoints, exact
resume, mixed precision on GPU and data parallelism through ``torchrun``.  Its parts:
:mod:`~nn.training.config` (:class:`TrainConfig`, :class:`TrainResult`),
:mod:`~nn.training.schedule` (the learning-rate formula, :func:`lr_at`, :func:`make_optimizer`),
:mod:`~nn.training.runtime` (ranks, device, precision, seeds and RNG state),
:mod:`~nn.training.checkpoint` (checkpoint and metrics files, the resume rule).
"""

from nn.training.checkpoint import (CHECKPOINT, METRICS, TIMING_KEYS, load_checkpoint,
                                    load_model_state)
from nn.training.config import TrainConfig, TrainResult
from nn.training.loop import NonFiniteError, train
from nn.training.runtime import distributed_env, resolve_device, seed_all, unwrap
from nn.training.schedule import lr_at, make_optimizer

__all__ = ["TrainConfig", "TrainResult", "train", "NonFiniteError", "lr_at", "make_optimizer",
           "distributed_env", "unwrap", "resolve_device", "seed_all", "load_checkpoint",
           "load_model_state", "TIMING_KEYS", "CHECKPOINT", "METRICS"]
