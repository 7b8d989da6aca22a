"""What a training run is asked to do (:class:`TrainConfig`, validated at construction) and what
it returns (:class:`TrainResult`)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

from nn.checks import FLOAT32_MAX

__all__ = ["TrainConfig", "TrainResult"]

_SCHEDULES = ("cosine", "multistep", "constant")
_AMP = ("auto", "on", "off", "bf16", "fp16")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (the schedule: :mod:`nn.training.schedule`; the checkpoint:
    :mod:`nn.training.checkpoint`).

    ``milestones``: all floats in (0, 1) (fractions of ``epochs``) or all ints in
    [1, epochs] (epoch numbers), increasing.  ``warmup_epochs`` may be fractional.
    ``batch_size`` is informational (the loader decides; recorded with the run).  ``device``:
    ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"`` (under DDP:
    ``cuda:LOCAL_RANK``), ``"cuda:N"``.  ``amp``: ``"auto"`` (on for CUDA: bf16 where
    supported, else fp16 with a GradScaler), ``"on"``, ``"bf16"``, ``"fp16"`` (need CUDA),
    ``"off"``.  ``seed``: RNGs seeded with ``seed + rank`` (the model is built by the caller:
    seed before building it, e.g. :func:`~nn.training.runtime.seed_all`).
    ``restart_step``: the optimizer step from which the schedule starts again, compressed to
    the steps left (learning-rate rewinding, :mod:`nn.training.schedule`; None: never);
    ``restart_warmup``: steps of linear warm-up from it (0: none).
    ``checkpoint_every``: epochs between checkpoints (0: none; the last epoch always writes one
    when ``out_dir`` is set).  ``log_every``: steps between progress-bar updates (each reads the
    loss: a GPU sync).
    """

    epochs: int
    lr: float
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple = (0.5, 0.75)
    gamma: float = 0.1
    warmup_epochs: float = 0
    restart_step: int | None = None
    restart_warmup: int = 0
    batch_size: int | None = None
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False
    seed: int = 0
    out_dir: str | None = None
    checkpoint_every: int = 1
    progress: bool = True
    log_every: int = 50

    def __post_init__(self):
        if not _int(self.epochs) or self.epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {self.epochs!r}")
        if not _number(self.lr) or not 0 < self.lr <= FLOAT32_MAX:
            raise ValueError(f"lr must be a number > 0 and <= {FLOAT32_MAX:.6g} (the largest "
                             f"float32), got {self.lr!r}")
        if not _number(self.momentum) or not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not isinstance(self.nesterov, bool) or (self.nesterov and self.momentum == 0):
            raise ValueError(f"nesterov must be a bool and needs momentum > 0, got "
                             f"nesterov={self.nesterov!r} with momentum={self.momentum!r}")
        if not _number(self.weight_decay) or not 0 <= self.weight_decay <= FLOAT32_MAX:
            raise ValueError(f"weight_decay must be a number >= 0 and <= {FLOAT32_MAX:.6g} (the "
                             f"largest float32), got {self.weight_decay!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        ms = tuple(self.milestones) if isinstance(self.milestones, (list, tuple)) else None
        fractions = ms is not None and all(
            isinstance(m, float) and 0 < m < 1 for m in ms)
        epochs = ms is not None and all(_int(m) and 1 <= m <= self.epochs for m in ms)
        if ms is None or not (fractions or epochs) or list(ms) != sorted(set(ms)):
            raise ValueError(f"milestones must be increasing floats in (0, 1) (fractions of "
                             f"epochs) or increasing ints in [1, {self.epochs}], "
                             f"got {self.milestones!r}")
        object.__setattr__(self, "milestones", ms)
        if not _number(self.gamma) or self.gamma <= 0:
            raise ValueError(f"gamma must be a number > 0, got {self.gamma!r}")
        if not _number(self.warmup_epochs) or not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}), "
                             f"got {self.warmup_epochs!r}")
        if self.restart_step is not None and (not _int(self.restart_step)
                                              or self.restart_step < 1):
            raise ValueError(f"restart_step must be None or an int >= 1, "
                             f"got {self.restart_step!r}")
        if not _int(self.restart_warmup) or self.restart_warmup < 0:
            raise ValueError(f"restart_warmup must be an int >= 0, got {self.restart_warmup!r}")
        if self.batch_size is not None and (not _int(self.batch_size) or self.batch_size < 1):
            raise ValueError(f"batch_size must be None or an int >= 1, got {self.batch_size!r}")
        if not (isinstance(self.device, str)
                and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device)):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', "
                             f"got {self.device!r}")
        if self.amp not in _AMP:
            raise ValueError(f"amp must be one of {_AMP}, got {self.amp!r}")
        if self.device == "cpu" and self.amp in ("on", "bf16", "fp16"):
            raise ValueError(f"amp={self.amp!r} needs a CUDA device, got device 'cpu' (use "
                             f"'auto' or 'off')")
        for label in ("channels_last", "compile", "deterministic", "progress"):
            if not isinstance(getattr(self, label), bool):
                raise ValueError(f"{label} must be a bool, got {getattr(self, label)!r}")
        if not _int(self.seed) or not 0 <= self.seed < 2**31:
            raise ValueError(f"seed must be an int in [0, 2**31), got {self.seed!r}")
        if self.out_dir is not None:
            if not isinstance(self.out_dir, (str, os.PathLike)) or not os.fspath(self.out_dir):
                raise ValueError(f"out_dir must be a path or None, got {self.out_dir!r}")
            object.__setattr__(self, "out_dir", os.fspath(self.out_dir))
        if not _int(self.checkpoint_every) or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an int >= 0, "
                             f"got {self.checkpoint_every!r}")
        if not _int(self.log_every) or self.log_every < 1:
            raise ValueError(f"log_every must be an int >= 1, got {self.log_every!r}")

    def to_dict(self) -> dict:
        """Plain values only (``milestones`` as a list): JSON- and ``weights_only``-safe."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d


@dataclass
class TrainResult:
    """``final_acc``/``best_acc`` (test top-1 in [0, 1]; None without a test loader),
    ``best_epoch`` (1-based), ``history`` (one metrics dict an epoch, resumed epochs included),
    ``seconds`` (wall time of this call), ``checkpoint`` (path, or None)."""

    final_acc: float | None
    best_acc: float | None
    best_epoch: int | None
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    checkpoint: str | None = None
