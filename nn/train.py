"""The training loop: SGD with a warm-up + cosine/multistep/constant schedule, an optional extra
loss (the SPR regularizer), per-epoch evaluation, a metrics log, atomic checkpoints, exact resume,
mixed precision on GPU, and data parallelism over GPUs and nodes through ``torchrun``.

    reg = SPRRegularizer(model, SPRConfig(lam=1.0), input_size=(3, 32, 32))
    result = train(model, train_loader, test_loader, TrainConfig(epochs=300, lr=0.1,
                   out_dir="runs/spr"), extra_loss=lambda m: reg(),
                   after_step=lambda m: reg.project_(),
                   epoch_metrics=lambda m, epoch: {"spr": reg.case_stats()["all"]})

**Loaders.**  Any iterable of ``(x, y)`` batches with ``__len__`` (the optimizer steps per epoch).
Optional: ``set_epoch(e)`` (called with the 0-based epoch index before each training epoch, as
``DistributedSampler``), ``state_dict()``/``load_state_dict()`` (saved in every checkpoint and
restored on resume; the state must hold tensors and plain Python values only, so the checkpoint
loads with ``weights_only=True``).  Under DDP each process builds its loaders for its own shard:
``rank, world_size, _ = distributed_env()`` and e.g.
``nn.data.make_loader(..., rank=rank, world_size=world_size)``; every rank must yield the same
number of training batches (checked once, else DDP would hang).  Test loaders may be sharded
(faster) or not (each rank evaluates everything; the ratios are the same).

**Learning rate** of optimizer step ``s = 0, 1, ...`` (:func:`lr_at`), with ``S`` steps an epoch,
``T = epochs S`` steps in all and ``W = round(warmup_epochs S)`` warm-up steps::

    lr(s) = lr * warm(s) * decay(s),   warm(s) = min(1, (s + 1) / W)   (1 when W = 0)
    cosine     decay = (1 + cos(pi p)) / 2,  p = max(0, s - W) / (T - W)   (p < 1 on every step)
    multistep  decay = gamma ** #{milestones m : s >= round(m S)}   (m in epochs; fractions
               of ``epochs`` are turned into epochs first)
    constant   decay = 1

**Metrics** (one JSON object a line in ``out_dir/metrics.jsonl``, and ``TrainResult.history``):
``epoch`` (1-based: epochs completed), ``step``, ``lr`` (of the epoch's last step),
``train_loss`` (mean cross-entropy), ``train_acc``, ``train_extra`` (mean extra loss a step, if
any), ``test_loss``, ``test_acc`` (accuracies are fractions in [0, 1]), the timing fields
:data:`TIMING_KEYS`, and whatever ``epoch_metrics`` returns.  Sums and counts are all-reduced
over ranks, so every rank sees the global numbers.

**Checkpoint** ``out_dir/checkpoint.pt`` (every ``checkpoint_every`` epochs and after the last;
written to a temporary file in the same folder, fsynced, then ``os.replace``d): model,
optimizer, scheduler and GradScaler state dicts, epoch, step, steps per epoch, best accuracy,
history, the config as a dict, library versions, and per rank the RNG states (torch CPU, CUDA,
numpy, ``random``; as tensors and lists) and the loader state.  Everything is tensors and plain
Python values: it loads with ``torch.load(path, weights_only=True)`` (:func:`load_checkpoint`).

**Distributed.**  When ``WORLD_SIZE > 1`` (``torchrun`` sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR/PORT) :func:`train` initialises the process group (nccl on CUDA, gloo on CPU) unless
the caller already did, wraps the model in ``DistributedDataParallel`` (gradients averaged), and
after each epoch broadcasts rank 0's buffers (BN running statistics) so all ranks hold the same
model.  ``extra_loss``/``after_step``/``epoch_metrics`` receive the unwrapped module on every
rank.  Only rank 0 writes files and shows progress; a resumed run reads the checkpoint on rank 0
and broadcasts it.  A process group that ``train`` created, it destroys at the end; calling
``train`` again in the same torchrun process (training, then fine-tuning) is safe: each group
keeps its keys under a fresh prefix of torchrun's store (:func:`_init_group`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import pickle
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn as tnn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

__all__ = ["TrainConfig", "TrainResult", "train", "lr_at", "make_optimizer", "distributed_env",
           "unwrap", "resolve_device", "seed_all", "load_checkpoint", "TIMING_KEYS"]

log = logging.getLogger(__name__)

TIMING_KEYS = ("time", "train_time", "eval_time", "images_per_s")
"""Metrics that depend on the machine, not on the computation (left out when comparing runs)."""

CHECKPOINT, METRICS = "checkpoint.pt", "metrics.jsonl"
_SCHEDULES = ("cosine", "multistep", "constant")
_AMP = ("auto", "on", "off", "bf16", "fp16")
# config fields a resumed run may change: they do not alter the computed trajectory on CPU
_RESUME_FREE = {"device", "amp", "channels_last", "compile", "deterministic", "out_dir",
                "checkpoint_every", "progress", "log_every"}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (see the module docstring for the schedule and the checkpoint).

    ``milestones``: all floats in (0, 1) (fractions of ``epochs``) or all ints in
    [1, epochs] (epoch numbers), increasing.  ``warmup_epochs`` may be fractional.
    ``batch_size`` is informational (the loader decides; recorded with the run).  ``device``:
    ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"`` (under DDP:
    ``cuda:LOCAL_RANK``), ``"cuda:N"``.  ``amp``: ``"auto"`` (on for CUDA: bf16 where
    supported, else fp16 with a GradScaler), ``"on"``, ``"bf16"``, ``"fp16"`` (need CUDA),
    ``"off"``.  ``seed``: RNGs seeded with ``seed + rank`` (the model is built by the caller:
    seed before building it, e.g. :func:`seed_all`).  ``checkpoint_every``: epochs between
    checkpoints (0: none; the last epoch always writes one when ``out_dir`` is set).
    ``log_every``: steps between progress-bar updates (each reads the loss: a GPU sync).
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
        if not _number(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a number > 0, got {self.lr!r}")
        if not _number(self.momentum) or not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not isinstance(self.nesterov, bool) or (self.nesterov and self.momentum == 0):
            raise ValueError(f"nesterov must be a bool and needs momentum > 0, got "
                             f"nesterov={self.nesterov!r} with momentum={self.momentum!r}")
        if not _number(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
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
        if self.batch_size is not None and (not _int(self.batch_size) or self.batch_size < 1):
            raise ValueError(f"batch_size must be None or an int >= 1, got {self.batch_size!r}")
        if not (isinstance(self.device, str)
                and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device)):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', "
                             f"got {self.device!r}")
        if self.amp not in _AMP:
            raise ValueError(f"amp must be one of {_AMP}, got {self.amp!r}")
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


# --------------------------------------------------------------------------- schedule


def lr_at(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based); formula in the module docstring."""
    S, lr = steps_per_epoch, config.lr
    T, W = config.epochs * S, round(config.warmup_epochs * S)
    warm = min(1.0, (step + 1) / W) if W > 0 else 1.0
    if config.schedule == "cosine":
        p = min(1.0, max(0, step - W) / max(1, T - W))
        return lr * warm * 0.5 * (1.0 + math.cos(math.pi * p))
    if config.schedule == "multistep":
        scale = config.epochs if isinstance(config.milestones[0], float) else 1
        passed = sum(step >= round(m * scale * S) for m in config.milestones) \
            if config.milestones else 0
        return lr * warm * config.gamma ** passed
    return lr * warm


