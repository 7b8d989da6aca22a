"""The configuration of one pruning run, nested by concern.

    RunConfig(data=DataConfig(...), model=ModelConfig(...), optim=OptimConfig(...),
              method=MethodConfig(...), selection=SelectionConfig(...), runtime=RuntimeConfig(...))

Every default has one home: the field here, or -- for what only one pruning method reads --
that method's options dataclass (``nn.methods``; e.g. SPR's ``alpha``), and its default
strength ``lam``.  Each part validates itself at construction (``ValueError`` naming the bad
value and what is allowed); :class:`RunConfig` then checks what spans parts (the training
stages' :class:`~nn.training.TrainConfig`, the method's options).  ``to_dict`` gives plain
JSON (written as ``config.json`` and into the report; a resumed run must match it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from nn.checks import (FLOAT32_MAX, ConfigError, choice, existing_file, integer, max_threads,
                       number)
from nn.cost import CostConfig
from nn.data import DATASETS
from nn.models import MODELS
from nn.training import TrainConfig

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "MethodConfig",
           "SelectionConfig", "RuntimeConfig", "RunConfig", "RULES", "KINDS_PRUNED"]

RULES = ("auto", "bisection", "mac-target", "budget")
DEPTH_RULES = ("search", "value")  # how a budgeted selection with removable blocks picks its depth
"""Selection rules: ``auto`` is ``budget`` when a budget is given, else the method's own
(:attr:`nn.methods.Method.rule`)."""
KINDS_PRUNED = (("filter",), ("stream",), ("filter", "stream"))


def _bad(name, value, want):
    raise ValueError(f"{name} must be {want}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """``name`` of :data:`nn.data.DATASETS`; ``dir`` its folder (never downloaded); ``subset``
    a stratified training subset; ``synthetic`` keywords of ``nn.data.make_synthetic``."""

    name: str = "fashion-mnist"
    dir: str | None = None
    subset: int | None = None
    synthetic: dict | None = None

    def __post_init__(self):
        choice("data", self.name, DATASETS)
        if self.subset is not None:
            integer("subset", self.subset, 1)
        if self.synthetic is not None and (self.name != "synthetic"
                                           or not isinstance(self.synthetic, dict)):
            _bad("synthetic", self.synthetic, "a dict of make_synthetic keywords, with "
                 "data 'synthetic'")


@dataclass(frozen=True)
class ModelConfig:
    """``name`` of :data:`nn.models.MODELS`, channel multiplier ``width``, ``shortcut`` A or B
    (None: the architecture's published choice), ``weights`` a state_dict file to start from
    (None: random initialisation, seeded)."""

    name: str = "resnet20"
    width: float = 1.0
    shortcut: str | None = None
    weights: str | None = None

    def __post_init__(self):
        choice("model", self.name, MODELS)
        number("width", self.width, 0, 64, open_lo=True)
        choice("shortcut", self.shortcut, (None, "A", "B"))
        if self.weights is not None:
            existing_file("weights", self.weights)


@dataclass(frozen=True)
class OptimConfig:
    """SGD for both training stages: the published CIFAR recipe (300 regularised + 200
    fine-tuning epochs, lr 0.1 / 0.01, momentum 0.9, batch 128, weight decay 5e-4, cosine).
    ``batch_size`` is global (split over DDP ranks)."""

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

    def __post_init__(self):
        integer("finetune_epochs", self.finetune_epochs, 0)
        integer("eval_batch_size", self.eval_batch_size, 1)
        for name in ("lr", "finetune_lr", "weight_decay"):  # torch multiplies float32 by them
            number(name, getattr(self, name), 0, FLOAT32_MAX, open_lo=name != "weight_decay")


@dataclass(frozen=True)
class MethodConfig:
    """``name`` of the method registry (:data:`nn.methods.METHODS`); ``lam`` its strength
    (None: the method's default); ``structures`` the kinds pruned (and regularised);
    ``cost`` the price of size (:class:`nn.cost.CostConfig`, for methods that read it);
    ``options`` the method's own settings (a dict, or its options dataclass), validated by
    the method."""

    name: str = "spr"
    lam: float | None = None
    structures: tuple = ("filter",)
    cost: CostConfig = field(default_factory=CostConfig)
    options: object = None

    def __post_init__(self):
        from nn.methods import get_method  # the registry imports this module's siblings

        method = get_method(self.name)
        kinds = tuple(self.structures) if isinstance(self.structures, (list, tuple)) else ()
        if kinds not in KINDS_PRUNED:
            _bad("structures", self.structures, " or ".join(map(str, KINDS_PRUNED)))
        object.__setattr__(self, "structures", kinds)
        if isinstance(self.cost, dict):
            object.__setattr__(self, "cost", CostConfig(**self.cost))
        if not isinstance(self.cost, CostConfig):
            _bad("cost", self.cost, "a CostConfig")
        if self.lam is None:
            object.__setattr__(self, "lam", method.lam)
        elif method.lam is None:
            raise ValueError(f"method {self.name} takes no lam (got {self.lam!r})")
        if self.lam is not None:
            number("lam", self.lam, 0)
        object.__setattr__(self, "options", method.make_options(self.options))

    @property
    def method(self):
        from nn.methods import get_method

        return get_method(self.name)

    def to_dict(self) -> dict:
        opts = self.options
        return {"name": self.name, "lam": self.lam, "structures": list(self.structures),
                "cost": self.cost.to_dict(),
                "options": dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else None}


@dataclass(frozen=True)
class SelectionConfig:
    """How scores become masks: ``rule`` (:data:`RULES`); ``tolerance`` the allowed
    training-accuracy drop in percentage points (bisection) over ``bisect_images``
    unaugmented training images (also the variational pruner's BN recalibration set);
    ``mac_target`` the fraction of dense MACs kept (MAC target); ``budget`` a stated budget
    (:class:`nn.budget.Budget` text: ``macs=0.4``, ``params=0.3``, ``latency=0.5``,
    ``latency=12ms``) met exactly by the OR layer's selection, with kept counts from multiples
    of ``granularity`` and, with ``remove_blocks``, whole blocks removable; ``depth`` how many
    blocks go (:data:`DEPTH_RULES`: ``search`` -- the exact optimum at every depth, the one most
    accurate on the calibration images wins; ``value`` -- the single optimum of the value
    model); ``latency_table`` the table a latency budget reads (None: measured, or found in the
    cache)."""

    rule: str = "auto"
    tolerance: float = 0.5
    bisect_images: int = 5000
    mac_target: float = 0.5
    budget: str | None = None
    granularity: int = 1
    remove_blocks: bool = False
    depth: str = "search"
    latency_table: str | None = None

    def __post_init__(self):
        from nn.budget import Budget

        choice("select", self.rule, RULES)
        number("tolerance", self.tolerance, 0, 100)
        number("mac_target", self.mac_target, 0, 1, open_lo=True)
        integer("bisect_images", self.bisect_images, 1)
        integer("granularity", self.granularity, 1)
        choice("depth", self.depth, DEPTH_RULES)
        if self.depth != "search" and not self.remove_blocks:
            raise ValueError(f"depth {self.depth!r} chooses how many blocks are removed: give "
                             f"remove_blocks (--remove-blocks) too")
        if self.budget is not None:
            object.__setattr__(self, "budget", str(Budget.parse(self.budget)))
        if self.latency_table is not None:  # read now: a bad file fails before training
            from nn.latency.files import load_table

            load_table(existing_file("latency_table", self.latency_table))
        if self.rule not in ("auto", "budget") and self.budget is not None \
                or self.rule == "budget" and self.budget is None:
            raise ValueError(f"select {self.rule} and budget {self.budget!r} do not go "
                             f"together: a budget is met by --select budget (or auto)")
        if self.budget is None and (self.remove_blocks or self.granularity != 1
                                    or self.latency_table):
            raise ValueError("remove_blocks, granularity and latency_table shape a budgeted "
                             "selection: give a budget (--budget)")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how a run executes; none of it changes what is computed on CPU, so a resumed
    run may change any of it except ``seed``.  ``threads``: at most the machine's logical CPUs;
    ``out``: a folder, new or holding a run.  ``latency_batches``: batch sizes timed in the
    report (empty: none), each the median of ``latency_repeats`` runs."""

    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False
    threads: int | None = None
    seed: int = 0
    out: str = "runs/pipeline"
    resume: bool = False
    progress: bool = True
    latency_batches: tuple = (1, 64)
    latency_repeats: int = 30

    def __post_init__(self):
        if self.threads is not None:
            integer("threads", self.threads, 1, max_threads())
        if Path(self.out).exists() and not Path(self.out).is_dir():
            _bad("out", self.out, "a folder (new, or holding a run), not a file")
        integer("latency_repeats", self.latency_repeats, 1)
        lb = tuple(self.latency_batches) if isinstance(self.latency_batches,
                                                       (list, tuple)) else None
        if lb is None or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0
                                 for b in lb):
            _bad("latency_batches", self.latency_batches, "ints >= 1 (empty: no latency)")
        object.__setattr__(self, "latency_batches", tuple(b for b in lb if b > 0))

    RESUME_FREE = ("device", "amp", "channels_last", "compile", "threads", "out", "resume",
                   "progress", "latency_batches", "latency_repeats")


_PARTS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
          "method": MethodConfig, "selection": SelectionConfig, "runtime": RuntimeConfig}


@dataclass(frozen=True)
class RunConfig:
    """One run: its parts (plain dicts are accepted for each) and the ``preset`` it came from
    (informational, e.g. ``"quick"``)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    preset: str | None = None

    def __post_init__(self):
        for name, kind in _PARTS.items():
            part = getattr(self, name)
            if isinstance(part, dict):
                object.__setattr__(self, name, kind(**part))
            elif not isinstance(part, kind):
                _bad(name, part, f"a {kind.__name__} or a dict of its fields")
        self.method.method.check(self)  # what the method cannot run with (ValueError)
        self.train_config("train", False)
        if self.optim.finetune_epochs:
            self.train_config("finetune", False)

    def to_dict(self) -> dict:
        out = {name: (getattr(self, name).to_dict() if name == "method"
                      else dataclasses.asdict(getattr(self, name))) for name in _PARTS}
        out["runtime"]["latency_batches"] = list(self.runtime.latency_batches)
        out["preset"] = self.preset
        return out

    def train_config(self, stage: str, checkpoints: bool = True) -> TrainConfig:
        """The :class:`~nn.training.TrainConfig` of stage ``"train"`` or ``"finetune"``
        (checkpoints under ``out/stage``)."""
        o, r, ft = self.optim, self.runtime, stage == "finetune"
        return TrainConfig(
            epochs=o.finetune_epochs if ft else o.epochs, lr=o.finetune_lr if ft else o.lr,
            momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay,
            schedule=o.schedule, warmup_epochs=0 if ft else o.warmup_epochs,
            batch_size=o.batch_size, device=r.device, amp=r.amp,
            channels_last=r.channels_last, compile=r.compile, seed=r.seed + (1 if ft else 0),
            out_dir=str(Path(r.out) / stage) if checkpoints else None, progress=r.progress)
