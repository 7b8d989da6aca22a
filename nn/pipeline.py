"""One pruning run, as resumable stages under ``out/``:

    1 train      regularised training from random init (spr, bigm: the penalty of
                 nn.regularizer; slimming: L1 on BN γ; dense, l1-filter: plain;
                 variational: the gated network of nn.gates, pruning as it trains) out/train/
    2 select     scores -> removal order -> cut by bisection on the training-accuracy
                 drop or by a MAC target (nn.baselines); variational: every theta
                 rounded to 0/1 and the BN statistics of that network recomputed on
                 ``bisect_images`` unaugmented training images; masks; compress  out/select/
    3 finetune   the physically pruned model trained without any penalty          out/finetune/
    4 report     save_pruned, test accuracy of the saved model reloaded, MACs and
                 params counted on it, latency, layer widths, plots (nn.report)   out/report.json

Each stage ends by writing its marker atomically (``train/done.json``, ``select/selection.json``,
``finetune/done.json``, ``report.json``); ``resume=True`` skips stages with a marker, continues
an interrupted training stage from its checkpoint (``train(resume=True)``), and refuses a changed
configuration (``config.json``).  Without ``resume`` an ``out`` holding a run is refused.

M of the SPR/big-M penalty: ``M_j = M_scale * max|w|`` over family j's writers in ``reference``
(a checkpoint or state_dict path) or, by default, in the *initial* weights (the model is seeded,
so a resumed run rebuilds the same M); at initialisation BN γ = 1 dominates, so M_j = M_scale.

Distributed (torchrun): training is DDP (``batch_size`` is global, split over ranks); every rank
takes part in the selection -- the bisection subset and the test set are sharded and the counts
all-reduced, so all ranks take the same decisions, and rank 0's masks are broadcast anyway --
then every rank compresses the same masks and fine-tunes.  Rank 0 alone writes files, evaluates
the saved model and measures latency; the other ranks return None after fine-tuning.  Resuming
under torchrun needs ``out`` on a file system every rank sees.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nn.baselines import (METHODS, SCORES, evaluate, select_masks, slimming_penalty,
                          subset_loader)
from nn.complexity import count_macs, count_params, measure_latency
from nn.data import DATASETS, load_dataset, make_loader
from nn.models import MODELS, build_model
from nn.pruned import load_pruned, save_pruned
from nn.regularizer import SPRConfig, SPRRegularizer
from nn.structures import prunable_structures
from nn.surgery import compress
from nn.variational import VariationalConfig, make_gated, recalibrate_bn
from nn.variational import hooks as variational_hooks
from nn.train import (CHECKPOINT, TrainConfig, atomic_write, distributed_env, load_checkpoint,
                      resolve_device, seed_all, train)

__all__ = ["PipelineConfig", "ConfigError", "run_pipeline", "evaluate", "REPORT"]

log = logging.getLogger(__name__)
REPORT, REPORT_FORMAT = "report.json", "mipprune.nn.pipeline-report/1"
LAM_DEFAULT = {"spr": 4.5, "variational": 1.0}
"""``lam`` when not given: SPR/big-M strength, or the variational pruner's price of the
normalised expected cost (tuned on the ``--quick`` Fashion-MNIST run)."""
_FREE = {"out", "resume", "progress", "threads", "device", "amp", "channels_last", "compile",
         "data_dir", "latency_batches", "latency_repeats"}  # may change on resume


class ConfigError(ValueError):
    """A run that cannot start as asked: ``out`` holds a run, resume with a changed config..."""


@dataclass(frozen=True)
class PipelineConfig:
    """Everything a run needs (the CLI's options; the one home of their defaults).

    Training defaults are the published CIFAR recipe (DESIGN §4: 300 + 200 epochs, SGD 0.1,
    momentum 0.9, batch 128, wd 5e-4).  The penalty's (``lam`` 4.5, ``alpha`` 0.1, ``M_scale``
    2, ``cost`` 0.5: n_j/N = half params share, half MAC share) were tuned on the ``--quick``
    Fashion-MNIST run (5 regularised epochs; lam 3 / 4 / 5 removed 21% / 50% / 74% of the
    MACs there); longer runs shrink more groups at the same lam.  ``tolerance`` is in percentage points of training
    accuracy; ``mac_target`` a fraction of the dense MACs; ``select`` ``"auto"`` means bisection
    for spr/bigm and the MAC target for l1-filter/slimming.  ``structures`` are the kinds pruned
    (and regularised): ``("filter",)`` or ``("filter", "stream")``.  ``synthetic``: keywords of
    ``nn.data.make_synthetic``.  ``latency_batches``: batch sizes timed on ``device``.
    ``beta``, ``gamma``, ``theta_lr``, ``estimator``, ``gate_warmup_epochs``, ``theta_init``,
    ``flip_units``, ``flip_blocks``: the variational pruner's
    (:class:`nn.variational.VariationalConfig`; ``lam`` is shared, :data:`LAM_DEFAULT` when not
    given)."""

    method: str = "spr"
    model: str = "resnet20"
    width: float = 1.0
    shortcut: str | None = None
    data: str = "fashion-mnist"
    data_dir: str | None = None
    subset: int | None = None
    synthetic: dict | None = None
    epochs: int = 300
    finetune_epochs: int = 200
    batch_size: int = 128
    eval_batch_size: int = 500
    lr: float = 0.1
    finetune_lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    lam: float | None = None
    alpha: float = 0.1
    M_scale: float = 2.0
    cost: str | float = 0.5
    beyond_M: str = "extend"
    reference: str | None = None
    structures: tuple = ("filter",)
    score: str = "norm"
    select: str = "auto"
    tolerance: float = 0.5
    bisect_images: int = 5000
    mac_target: float = 0.5
    slimming_lambda: float = 1e-4
    beta: float = VariationalConfig.beta          # the variational pruner's: one home
    gamma: float = VariationalConfig.gamma
    theta_lr: float = VariationalConfig.theta_lr
    estimator: str = VariationalConfig.estimator
    gate_warmup_epochs: float = VariationalConfig.warmup_epochs
    theta_init: float = VariationalConfig.theta_init
    flip_units: int | None = VariationalConfig.flip_units
    flip_blocks: int | None = VariationalConfig.flip_blocks
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    out: str = "runs/pipeline"
    resume: bool = False
    progress: bool = True
    threads: int | None = None
    latency_batches: tuple = (1, 64)
    latency_repeats: int = 30
    preset: str | None = None

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")

        for name, choices in (("method", METHODS), ("model", tuple(MODELS)),
                              ("data", tuple(DATASETS)), ("score", SCORES),
                              ("select", ("auto", "bisection", "mac-target")),
                              ("shortcut", (None, "A", "B"))):
            if getattr(self, name) not in choices:
                bad(name, f"one of {choices}")
        kinds = tuple(self.structures) if isinstance(self.structures, (list, tuple)) else ()
        if kinds not in (("filter",), ("filter", "stream"), ("stream",)):
            bad("structures", "('filter',), ('stream',) or ('filter', 'stream')")
        object.__setattr__(self, "structures", kinds)
        for name, lo, hi in (("tolerance", 0, 100), ("mac_target", 0, 1), ("width", 0, 64)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi \
                    or (name != "tolerance" and v == 0):
                bad(name, f"a number in {'[' if name == 'tolerance' else '('}{lo}, {hi}]")
        for name, lo in (("bisect_images", 1), ("eval_batch_size", 1), ("latency_repeats", 1),
                         ("finetune_epochs", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                bad(name, f"an int >= {lo}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            bad("threads", "None or an int >= 1")
        if not (isinstance(self.slimming_lambda, (int, float)) and self.slimming_lambda >= 0):
            bad("slimming_lambda", "a number >= 0")
        lb = tuple(self.latency_batches)
        if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in lb):
            bad("latency_batches", "ints >= 1 (empty: no latency)")
        object.__setattr__(self, "latency_batches", tuple(b for b in lb if b > 0))
        if self.synthetic is not None and (self.data != "synthetic"
                                           or not isinstance(self.synthetic, dict)):
            bad("synthetic", "a dict of make_synthetic keywords, with data='synthetic'")
        if self.lam is None:
            object.__setattr__(self, "lam", LAM_DEFAULT["variational" if self.method ==
                                                       "variational" else "spr"])
        self.spr_config()  # SPRConfig, VariationalConfig, TrainConfigs validate the rest
        self.variational_config()
        self.train_config("train", False)
        if self.finetune_epochs:
            self.train_config("finetune", False)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(structures=list(self.structures), latency_batches=list(self.latency_batches))
        return d

    def spr_config(self) -> SPRConfig:
        return SPRConfig(lam=self.lam, alpha=self.alpha, M_scale=self.M_scale, cost=self.cost,
                         kinds=self.structures, beyond_M=self.beyond_M,
                         penalty="bigm" if self.method == "bigm" else "spr")

    def variational_config(self) -> VariationalConfig:
        return VariationalConfig(lam=self.lam, beta=self.beta, gamma=self.gamma,
                                 theta_lr=self.theta_lr, estimator=self.estimator,
                                 warmup_epochs=self.gate_warmup_epochs,
                                 theta_init=self.theta_init, flip_units=self.flip_units,
                                 flip_blocks=self.flip_blocks)

    def train_config(self, stage: str, checkpoints: bool = True) -> TrainConfig:
        """The TrainConfig of stage ``"train"`` or ``"finetune"`` (checkpoints in out/stage)."""
        ft = stage == "finetune"
        return TrainConfig(
            epochs=self.finetune_epochs if ft else self.epochs,
            lr=self.finetune_lr if ft else self.lr, momentum=self.momentum,
            nesterov=self.nesterov, weight_decay=self.weight_decay, schedule=self.schedule,
            warmup_epochs=0 if ft else self.warmup_epochs, batch_size=self.batch_size,
            device=self.device, amp=self.amp, channels_last=self.channels_last,
            compile=self.compile, seed=self.seed + (1 if ft else 0),
            out_dir=str(Path(self.out) / stage) if checkpoints else None, progress=self.progress)


def variational_selection(gated, calibration) -> tuple[dict, dict]:
    """The variational pruner's masks: every theta rounded to 0 or 1 (``GatedResNet.round_``;
    the rule and the counts rounded each way go into the record), then the BN statistics of
    that deterministic network recomputed on ``calibration`` (unaugmented training images)."""
    before = gated.stats()
    info = gated.round_()
    masks = gated.deterministic_masks()
    batches = recalibrate_bn(gated, calibration)
    return masks, {"rule": "variational", **info, "before_rounding": before,
                   "structures": len(gated.theta), "bn_recalibration_batches": batches,
                   "removed": {n: int((~m).sum()) for n, m in masks.items()}}


def _write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=1, default=float)
    atomic_write(path, lambda fh: fh.write(text.encode()))


def _bcast(obj, world: int):
    if world > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        obj = box[0]
    return obj


def _prepare(cfg: PipelineConfig) -> dict:
    """Check ``out`` against ``resume``; write ``config.json``; which stages are done."""
    out = Path(cfg.out)
    saved = out / "config.json"
    if saved.exists() and (out / "train").exists():  # a stage has started
        if not cfg.resume:
            raise ConfigError(f"{out} already holds a run: pass resume (--resume) to continue it "
                             f"or choose another out directory")
        old = json.loads(saved.read_text())
        now = json.loads(json.dumps(cfg.to_dict()))
        diff = sorted(k for k in set(old) | set(now) if k not in _FREE and old.get(k) != now.get(k))
        if diff:
            raise ConfigError(f"cannot resume {out}: {diff[0]} was {old.get(diff[0])!r}, now "
                             f"{now.get(diff[0])!r}")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(saved, cfg.to_dict())
    return {s: (out / m).exists() for s, m in (("train", "train/done.json"),
            ("select", "select/selection.json"), ("finetune", "finetune/done.json"),
            ("report", REPORT))}


def run_pipeline(cfg: PipelineConfig) -> dict | None:
    """Run (or resume) every stage; returns the report (None on ranks other than 0)."""
    if not isinstance(cfg, PipelineConfig):
        raise ValueError(f"expected a PipelineConfig, got {type(cfg).__name__}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, local = distributed_env()
    device = resolve_device(cfg.device, local)
    own = world > 1 and not dist.is_initialized()
    if own:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _run(cfg, rank, world, device)
    finally:
        if own and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg, rank, world, device):
    from nn import report as R  # matplotlib only when a report is written

    t0, out, main = time.perf_counter(), Path(cfg.out), rank == 0
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by {world} ranks")
    done = None
    if main:
        try:
            done = _prepare(cfg)
        except ConfigError as e:  # every rank raises it (no rank left waiting)
            done = {"error": str(e)}
    done = _bcast(done, world)
    if "error" in done:
        raise ConfigError(done["error"])
    if done["report"]:
        log.info("%s: every stage is complete; nothing to do", out)
        return json.loads((out / REPORT).read_text()) if main else None
    extra = {"seed": cfg.seed, **(cfg.synthetic or {})} if cfg.data == "synthetic" else {}
    try:
        bundle = load_dataset(cfg.data, cfg.data_dir, device=device, subset=cfg.subset, **extra)
    except ValueError as e:  # e.g. a subset larger than the training set
        raise ConfigError(str(e)) from None
    input_size = (bundle.in_channels, bundle.image_size, bundle.image_size)
    seed_all(cfg.seed)
    model = build_model(cfg.model, bundle.num_classes, bundle.in_channels, cfg.width,
                        cfg.shortcut).to(device)
    all_fams = prunable_structures(model, input_size)
    fams = [f for f in all_fams if f.kind in cfg.structures]
    dense = {"macs": count_macs(model, input_size), "params": count_params(model)}

    def loaders(seed):
        return make_loader(bundle, "train", cfg.batch_size // world, seed=seed, rank=rank,
                           world_size=world, channels_last=cfg.channels_last)

    test = make_loader(bundle, "test", cfg.eval_batch_size, rank=rank, world_size=world)
    train_loader = loaders(cfg.seed)  # one loader: the gates' warm-up counts its steps
    reg, hooks, trained = None, {}, model
    if cfg.method == "variational":
        if world > 1:
            raise ConfigError("method variational runs in one process (its gate updates are "
                              "not synchronised across DDP ranks yet); drop torchrun")
        if cfg.amp == "fp16" or (cfg.amp in ("auto", "on") and device.type == "cuda"
                                 and not torch.cuda.is_bf16_supported()):
            raise ConfigError("method variational needs --amp bf16 or off (fp16 loss scaling "
                              "would scale the gate gradients)")
        trained = make_gated(model, input_size, cfg.variational_config()).to(device)
        hooks = variational_hooks(trained, cfg.variational_config(), len(train_loader))
    elif cfg.method in ("spr", "bigm"):  # built on the initial weights: M from them
        reg = SPRRegularizer(model, cfg.spr_config(), input_size, reference=cfg.reference)

        def cases(m, epoch):
            with torch.no_grad():
                s = reg.case_stats()["all"]
                return {"spr_C1": s["C1"], "spr_C2": s["C2"], "spr_C3": s["C3"],
                        "penalty": float(reg())}

        hooks = dict(extra_loss=lambda m: reg(), after_step=lambda m: reg.project_(),
                     epoch_metrics=cases)
    elif cfg.method == "slimming":
        term = slimming_penalty(model, fams, cfg.slimming_lambda)
        hooks = dict(extra_loss=term,
                     epoch_metrics=lambda m, e: {"penalty": float(term(m).detach())})
    stages = {}

    # ---- 1. regularised training -------------------------------------------------------------
    sdir = out / "train"
    if done["train"]:
        trained.load_state_dict(load_checkpoint(sdir / CHECKPOINT)["model"])
        stages["train"] = json.loads((sdir / "done.json").read_text()) | {"ran": False}
    else:
        res = train(trained, train_loader, test, cfg.train_config("train"),
                    resume=cfg.resume, name=f"{cfg.method} train", **hooks)
        stages["train"] = {"seconds": res.seconds, "history": res.history,
                           "test_acc": evaluate(trained, test, world), "ran": True}
        if main:
            _write_json(sdir / "done.json", stages["train"])

    # ---- 2. select: scores, order, cut; compress -------------------------------------------
    sdir = out / "select"
    if done["select"]:
        masks = torch.load(sdir / "masks.pt", weights_only=True)
        stages["select"] = json.loads((sdir / "selection.json").read_text()) | {"ran": False}
    else:
        ts = time.perf_counter()
        if cfg.method == "variational":
            masks, sel = variational_selection(trained, subset_loader(
                bundle, cfg.bisect_images, cfg.eval_batch_size, rank, world))
        else:
            masks, sel = select_masks(cfg, model, fams, all_fams, reg, input_size,
                                      dense["macs"], bundle, rank, world)
        masks = _bcast(masks, world)
        sel["test_acc_pruned"] = evaluate(compress(model, masks), test, world)
        stages["select"] = sel | {"seconds": time.perf_counter() - ts, "ran": True}
        if main:
            sdir.mkdir(parents=True, exist_ok=True)
            atomic_write(sdir / "masks.pt", lambda fh: torch.save(masks, fh))
            _write_json(sdir / "selection.json", stages["select"])
    pruned = compress(model, masks)

    # ---- 3. fine-tune without any penalty --------------------------------------------------
    sdir = out / "finetune"
    if cfg.method == "dense" or cfg.finetune_epochs == 0:
        stages["finetune"] = {"seconds": 0.0, "history": [], "ran": False, "skipped": True}
    elif done["finetune"]:
        pruned.load_state_dict(load_checkpoint(sdir / CHECKPOINT)["model"])
        stages["finetune"] = json.loads((sdir / "done.json").read_text()) | {"ran": False}
    else:
        res = train(pruned, loaders(cfg.seed + 1), test, cfg.train_config("finetune"),
                    resume=cfg.resume, name=f"{cfg.method} finetune")
        stages["finetune"] = {"seconds": res.seconds, "history": res.history, "ran": True}
        if main:
            _write_json(sdir / "done.json", stages["finetune"])
    if world > 1:
        dist.barrier()
    if not main:
        return None

    # ---- 4. report: the saved model, reloaded, is what gets measured -----------------------
    tr = time.perf_counter()
    full_test = test if world == 1 else make_loader(bundle, "test", cfg.eval_batch_size)
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
    latency = {str(b): {"dense": measure_latency(model, input_size, b, device,
                                                 repeats=cfg.latency_repeats),
                        "pruned": measure_latency(reloaded, input_size, b, device,
                                                  repeats=cfg.latency_repeats)}
               for b in cfg.latency_batches}
    timing = {s: stages[s].get("seconds", 0.0) for s in ("train", "select", "finetune")}
    report = R.build_report(cfg, bundle=bundle, input_size=input_size, dense_model=model,
                            pruned_spec=reloaded.spec, reg=reg, stages=stages, accuracy=acc,
                            dense=dense, pruned=small, latency=latency, timing=timing,
                            files={"model": str(path), "report": str(out / REPORT)},
                            world=world)
    report["files"]["plots"] = R.write_plots(report, out)
    report["timings"]["report"] = time.perf_counter() - tr
    report["timings"]["this_call"] = time.perf_counter() - t0
    _write_json(out / REPORT, report)
    if not acc["reload_matches"]:
        log.warning("reloaded model: test acc %.4f, in memory %.4f", acc["test_reloaded"],
                    acc["test_final"])
    return report