def make_optimizer(module: tnn.Module, config: TrainConfig, steps_per_epoch: int):
    """``(SGD, LambdaLR)`` as :func:`train` builds them: the scheduler is stepped after every
    optimizer step, so step ``s`` runs at :func:`lr_at` ``(config, s, steps_per_epoch)``."""
    if not _int(steps_per_epoch) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be an int >= 1, got {steps_per_epoch!r}")
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                          nesterov=config.nesterov, weight_decay=config.weight_decay)
    sched = LambdaLR(opt, lambda s: lr_at(config, s, steps_per_epoch) / config.lr)
    return opt, sched


# --------------------------------------------------------------------------- environment


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
    ``cuda:local_rank``.  A CUDA device that is not there is a ``ValueError``."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = f"cuda:{local_rank}"
    device = torch.device(spec)
    if device.type == "cuda" and not (torch.cuda.is_available()
                                      and device.index < torch.cuda.device_count()):
        raise ValueError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA "
                         f"device(s) are available")
    return device


_GROUPS = itertools.count()


def _init_group(backend: str) -> None:
    """``init_process_group`` from torchrun's environment, its keys under a fresh prefix.

    A second group in the same process (``train`` called twice: regularised training, then
    fine-tuning) would otherwise meet the first group's keys, still in torchrun's store, and
    hang; every rank calls ``train`` equally often, so the prefixes agree."""
    store, rank, world = next(dist.rendezvous("env://"))
    dist.init_process_group(backend, store=dist.PrefixStore(f"nn.train/{next(_GROUPS)}", store),
                            rank=rank, world_size=world)


