"""One pruning run, as resumable stages under ``out/``; the method (:mod:`nn.methods`) decides
what each stage does, the pipeline only runs them:

    1 train      the method's training module and hooks, from random init          out/train/
    2 select     the method's masks (scores cut by a rule, or its own decision);
                 the pruned model's test accuracy                                  out/select/
    3 finetune   the physically pruned model trained without any penalty          out/finetune/
    4 report     save_pruned, test accuracy of the saved model reloaded, MACs and
                 params counted on it, latency, layer widths, plots (nn.report)   out/report.json

Each stage ends by writing its marker atomically (``train/done.json``, ``select/selection.json``,
``finetune/done.json``, ``report.json``); ``resume`` skips stages with a marker, continues an
interrupted training stage from its checkpoint (``train(resume=True)``), and refuses a changed
configuration (``config.json``).  Without ``resume`` an ``out`` holding a run is refused.

**One run per folder.**  ``out`` must be a new or empty folder, or a run folder (it holds
``mipprune.lock``; a folder of older versions: ``config.json`` and ``train/``): a folder of
other files is refused, so no file of the user's is ever overwritten.  The run holds the
folder's lock (:class:`nn.io.FolderLock`; under torchrun rank 0 holds it for all ranks) from
before any heavy work to its end: a second run on the same ``out`` -- a resume too -- is
refused, naming the holder's pid; a killed run's lock goes with its process.  The run then
deletes the temporaries of interrupted writes.

**Checked files.**  Every file read back is checked (:mod:`nn.io`: JSON against its
``.sha256``, torch files against their CRC-32s; checkpoints also for their keys and finite
weights).  A file that cannot be read, is damaged or holds something else, and a file that
cannot be written (permissions, a full disk): one :class:`~nn.checks.ConfigError` naming the
file, the cause and what to do -- for a damaged stage file, delete that stage's folder and
the later ones' (the message gives the ``rm -r`` line) and resume: they are redone.

Distributed (torchrun): training is DDP (``batch_size`` is global, split over ranks); every rank
takes part in the selection -- the calibration subset and the test set are sharded and the
counts all-reduced, so all ranks take the same decisions, and rank 0's masks are broadcast
anyway -- then every rank compresses the same masks and fine-tunes.  Rank 0 alone writes files,
evaluates the saved model and measures latency; the other ranks return None after fine-tuning.
Resuming under torchrun needs ``out`` on a file system every rank sees.

One concept: the stage machine of a run (claiming the folder, running and resuming stages,
reading their checked files back); methods, surgery and the report live elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shlex
import time
from pathlib import Path

import torch
import torch.distributed as dist

from nn.complexity import count_macs, count_params
from nn.config import ConfigError, RunConfig, RuntimeConfig
from nn.data import load_dataset, make_loader
from nn.evaluation import evaluate
from nn.io import (LOCK, FolderLock, RunFileError, read_json, read_torch, remove_temporaries,
                   save_torch, write_json)
from nn.methods import Run
from nn.models import build_model, compress, load_pruned, prunable_structures, save_pruned
from nn.training import (CHECKPOINT, distributed_env, load_checkpoint, load_model_state,
                         resolve_device, seed_all, train)
from nn.weights import load_weights

__all__ = ["ConfigError", "run_pipeline", "REPORT"]

log = logging.getLogger(__name__)
REPORT = "report.json"
_STAGES = ("train", "select", "finetune")
_MARKERS = {"train": "train/done.json", "select": "select/selection.json",
            "finetune": "finetune/done.json", "report": REPORT}
_KEYS = {"config.json": ("data", "model", "optim", "method", "selection", "runtime"),
         "train/done.json": ("seconds", "history", "test_acc"),
         "select/selection.json": ("summary", "test_acc_pruned", "seconds"),
         "finetune/done.json": ("seconds", "history"),
         REPORT: ("format", "method", "config", "data", "git", "accuracy", "complexity",
                  "latency", "selection", "layers", "blocks", "blocks_kept", "history",
                  "timings", "files")}
"""The keys each JSON run file must hold (what this module and the report table read)."""
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
"""Write errors that name no file but the file system: full, over quota, read-only."""


def _bcast(obj, world: int):
    if world > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        obj = box[0]
    return obj


def _changed(old: dict, now: dict) -> str | None:
    """The first setting that differs between two ``RunConfig.to_dict()`` (dotted path),
    ignoring the runtime fields a resumed run may change."""
    for part in sorted(set(old) | set(now)):
        a, b = old.get(part), now.get(part)
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if not (part == "runtime" and k in RuntimeConfig.RESUME_FREE) \
                        and a.get(k) != b.get(k):
                    return f"{part}.{k} was {a.get(k)!r}, now {b.get(k)!r}"
        elif a != b and part != "preset":
            return f"{part} was {a!r}, now {b!r}"
    return None


def _read(out: Path, name: str) -> dict:
    """Run file ``out/name`` (JSON), checked, with its :data:`_KEYS`."""
    return read_json(out / name, _KEYS[name])


def _inside(path, folder: Path) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))


def _remedy(out: Path, path: Path) -> str:
    """What to do about the damaged run file ``path``: delete its stage and the later ones,
    which a resume then redoes, or start afresh."""
    rel = Path(os.path.relpath(path, out)).parts if _inside(path, out) else ("",)
    if rel[0] not in _STAGES + (REPORT,):
        return "start a new --out"
    later = _STAGES[_STAGES.index(rel[0]):] if rel[0] in _STAGES else ()
    redo = [shlex.quote(str(out / p)) for p in later + (REPORT,) if (out / p).exists()]
    return f"to redo from there: rm -r {' '.join(redo)}, then run again with --resume; or " \
           f"start a new --out"


def _refusal(e: Exception, out: Path) -> ConfigError | None:
    """``e`` as the one-line error a user gets: a run file that cannot be read (with what to
    do about it), an ``OSError`` writing into ``out``; None for any other error."""
    if isinstance(e, RunFileError):
        return RunFileError(e.path, e.problem, _remedy(out, e.path))
    if isinstance(e, ConfigError):
        return e
    if isinstance(e, OSError):
        where = e.filename if e.filename is not None and _inside(e.filename, out) else \
            out if e.errno in _FULL else None
        if where is not None:
            return ConfigError(f"cannot write {where}: {e.strerror or e}; free space or fix "
                               f"permissions, then continue with --resume")
    return None


def _claim(text: str, held: contextlib.ExitStack) -> None:
    """Make folder ``text`` this run's: refuse an empty name and a folder of other files,
    create it, take its lock (``held`` releases it), delete temporaries of interrupted
    writes."""
    if not text.strip():  # Path("") is the current folder
        raise ConfigError("out is empty (--out ''): name the run folder, e.g. runs/mine")
    out, lock = Path(text), FolderLock(text)
    try:
        ours = (out / LOCK).exists() or (out / "config.json").exists() and (out / "train").exists()
        other = sorted(p.name for p in out.iterdir()) if out.is_dir() and not ours else []
        if other:
            raise ConfigError(f"out {out} holds files that are not a run of python -m nn "
                              f"({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}): "
                              f"choose a new or empty folder for --out")
        out.mkdir(parents=True, exist_ok=True)
        holder = lock.acquire()
    except OSError as e:
        raise ConfigError(f"cannot use {e.filename or out} as the run folder: "
                          f"{e.strerror or e}; choose another --out") from None
    if holder is not None:
        raise ConfigError(f"{out} is in use by another run ({holder}): wait for it to end, or "
                          f"choose another --out")
    held.callback(lock.release)
    gone = remove_temporaries(out)
    if gone:
        log.info("%s: deleted %d temporary file(s) of interrupted writes", out, len(gone))


def _prepare(cfg: RunConfig, held: contextlib.ExitStack) -> dict:
    """Claim ``out`` (:func:`_claim`); check it against ``resume``; write ``config.json``;
    which stages are done."""
    _claim(cfg.runtime.out, held)
    out = Path(cfg.runtime.out)
    saved = out / "config.json"
    if (out / "train").exists():  # a stage has started
        if not cfg.runtime.resume:
            raise ConfigError(f"{out} already holds a run: pass resume (--resume) to continue it "
                              f"or choose another out directory")
        diff = _changed(_read(out, "config.json"), json.loads(json.dumps(cfg.to_dict())))
        if diff:
            raise ConfigError(f"cannot resume {out}: {diff}")
    write_json(saved, cfg.to_dict(), checked=True)
    return {stage: (out / marker).exists() for stage, marker in _MARKERS.items()}


def _latency(dense, pruned, input_size, device, rt: RuntimeConfig) -> dict:
    """Per batch of ``rt.latency_batches``: the median latency of the dense and the pruned
    network in their inference form (BN folded), timed together round by round with rounds
    disturbed by other processes skipped (:func:`nn.latency.measure_networks`)."""
    from nn.latency import inference_form, measure_networks

    nets = [inference_form(compress(dense, {})), inference_form(pruned)]
    out = {}
    for b in rt.latency_batches:
        log.info("latency: dense and pruned timed together at batch %d, %d rounds", b,
                 rt.latency_repeats)
        ms, res = measure_networks(nets, input_size, b, device, "float32", rt.threads,
                                   rt.latency_repeats, progress=rt.progress)
        where = {"device": str(device), "threads": rt.threads or torch.get_num_threads()}
        seen = [c for c in res.get("foreign_cores") or [] if c is not None]
        out[str(b)] = {"dense": {"median_ms": ms[0], **where},
                       "pruned": {"median_ms": ms[1], **where}, "rounds": res["rounds"],
                       "quiet_rounds": res["quiet_rounds"], "disturbed": res["disturbed"],
                       "other_cores": max(seen) if seen else None}
    return out


def run_pipeline(cfg: RunConfig) -> dict | None:
    """Run (or resume) every stage; returns the report (None on ranks other than 0)."""
    if not isinstance(cfg, RunConfig):
        raise ValueError(f"expected a RunConfig, got {type(cfg).__name__}")
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    rank, world, local = distributed_env()
    device = resolve_device(cfg.runtime.device, local)
    own = world > 1 and not dist.is_initialized()
    if own:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        with contextlib.ExitStack() as held:  # rank 0 holds out's lock until the run ends
            return _run(cfg, rank, world, device, held)
    except (ConfigError, OSError) as e:
        refusal = _refusal(e, Path(cfg.runtime.out))
        if refusal is None or refusal is e:
            raise
        raise refusal from None
    finally:
        if own and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: RunConfig, rank: int, world: int, device: torch.device,
         held: contextlib.ExitStack):
    from nn import report as R  # matplotlib only when a report is written

    t0, out, main = time.perf_counter(), Path(cfg.runtime.out), rank == 0
    method, opt, seed = cfg.method.method, cfg.optim, cfg.runtime.seed
    if opt.batch_size % world:
        raise ConfigError(f"batch_size {opt.batch_size} is not divisible by {world} ranks")
    done = None
    if main:
        try:
            done = _prepare(cfg, held)
        except (ConfigError, OSError) as e:  # every rank raises it (no rank left waiting)
            refusal = _refusal(e, out)
            if refusal is None:
                raise
            done = {"error": str(refusal)}
    done = _bcast(done, world)
    if "error" in done:
        raise ConfigError(done["error"])
    if done["report"]:
        log.info("%s: every stage is complete; nothing to do", out)
        if not main:
            return None
        report = _read(out, REPORT)
        if report["format"] != R.FORMAT:
            raise RunFileError(out / REPORT, f"is a report of format {report['format']!r}, "
                                             f"not {R.FORMAT!r}")
        return report

    # ---- data, the dense model, its structures -------------------------------------------
    d = cfg.data
    extra = {"seed": seed, **(d.synthetic or {})} if d.name == "synthetic" else {}
    try:
        bundle = load_dataset(d.name, d.dir, device=device, subset=d.subset, **extra)
    except ValueError as e:  # e.g. a subset larger than the training set
        raise ConfigError(str(e)) from None
    input_size = (bundle.in_channels, bundle.image_size, bundle.image_size)
    seed_all(seed)
    m = cfg.model
    model = build_model(m.name, bundle.num_classes, bundle.in_channels, m.width, m.shortcut)
    if m.weights:
        try:
            load_weights(model, m.weights)
        except ValueError as e:
            raise ConfigError(f"--weights {m.weights}: {e}") from None
    model = model.to(device)
    structures = prunable_structures(model, input_size)

    def loader(s):
        return make_loader(bundle, "train", opt.batch_size // world, seed=s, rank=rank,
                           world_size=world, channels_last=cfg.runtime.channels_last)

    test = make_loader(bundle, "test", opt.eval_batch_size, rank=rank, world_size=world)
    train_loader = loader(seed)  # one loader: a method's warm-up may count its steps
    run = Run(cfg, model, input_size, structures,
              [f for f in structures if f.kind in cfg.method.structures],
              {"macs": count_macs(model, input_size), "params": count_params(model)},
              bundle, rank, world, device, len(train_loader))
    if cfg.selection.budget and not done["select"]:  # a budget no network meets: say it now
        from nn.budget import check_reachable

        check_reachable(run)
    try:  # settings that only the model can judge (a group size that must divide its widths)
        training = method.training(run)
    except ValueError as e:
        raise ConfigError(f"--method {method.name}: {e}") from None
    stages = {}

    # ---- 1. training with the method's hooks ---------------------------------------------------
    sdir = out / "train"
    if done["train"]:
        load_model_state(training.module, load_checkpoint(sdir / CHECKPOINT), sdir / CHECKPOINT)
        stages["train"] = _read(out, "train/done.json") | {"ran": False}
    else:
        tc = cfg.train_config("train")
        if training.restart_step is not None:
            tc = dataclasses.replace(tc, restart_step=training.restart_step,
                                     restart_warmup=training.restart_warmup)
        res = train(training.module, train_loader, test, tc, resume=cfg.runtime.resume,
                    name=f"{method.name} train", **training.hooks)
        stages["train"] = {"seconds": res.seconds, "history": res.history,
                           "test_acc": evaluate(training.module, test, world), "ran": True}
        if main:
            write_json(sdir / "done.json", stages["train"], checked=True)

    # ---- 2. select: the method's masks; compress -----------------------------------------------
    sdir = out / "select"
    if done["select"]:
        masks = read_torch(sdir / "masks.pt")
        if not isinstance(masks, dict):
            raise RunFileError(sdir / "masks.pt", f"holds a {type(masks).__name__}, not the "
                                                  f"masks (a dict)")
        stages["select"] = _read(out, "select/selection.json") | {"ran": False}
    else:
        ts = time.perf_counter()
        masks, sel = method.select(run, training)
        masks = _bcast(masks, world)
        sel["test_acc_pruned"] = evaluate(compress(model, masks), test, world)
        stages["select"] = sel | {"seconds": time.perf_counter() - ts, "ran": True}
        if main:
            sdir.mkdir(parents=True, exist_ok=True)
            save_torch(sdir / "masks.pt", masks)
            write_json(sdir / "selection.json", stages["select"], checked=True)
    try:
        pruned = compress(model, masks)
    except ValueError as e:
        if not done["select"]:
            raise
        raise RunFileError(sdir / "masks.pt", f"its masks do not fit the model "
                                              f"({' '.join(str(e).split())})") from None

    # ---- 3. fine-tune without any penalty ------------------------------------------------------
    sdir = out / "finetune"
    if not method.finetunes or opt.finetune_epochs == 0:
        stages["finetune"] = {"seconds": 0.0, "history": [], "ran": False, "skipped": True}
    elif done["finetune"]:
        load_model_state(pruned, load_checkpoint(sdir / CHECKPOINT), sdir / CHECKPOINT)
        stages["finetune"] = _read(out, "finetune/done.json") | {"ran": False}
    else:
        res = train(pruned, loader(seed + 1), test, cfg.train_config("finetune"),
                    resume=cfg.runtime.resume, name=f"{method.name} finetune")
        stages["finetune"] = {"seconds": res.seconds, "history": res.history, "ran": True}
        if main:
            write_json(sdir / "done.json", stages["finetune"], checked=True)
    if world > 1:
        dist.barrier()
    if not main:
        return None

    # ---- 4. report: the saved model, reloaded, is what gets measured ---------------------------
    tr = time.perf_counter()
    full_test = test if world == 1 else make_loader(bundle, "test", opt.eval_batch_size)
    pruned.eval()
    path = save_pruned(pruned, out / "pruned.pt")
    reloaded = load_pruned(path).to(device)
    final = evaluate(pruned, full_test)
    acc = {"test_before_pruning": stages["train"]["test_acc"],
           "test_after_pruning": stages["select"]["test_acc_pruned"],
           "test_after_finetune": final if stages["finetune"].get("history") else None,
           "test_final": final, "test_reloaded": evaluate(reloaded, full_test)}
    acc["reload_matches"] = acc["test_reloaded"] == acc["test_final"]
    small = {"macs": count_macs(reloaded, input_size), "params": count_params(reloaded)}
    latency = _latency(model, reloaded, input_size, device, cfg.runtime)
    timing = {s: stages[s].get("seconds", 0.0) for s in ("train", "select", "finetune")}
    report = R.build_report(cfg, bundle=bundle, input_size=input_size, dense_model=model,
                            pruned_spec=reloaded.spec,
                            section=method.section(run, training), stages=stages,
                            accuracy=acc, dense=run.dense, pruned=small, latency=latency,
                            timing=timing, world=world,
                            files={"model": str(path), "report": str(out / REPORT)})
    report["files"]["plots"] = R.write_plots(report, out, method)
    report["timings"]["report"] = time.perf_counter() - tr
    report["timings"]["this_call"] = time.perf_counter() - t0
    write_json(out / REPORT, report, checked=True)
    if not acc["reload_matches"]:
        log.warning("reloaded model: test acc %.4f, in memory %.4f", acc["test_reloaded"],
                    acc["test_final"])
    return report
