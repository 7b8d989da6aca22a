"""What a run leaves in ``out_dir``: the checkpoint and the metrics log, and when a checkpoint
may be resumed.

**Checkpoint** ``out_dir/checkpoint.pt`` (every ``checkpoint_every`` epochs and after the last;
written atomically by :func:`nn.io.atomic_write`: a temporary file in the same folder, fsynced,
then ``os.replace``d): model, optimizer, scheduler and GradScaler state dicts, epoch, step, steps
per epoch, best accuracy, history, the config as a dict, library versions, and per rank the RNG
states (torch CPU, CUDA, numpy, ``random``; as tensors and lists,
:func:`~nn.training.runtime.rng_state`) and the loader state.  Everything is tensors and plain
Python values: it loads with ``torch.load(path, weights_only=True)`` (:func:`load_checkpoint`).

**Metrics** (one JSON object a line in ``out_dir/metrics.jsonl``, and ``TrainResult.history``):
``epoch`` (1-based: epochs completed), ``step``, ``lr`` (of the epoch's last step),
``train_loss`` (mean cross-entropy), ``train_acc``, ``train_extra`` (mean extra loss a step, if
any), ``test_loss``, ``test_acc`` (accuracies are fractions in [0, 1]), the timing fields
:data:`TIMING_KEYS`, and whatever ``epoch_metrics`` returns.  Sums and counts are all-reduced
over ranks, so every rank sees the global numbers.

**Resuming** (:func:`check_resumable`) needs the same config except the fields in
:data:`RESUME_FREE` (they do not alter the computed trajectory on CPU) and the same number of
steps per epoch.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from nn.io import atomic_write
from nn.training.config import TrainConfig

__all__ = ["CHECKPOINT", "METRICS", "TIMING_KEYS", "RESUME_FREE", "save_checkpoint",
           "load_checkpoint", "write_metrics", "append_metrics", "jsonable", "check_resumable"]

CHECKPOINT, METRICS = "checkpoint.pt", "metrics.jsonl"

TIMING_KEYS = ("time", "train_time", "eval_time", "images_per_s")
"""Metrics that depend on the machine, not on the computation (left out when comparing runs)."""

RESUME_FREE = frozenset({"device", "amp", "channels_last", "compile", "deterministic", "out_dir",
                         "checkpoint_every", "progress", "log_every"})
"""Config fields a resumed run may change: they do not alter the computed trajectory on CPU."""


def save_checkpoint(obj: dict, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (the old file or the new one, never a part)."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint written by :func:`~nn.training.loop.train`, loaded with
    ``weights_only=True`` (no code runs)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        why = " ".join(str(e).split())
        why = why[why.find("WeightsUnpickler error"):][:300]
        raise ValueError(f"{path}: cannot be loaded with weights_only=True (a loader state or "
                         f"metric holding objects other than tensors and plain values?): "
                         f"{why}") from None


def jsonable(x):
    """Metrics as plain JSON values (tensors and numpy numbers converted)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (torch.Tensor, np.ndarray, np.generic)):
        return jsonable(x.tolist())
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise ValueError(f"metric value {x!r} of type {type(x).__name__} is not JSON-serialisable")


def write_metrics(path: Path, history: list[dict]) -> None:
    """Rewrite the metrics log with exactly ``history`` (resume drops later epochs)."""
    text = "".join(json.dumps(r) + "\n" for r in history)
    atomic_write(path, lambda fh: fh.write(text.encode()))


def append_metrics(path: Path, record: dict) -> None:
    """Append one epoch's line to the metrics log and fsync it."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def check_resumable(saved: dict, config: TrainConfig, steps_per_epoch: int, ckpt: dict):
    """``ValueError`` unless checkpoint ``ckpt`` (whose config dict is ``saved``) continues the
    run that ``config`` and ``steps_per_epoch`` describe."""
    now = config.to_dict()
    for key, value in saved.items():
        if key not in RESUME_FREE and now.get(key) != value:
            raise ValueError(f"cannot resume: checkpoint has {key}={value!r}, config has "
                             f"{key}={now.get(key)!r}")
    if ckpt["steps_per_epoch"] != steps_per_epoch:
        raise ValueError(f"cannot resume: checkpoint has {ckpt['steps_per_epoch']} steps per "
                         f"epoch, the loader {steps_per_epoch}")
