"""The training loop: SGD with a warm-up + cosine/multistep/constant schedule, an optional extra
loss (the SPR regularizer), per-epoch evaluation, a metrics log, atomic checkpoints, exact resume,
mixed precision on GPU, and data parallelism over GPUs and nodes through ``torchrun``.

    reg = SPRRegularizer(model, SPRConfig(lam=1.0), input_size=(3, 32, 32))
    result = train(model, train_loader, test_loader, TrainConfig(epochs=300, lr=0.1,
                   out_dir="runs/spr"), extra_grad=lambda m, scale: reg.add_grad_(scale),
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

The rest of the contract lives with the code it describes: the learning-rate formula in
:mod:`nn.training.schedule`, the checkpoint's contents, the metrics and the resume rule in
:mod:`nn.training.checkpoint`, the distributed behaviour in :mod:`nn.training.runtime`.

One concept: one training loop; its pieces (schedule, checkpoints, runtime) are modules of
:mod:`nn.training`, and what stays here is the per-step and per-epoch control flow they share.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn as tnn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from nn.checks import ConfigError
from nn.training.checkpoint import (CHECKPOINT, METRICS, TIMING_KEYS, append_metrics,
                                    check_resumable, jsonable, load_checkpoint,
                                    load_model_state, save_checkpoint, write_metrics)
from nn.training.config import TrainConfig, TrainResult
from nn.training.runtime import (autocast_dtype, distributed_env, init_group,
                                 library_versions, resolve_device, rng_state, seed_all,
                                 set_rng_state, unwrap)
from nn.training.schedule import lr_at, make_optimizer

__all__ = ["train", "NonFiniteError", "LOG_KEY"]

LOG_KEY = "log_line"
"""The ``epoch_metrics`` key whose text is appended to the epoch's log line, not recorded."""

log = logging.getLogger(__name__)


class NonFiniteError(ConfigError):
    """Training met a value that is not finite -- the loss of a step (its cross-entropy or the
    extra term), a weight or buffer after an epoch (e.g. the variational gates' ``theta``), the
    test loss or an ``epoch_metrics`` value -- and stopped there: every later step would only
    carry the NaN on.  The message says what, where (stage, epoch, step) and what to try."""


def _kind(x: float) -> str:
    return "nan" if math.isnan(x) else "inf" if math.isinf(x) else "finite"


def _hint(amp_dtype, penalty: bool) -> str:
    tips = (["a smaller penalty strength (--lam)"] if penalty else []) + [
        "a lower learning rate (--lr, --finetune-lr)"] + (
        ["mixed precision off (--amp off)"] if amp_dtype is not None else [])
    return "training stopped; try " + " or ".join(filter(None, (", ".join(tips[:-1]),
                                                               tips[-1])))


def _first_nonfinite_tensor(module: tnn.Module) -> str | None:
    """The name of the first floating parameter or buffer of ``module`` holding a value that
    is not finite (one device sync), else None."""
    named = [(n, t) for n, t in itertools.chain(module.named_parameters(),
                                                 module.named_buffers()) if t.is_floating_point()]
    if not named:
        return None
    ok = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).cpu()
    return None if bool(ok.all()) else named[int((~ok).nonzero()[0])][0]


def _first_nonfinite_value(x, key: str = "") -> str | None:
    """The key (dotted path) of the first float in the plain-JSON value ``x`` that is not
    finite, else None."""
    if isinstance(x, float):
        return None if math.isfinite(x) else key
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
    for k, v in items:
        bad = _first_nonfinite_value(v, f"{key}.{k}" if key else str(k))
        if bad is not None:
            return bad
    return None