def _amp_dtype(amp: str, device: torch.device):
    if device.type != "cuda":
        if amp in ("on", "bf16", "fp16"):
            raise ValueError(f"amp={amp!r} needs a CUDA device, got {device} (use 'auto' or "
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


def _rng_state() -> dict:
    """This process's RNG states as tensors and plain values (``weights_only``-safe)."""
    key, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": {"key": key, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss},
            "python": {"version": version, "state": list(words), "gauss": gauss_next}}


def _set_rng_state(state: dict) -> None:
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


def _jsonable(x):
    """Metrics as plain JSON values (tensors and numpy numbers converted)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (torch.Tensor, np.ndarray, np.generic)):
        return _jsonable(x.tolist())
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise ValueError(f"metric value {x!r} of type {type(x).__name__} is not JSON-serialisable")


# --------------------------------------------------------------------------- files


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable) -> None:
    """``write(fh)`` into a temporary file beside ``path``, fsync it, then ``os.replace``:
    a reader sees the old file or the new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _save_checkpoint(obj: dict, path: Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint written by :func:`train`, loaded with ``weights_only=True`` (no code runs)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        why = " ".join(str(e).split())
        why = why[why.find("WeightsUnpickler error"):][:300]
        raise ValueError(f"{path}: cannot be loaded with weights_only=True (a loader state or "
                         f"metric holding objects other than tensors and plain values?): "
                         f"{why}") from None


def _write_metrics(path: Path, history: list[dict]) -> None:
    """Rewrite the metrics log with exactly ``history`` (resume drops later epochs)."""
    text = "".join(json.dumps(r) + "\n" for r in history)
    atomic_write(path, lambda fh: fh.write(text.encode()))


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _check_resumable(saved: dict, config: TrainConfig, steps_per_epoch: int, ckpt: dict):
    now = config.to_dict()
    for key, value in saved.items():
        if key not in _RESUME_FREE and now.get(key) != value:
            raise ValueError(f"cannot resume: checkpoint has {key}={value!r}, config has "
                             f"{key}={now.get(key)!r}")
    if ckpt["steps_per_epoch"] != steps_per_epoch:
        raise ValueError(f"cannot resume: checkpoint has {ckpt['steps_per_epoch']} steps per "
                         f"epoch, the loader {steps_per_epoch}")


# --------------------------------------------------------------------------- the loop


def train(model: tnn.Module, train_loader, test_loader, config: TrainConfig, *,
          extra_loss: Callable[[tnn.Module], torch.Tensor] | None = None,
          after_step: Callable[[tnn.Module], None] | None = None,
          after_backward: Callable[..., None] | None = None,
          epoch_metrics: Callable[[tnn.Module, int], dict] | None = None,
          resume: bool = False, name: str = "train") -> TrainResult:
    """Train ``model`` (in place) with SGD for ``config.epochs`` epochs; see the module docstring.

    ``loss = cross_entropy + extra_loss(module)`` (the extra term is computed outside autocast,
    on the unwrapped module); ``after_backward(module, ce, x, y)`` runs after every backward
    pass, before the optimizer step, with the step's cross-entropy (detached) and batch: e.g.
    gradient estimates for parameters outside the optimizer (:mod:`nn.variational`);
    ``after_step(module)`` runs after every optimizer step;
    ``epoch_metrics(module, epoch)`` (1-based ``epoch``) is merged into the epoch's metrics (it
    runs on every rank; rank 0's values are logged).  ``resume=True`` continues from
    ``out_dir/checkpoint.pt`` when it exists (else starts afresh): weights, optimizer, schedule,
    RNG and loader states, epoch counter; the metrics log is cut back to the checkpoint's epoch.
    ``test_loader`` may be None (no evaluation).
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if unwrap(model) is not model:
        raise ValueError("pass the plain module: train() applies DDP and torch.compile itself")
    if resume and config.out_dir is None:
        raise ValueError("resume=True needs config.out_dir (where the checkpoint lives)")
    steps_per_epoch = len(train_loader)
    if steps_per_epoch < 1:
        raise ValueError("train_loader is empty")
    t_call = time.perf_counter()

    # ---- 1. processes, device, precision ----------------------------------------------------
    rank, world, local_rank = distributed_env()
    device = resolve_device(config.device, local_rank)
    amp_dtype = _amp_dtype(config.amp, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        _init_group("nccl" if device.type == "cuda" else "gloo")
    is_main = rank == 0
    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    ckpt_path = out_dir / CHECKPOINT if out_dir is not None else None
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    cudnn_before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

        def reduce(values: list) -> list[float]:  # global sums over ranks
            t = torch.tensor(values, dtype=torch.float64, device=device)
            if world > 1:
                dist.all_reduce(t)
            return t.tolist()

        if world > 1:
            lens = torch.tensor([steps_per_epoch, -steps_per_epoch], device=device)
            dist.all_reduce(lens, op=dist.ReduceOp.MIN)
            if int(lens[0]) != -int(lens[1]):
                raise ValueError(f"ranks have different numbers of training batches "
                                 f"({int(lens[0])}..{-int(lens[1])}): shard evenly")

        # ---- 2. seeds, model, optimizer, schedule, scaler -----------------------------------
        seed_all(config.seed + rank)
        module = model.to(device)
        if config.channels_last:
            module = module.to(memory_format=torch.channels_last)
        opt, sched = make_optimizer(module, config, steps_per_epoch)
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)

        # ---- 3. resume: rank 0 reads the checkpoint, every rank restores its part ----------
        start_epoch, step, history = 0, 0, []
        best_acc, best_epoch = None, None
        ckpt = None
        if resume:
            if is_main and ckpt_path.exists():
                ckpt = load_checkpoint(ckpt_path)
            if world > 1:
                box = [ckpt]
                dist.broadcast_object_list(box, src=0)
                ckpt = box[0]
        if ckpt is not None:
            _check_resumable(ckpt["config"], config, steps_per_epoch, ckpt)
            module.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            if ckpt["scaler"]:
                scaler.load_state_dict(ckpt["scaler"])
            start_epoch, step, history = ckpt["epoch"], ckpt["step"], list(ckpt["history"])
            best_acc, best_epoch = ckpt["best_acc"], ckpt["best_epoch"]
            if ckpt["world_size"] != world:
                log.warning("resuming %d ranks from a checkpoint of %d: RNG and loader states "
                            "of rank r come from rank r mod %d", world, ckpt["world_size"],
                            ckpt["world_size"])
            mine = rank % len(ckpt["rng"])
            if ckpt["loader"][mine] is not None and hasattr(train_loader, "load_state_dict"):
                train_loader.load_state_dict(ckpt["loader"][mine])
            _set_rng_state(ckpt["rng"][mine])
            if is_main:
                log.info("%s: resumed from %s after epoch %d", name, ckpt_path, start_epoch)
        elif resume and is_main:
            log.info("%s: no checkpoint at %s, starting afresh", name, ckpt_path)
        if is_main and out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            _write_metrics(out_dir / METRICS, history)

        # ---- 4. wrappers: DDP (gradient averaging), torch.compile ---------------------------
        net = module
        if world > 1:
            net = DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None)
        eval_net = module
        if config.compile:
            net = torch.compile(net)
            eval_net = net if world == 1 else torch.compile(module)

        def autocast():
            if amp_dtype is None:
                return contextlib.nullcontext()
            return torch.autocast(device.type, dtype=amp_dtype)

        def to_device(x, y):
            x = x.to(device, non_blocking=True)
            if config.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return x, y.to(device, non_blocking=True)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        for epoch in range(start_epoch, config.epochs):
            # ---- 5. train one epoch ---------------------------------------------------------
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            net.train()
            # ce * n, correct, n, extra, steps (summed on the device: no sync a step)
            sums = torch.zeros(5, dtype=torch.float64, device=device)
            t0 = time.perf_counter()
            bar = tqdm(total=steps_per_epoch, desc=f"{name} {epoch + 1}/{config.epochs}",
                       disable=not (config.progress and is_main), leave=False,
                       dynamic_ncols=True)
            with bar:
                for i, (x, y) in enumerate(train_loader):
                    x, y = to_device(x, y)
                    opt.zero_grad(set_to_none=True)
                    with autocast():
                        logits = net(x)
                        ce = F.cross_entropy(logits.float(), y)
                    loss = ce
                    extra = None
                    if extra_loss is not None:
                        extra = extra_loss(module)
                        loss = loss + extra
                    scaler.scale(loss).backward()
                    if after_backward is not None:
                        after_backward(module, ce.detach(), x, y)
                    scaler.step(opt)
                    scaler.update()
                    sched.step()
                    step += 1
                    if after_step is not None:
                        after_step(module)
                    with torch.no_grad():
                        sums[0] += ce.detach() * y.shape[0]
                        sums[1] += (logits.argmax(1) == y).sum()
                        sums[2] += y.shape[0]
                        if extra is not None:
                            sums[3] += extra.detach()
                        sums[4] += 1
                    if not bar.disable and ((i + 1) % config.log_every == 0
                                            or i + 1 == steps_per_epoch):
                        bar.set_postfix(loss=f"{loss.item():.4f}",
                                        lr=f"{lr_at(config, step - 1, steps_per_epoch):.3g}")
                    bar.update()
            sync()
            train_time = time.perf_counter() - t0
            if world > 1:
                dist.all_reduce(sums)
            ce_sum, train_correct, train_seen, extra_sum, steps_done = sums.tolist()
            if train_seen == 0:
                raise ValueError(f"train_loader yielded no samples in epoch {epoch + 1}")
            record = {"epoch": epoch + 1, "step": step,
                      "lr": lr_at(config, step - 1, steps_per_epoch),
                      "train_loss": ce_sum / train_seen, "train_acc": train_correct / train_seen}
            if extra_loss is not None:
                record["train_extra"] = extra_sum / steps_done

            # ---- 6. evaluate (rank 0's buffers everywhere first) ----------------------------
            if world > 1:
                for b in module.buffers():
                    dist.broadcast(b, src=0)
            t1 = time.perf_counter()
            if test_loader is not None:
                eval_net.eval()
                ev = torch.zeros(3, dtype=torch.float64, device=device)  # ce sum, correct, n
                with torch.no_grad(), autocast():
                    for x, y in test_loader:
                        x, y = to_device(x, y)
                        logits = eval_net(x).float()
                        ev[0] += F.cross_entropy(logits, y, reduction="sum")
                        ev[1] += (logits.argmax(1) == y).sum()
                        ev[2] += y.shape[0]
                net.train()
                loss_sum, correct, seen = reduce(ev.tolist())
                if seen == 0:
                    raise ValueError("test_loader yielded no samples")
                record["test_loss"], record["test_acc"] = loss_sum / seen, correct / seen
                if best_acc is None or record["test_acc"] > best_acc:
                    best_acc, best_epoch = record["test_acc"], epoch + 1
            sync()
            eval_time = time.perf_counter() - t1

            # ---- 7. log: metrics line, progress summary -------------------------------------
            if epoch_metrics is not None:
                more = _jsonable(epoch_metrics(module, epoch + 1))
                if not isinstance(more, dict):
                    raise ValueError(f"epoch_metrics must return a dict, got {type(more)}")
                clash = sorted(set(more) & (set(record) | set(TIMING_KEYS)))
                if clash:
                    raise ValueError(f"epoch_metrics returned reserved key(s) {clash}")
                record.update(more)
            record.update(time=train_time + eval_time, train_time=train_time,
                          eval_time=eval_time, images_per_s=train_seen / train_time
                          if train_time > 0 else float("nan"))
            history.append(record)
            if is_main:
                if out_dir is not None:
                    _append_metrics(out_dir / METRICS, record)
                summary = (f"{name} epoch {epoch + 1}/{config.epochs}: "
                           f"loss {record['train_loss']:.4f} acc {record['train_acc']:.4f}"
                           + (f" | test loss {record['test_loss']:.4f} acc "
                              f"{record['test_acc']:.4f}" if "test_acc" in record else "")
                           + f" | lr {record['lr']:.4g} | {record['images_per_s']:.0f} img/s")
                if config.progress:
                    tqdm.write(summary)
                else:
                    log.info(summary)

            # ---- 8. checkpoint (all ranks hand over RNG/loader states; rank 0 writes) -------
            last = epoch + 1 == config.epochs
            if out_dir is not None and (last or (config.checkpoint_every
                                                 and (epoch + 1) % config.checkpoint_every == 0)):
                mine = {"rng": _rng_state(),
                        "loader": train_loader.state_dict()
                        if hasattr(train_loader, "state_dict") else None}
                every = [mine]
                if world > 1:
                    every = [None] * world
                    dist.all_gather_object(every, mine)
                if is_main:
                    _save_checkpoint({
                        "format": 1, "epoch": epoch + 1, "step": step,
                        "steps_per_epoch": steps_per_epoch, "world_size": world,
                        "model": module.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                        "best_acc": best_acc, "best_epoch": best_epoch, "history": history,
                        "config": config.to_dict(), "versions": _versions(),
                        "rng": [e["rng"] for e in every], "loader": [e["loader"] for e in every],
                    }, ckpt_path)

        # ---- 9. finish ----------------------------------------------------------------------
        if world > 1:
            dist.barrier()
        final = history[-1].get("test_acc") if history else None
        written = ckpt_path is not None and ckpt_path.exists()
        return TrainResult(final_acc=final, best_acc=best_acc, best_epoch=best_epoch,
                           history=history, seconds=time.perf_counter() - t_call,
                           checkpoint=str(ckpt_path) if written else None)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_before
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _versions() -> dict:
    from mipprune import __version__

    return {"mipprune": str(__version__), "torch": str(torch.__version__)}
