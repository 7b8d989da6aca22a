"""What a run leaves in ``out_dir``: the checkpoint and the metrics log, and when a checkpoint
may be resumed.

**Checkpoint** ``out_dir/checkpoint.pt`` (every ``checkpoint_every`` epochs and after the last;
written atomically by :func:`nn.io.save_torch`: a temporary file in the same folder, fsynced,
then ``os.replace``d): model, optimizer, scheduler and GradScaler state dicts, epoch, step, steps
per epoch, best accuracy, history, the config as a dict, library versions, and per rank the RNG
states (torch CPU, CUDA, numpy, ``random``; as tensors and lists,
:func:`~nn.training.runtime.rng_state`) and the loader state.  Everything is tensors and plain
Python values: it loads with ``torch.load(path, weights_only=True)``.  :func:`load_checkpoint`
also checks every record's CRC-32 (:func:`nn.io.read_torch`), the keys (:data:`KEYS`) and that
the weights and the optimizer state are finite: a damaged checkpoint, or one of a diverged
training, is refused with one :class:`~nn.io.RunFileError`, never resumed.

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

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from nn.io import RunFileError, atomic_write, dumps, read_torch, save_torch
from nn.training.config import TrainConfig

__all__ = ["CHECKPOINT", "METRICS", "TIMING_KEYS", "RESUME_FREE", "KEYS", "save_checkpoint",
           "load_checkpoint", "load_model_state", "write_metrics", "append_metrics", "jsonable",
           "check_resumable"]

CHECKPOINT, METRICS = "checkpoint.pt", "metrics.jsonl"

KEYS = ("epoch", "step", "steps_per_epoch", "world_size", "model", "optimizer", "scheduler",
        "scaler", "best_acc", "best_epoch", "history", "config", "rng", "loader")
"""What a resume reads from a checkpoint (it also holds ``format`` and ``versions``)."""
_FIX = "delete it to train from the beginning"

TIMING_KEYS = ("time", "train_time", "eval_time", "images_per_s")
"""Metrics that depend on the machine, not on the computation (left out when comparing runs)."""

RESUME_FREE = frozenset({"device", "amp", "channels_last", "compile", "deterministic", "out_dir",
                         "checkpoint_every", "progress", "log_every"})
"""Config fields a resumed run may change: they do not alter the computed trajectory on CPU."""


def save_checkpoint(obj: dict, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (the old file or the new one, never a part),
    every record with its CRC-32 (:func:`nn.io.save_torch`)."""
    save_torch(path, obj)


def _nonfinite(tree, name: str) -> str | None:
    """The name of the first floating tensor in ``tree`` (nested dicts and lists) holding a
    NaN or an infinity, else None."""
    if isinstance(tree, torch.Tensor):
        return name if tree.is_floating_point() and not torch.isfinite(tree).all() else None
    items = tree.items() if isinstance(tree, dict) else \
        enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return next((bad for k, v in items if (bad := _nonfinite(v, f"{name}.{k}"))), None)


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint written by :func:`~nn.training.loop.train`: CRC-checked, loaded with
    ``weights_only=True`` (no code runs), holding :data:`KEYS`, with finite weights and
    optimizer state; :class:`~nn.io.RunFileError` (a ``ValueError``) otherwise."""
    ckpt = read_torch(path, map_location)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise RunFileError(path, f"holds a {type(ckpt).__name__} without a model state dict, "
                                 f"not a training checkpoint", _FIX)
    missing = [k for k in KEYS if k not in ckpt]
    if missing:
        raise RunFileError(path, f"lacks the key(s) {', '.join(missing)}: not a training "
                                 f"checkpoint", _FIX)
    bad = _nonfinite(ckpt["model"], "model") or _nonfinite(ckpt["optimizer"], "optimizer")
    if bad:
        raise RunFileError(path, f"holds NaN or infinite values ({bad}): the training "
                                 f"diverged, or the file was damaged", _FIX)
    return ckpt


def load_model_state(module: torch.nn.Module, ckpt: dict, path) -> None:
    """``module.load_state_dict(ckpt["model"])``, or :class:`~nn.io.RunFileError` naming
    checkpoint ``path`` when the weights do not fit ``module`` (another model's file)."""
    try:
        module.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        why = " ".join(str(e).split())[:300]
        raise RunFileError(path, f"its weights do not fit the model ({why})", _FIX) from None


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
    text = "".join(dumps(r) + "\n" for r in history)
    atomic_write(path, lambda fh: fh.write(text.encode()))


def append_metrics(path: Path, record: dict) -> None:
    """Append one epoch's line to the metrics log and fsync it (an ``OSError`` names
    ``path``)."""
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:  # e.g. ENOSPC from write() carries no file name
        if e.errno is not None and e.filename is None:
            e.filename = str(path)
        raise


def check_resumable(saved: dict, config: TrainConfig, steps_per_epoch: int, ckpt: dict):
    """``ValueError`` unless checkpoint ``ckpt`` (whose config dict is ``saved``) continues the
    run that ``config`` and ``steps_per_epoch`` describe."""
    now = config.to_dict()
    # a field newer than the checkpoint: it was written with the field's default
    default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for key in [*saved, *(k for k in now if k not in saved)]:
        value = saved.get(key, default.get(key))
        if key not in RESUME_FREE and now.get(key) != value:
            raise ValueError(f"cannot resume: checkpoint has {key}={value!r}, config has "
                             f"{key}={now.get(key)!r}")
    if ckpt["steps_per_epoch"] != steps_per_epoch:
        raise ValueError(f"cannot resume: checkpoint has {ckpt['steps_per_epoch']} steps per "
                         f"epoch, the loader {steps_per_epoch}")