def train(model: tnn.Module, train_loader, test_loader, config: TrainConfig, *,
          extra_loss: Callable[[tnn.Module], torch.Tensor] | None = None,
          after_step: Callable[[tnn.Module], None] | None = None,
          after_backward: Callable[..., None] | None = None,
          extra_grad: Callable[[tnn.Module, torch.Tensor | None], torch.Tensor] | None = None,
          epoch_metrics: Callable[[tnn.Module, int], dict] | None = None,
          resume: bool = False, name: str = "train") -> TrainResult:
    """Train ``model`` (in place) with SGD for ``config.epochs`` epochs; see the module docstring.

    ``loss = cross_entropy + extra_loss(module)`` (the extra term is computed outside autocast,
    on the unwrapped module); ``after_backward(module, ce, x, y)`` runs after every backward
    pass, before the optimizer step, with the step's cross-entropy (detached) and batch: e.g.
    gradient estimates for parameters outside the optimizer (:mod:`nn.methods.variational`);
    ``after_step(module)`` runs after every optimizer step;
    ``extra_grad(module, scale)`` is an extra loss term that adds its own gradient into the
    parameters' ``.grad`` after the backward pass (times ``scale``, the AMP loss scale as a
    tensor, or None without one) and returns its value (0-d, detached): one fused addition
    instead of autograd's one per parameter (:meth:`nn.regularizer.SPRRegularizer.add_grad_`);
    under DDP it runs on the averaged gradients, which is right for a term every rank computes
    alike from the same weights;
    ``epoch_metrics(module, epoch)`` (1-based ``epoch``) is merged into the epoch's metrics (it
    runs on every rank; rank 0's values are logged); its :data:`LOG_KEY` entry, a short text,
    goes to the end of the epoch's log line instead.  ``resume=True`` continues from
    ``out_dir/checkpoint.pt`` when it exists (else starts afresh): weights, optimizer, schedule,
    RNG and loader states, epoch counter; the metrics log is cut back to the checkpoint's epoch.
    ``test_loader`` may be None (no evaluation).

    A step whose loss (cross-entropy or extra term) is not finite stops training with a
    :class:`NonFiniteError` saying where -- before its optimizer step on the CPU (checked every
    step), within ``log_every`` steps on CUDA (a check reads the device), at the epoch's end
    under DDP (all ranks stop together) -- and so do weights, buffers, the test loss or
    ``epoch_metrics`` values that are not finite after an epoch: the history never holds a NaN.
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
    amp_dtype = autocast_dtype(config.amp, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        init_group("nccl" if device.type == "cuda" else "gloo")
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
            check_resumable(ckpt["config"], config, steps_per_epoch, ckpt)
            load_model_state(module, ckpt, ckpt_path)
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
            set_rng_state(ckpt["rng"][mine])
            if is_main:
                log.info("%s: resumed from %s after epoch %d", name, ckpt_path, start_epoch)
        elif resume and is_main:
            log.info("%s: no checkpoint at %s, starting afresh", name, ckpt_path)
        if is_main and out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_metrics(out_dir / METRICS, history)

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

        # the loss guard reads the device: every step on the CPU (free), else every log_every
        check_every = config.log_every if device.type == "cuda" else 1

        def stop_if_nonfinite(sums, epoch):
            """Raise :class:`NonFiniteError` if a loss of this epoch so far was not finite;
            ``sums[5]`` counts the steps before the first such one (per rank)."""
            ce_sum, extra_sum = float(sums[0]), float(sums[3])
            if math.isfinite(ce_sum) and math.isfinite(extra_sum):
                return
            first = sums[5:6].clone()
            if world > 1:  # every rank got here: the sums are all-reduced
                dist.all_reduce(first, op=dist.ReduceOp.MIN)
            at = int(first) + 1
            bad = _kind(ce_sum) if not math.isfinite(ce_sum) else _kind(extra_sum)
            terms = f"cross-entropy {_kind(ce_sum)}" + (
                f", extra loss {_kind(extra_sum)}" if has_extra else "")
            raise NonFiniteError(
                f"{name}: the loss is {bad} at epoch {epoch + 1}/{config.epochs}, step "
                f"{at}/{steps_per_epoch} (step {epoch * steps_per_epoch + at} overall; {terms}); "
                + _hint(amp_dtype, not math.isfinite(extra_sum)))

        has_extra = extra_loss is not None or extra_grad is not None

        for epoch in range(start_epoch, config.epochs):
            # ---- 5. train one epoch ---------------------------------------------------------
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            net.train()
            # ce * n, correct, n, extra, steps, steps before the first non-finite loss (summed
            # on the device: no sync a step off the CPU)
            sums = torch.zeros(6, dtype=torch.float64, device=device)
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
                    if extra_grad is not None:  # its gradient, added after the backward pass
                        e = extra_grad(module, scaler._scale if scaler.is_enabled() else None)
                        extra = e if extra is None else extra.detach() + e
                        loss = loss.detach() + e
                    with torch.no_grad():
                        sums[0] += ce.detach() * y.shape[0]
                        sums[1] += (logits.argmax(1) == y).sum()
                        sums[2] += y.shape[0]
                        if extra is not None:
                            sums[3] += extra.detach()
                        sums[4] += 1
                        sums[5] += torch.isfinite(sums[0] + sums[3])  # NaN and inf stay
                    if world == 1 and ((i + 1) % check_every == 0 or i + 1 == steps_per_epoch):
                        stop_if_nonfinite(sums, epoch)
                    if after_backward is not None:
                        after_backward(module, ce.detach(), x, y)
                    scaler.step(opt)
                    scaler.update()
                    sched.step()
                    step += 1
                    if after_step is not None:
                        after_step(module)
                    if not bar.disable and ((i + 1) % config.log_every == 0
                                            or i + 1 == steps_per_epoch):
                        bar.set_postfix(loss=f"{loss.item():.4f}",
                                        lr=f"{lr_at(config, step - 1, steps_per_epoch):.3g}")
                    bar.update()
            sync()
            train_time = time.perf_counter() - t0
            if world > 1:
                ok_steps = sums[5].clone()
                dist.all_reduce(sums)
                sums[5] = ok_steps  # this rank's, for the guard
            stop_if_nonfinite(sums, epoch)
            ce_sum, train_correct, train_seen, extra_sum, steps_done, _ = sums.tolist()
            if train_seen == 0:
                raise ValueError(f"train_loader yielded no samples in epoch {epoch + 1}")
            record = {"epoch": epoch + 1, "step": step,
                      "lr": lr_at(config, step - 1, steps_per_epoch),
                      "train_loss": ce_sum / train_seen, "train_acc": train_correct / train_seen}
            if has_extra:
                record["train_extra"] = extra_sum / steps_done

            # ---- 6. evaluate (rank 0's buffers everywhere first) ----------------------------
            if world > 1:
                for b in module.buffers():
                    dist.broadcast(b, src=0)
            broken = _first_nonfinite_tensor(module)  # the same on every rank
            if broken is not None:
                raise NonFiniteError(f"{name}: {broken} is not finite after epoch {epoch + 1}/"
                                     f"{config.epochs} (the losses were); "
                                     + _hint(amp_dtype, has_extra))
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
                if not math.isfinite(loss_sum):
                    raise NonFiniteError(f"{name}: the test loss is {_kind(loss_sum)} after epoch "
                                         f"{epoch + 1}/{config.epochs} (the training losses and "
                                         f"weights were finite); "
                                         + _hint(amp_dtype, has_extra))
                record["test_loss"], record["test_acc"] = loss_sum / seen, correct / seen
                if best_acc is None or record["test_acc"] > best_acc:
                    best_acc, best_epoch = record["test_acc"], epoch + 1
            sync()
            eval_time = time.perf_counter() - t1

            # ---- 7. log: metrics line, progress summary -------------------------------------
            extra_log = None
            if epoch_metrics is not None:
                more = jsonable(epoch_metrics(module, epoch + 1))
                if not isinstance(more, dict):
                    raise ValueError(f"epoch_metrics must return a dict, got {type(more)}")
                extra_log = more.pop(LOG_KEY, None)
                clash = sorted(set(more) & (set(record) | set(TIMING_KEYS)))
                if clash:
                    raise ValueError(f"epoch_metrics returned reserved key(s) {clash}")
                broken = _first_nonfinite_value(more)
                if broken is not None:
                    raise NonFiniteError(f"{name}: the epoch metric {broken} is not finite after "
                                         f"epoch {epoch + 1}/{config.epochs}; "
                                         + _hint(amp_dtype, has_extra))
                record.update(more)
            record.update(time=train_time + eval_time, train_time=train_time,
                          eval_time=eval_time, images_per_s=train_seen / train_time
                          if train_time > 0 else None)  # None: too fast for the clock
            history.append(record)
            if is_main:
                if out_dir is not None:
                    append_metrics(out_dir / METRICS, record)
                summary = (f"{name} epoch {epoch + 1}/{config.epochs}: "
                           f"loss {record['train_loss']:.4f} acc {record['train_acc']:.4f}"
                           + (f" | test loss {record['test_loss']:.4f} acc "
                              f"{record['test_acc']:.4f}" if "test_acc" in record else "")
                           + f" | lr {record['lr']:.4g} | "
                           + (f"{record['images_per_s']:.0f}" if record["images_per_s"] else "-")
                           + " img/s" + (f" | {extra_log}" if extra_log else ""))
                if config.progress:
                    tqdm.write(summary)
                else:
                    log.info(summary)

            # ---- 8. checkpoint (all ranks hand over RNG/loader states; rank 0 writes) -------
            last = epoch + 1 == config.epochs
            if out_dir is not None and (last or (config.checkpoint_every
                                                 and (epoch + 1) % config.checkpoint_every == 0)):
                mine = {"rng": rng_state(),
                        "loader": train_loader.state_dict()
                        if hasattr(train_loader, "state_dict") else None}
                every = [mine]
                if world > 1:
                    every = [None] * world
                    dist.all_gather_object(every, mine)
                if is_main:
                    save_checkpoint({
                        "format": 1, "epoch": epoch + 1, "step": step,
                        "steps_per_epoch": steps_per_epoch, "world_size": world,
                        "model": module.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                        "best_acc": best_acc, "best_epoch": best_epoch, "history": history,
                        "config": config.to_dict(), "versions": library_versions(),
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
