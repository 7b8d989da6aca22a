"""What a pruning method is to the pipeline: training-time hooks, a selection, a report section.

The pipeline (:mod:`nn.pipeline`) runs train -> select -> compress -> fine-tune -> report and
asks the run's :class:`Method` at each stage; it never tests a method's name.  A method module
defines one subclass and registers an instance in :mod:`nn.methods`.

* :meth:`Method.training` -- the module trained in the first stage (the dense model, or a
  wrapper such as the variational gates) and the keyword hooks of :func:`nn.training.train`
  (``extra_loss``, ``after_step``, ``after_backward``, ``epoch_metrics``).
* :meth:`Method.select` -- the masks of the structures removed, and the record of how they
  were chosen.  The default ranks :meth:`Method.scores` and cuts the order by the selection
  rule (:mod:`nn.selection`); a method that decides its own structures overrides it.
* :meth:`Method.section` and :meth:`Method.plots` -- the method's part of the report
  (``report["regularizer"]``) and its figures.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

__all__ = ["Method", "Run", "Training", "writer_pieces", "per_structure"]

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What a method sees of a run: the configuration (:class:`nn.config.RunConfig`), the
    dense ``model`` (seeded initial weights, on ``device``; trained in place unless the method
    wraps it), its ``structures`` (every prunable family) and ``pruned`` (the kinds this run
    prunes), the dense ``macs``/``params``, the data ``bundle``, the DDP ``rank``/``world``,
    the training loader's ``steps_per_epoch``, ``calibration()``: the fixed unaugmented
    training subset that selections evaluate on, and ``progress()``: the bar of a long phase."""

    config: object
    model: torch.nn.Module
    input_size: tuple
    structures: list
    pruned: list
    dense: dict
    bundle: object
    rank: int
    world: int
    device: torch.device
    steps_per_epoch: int

    def calibration(self):
        from nn.evaluation import subset_loader

        c = self.config
        return subset_loader(self.bundle, c.selection.bisect_images, c.optim.eval_batch_size,
                             self.rank, self.world)

    def progress(self, total: int, desc: str):
        """A progress bar for a long phase (e.g. a selection's evaluations): shown on rank 0
        when the run's ``runtime.progress`` is on; with ``desc`` logged as the phase begins
        either way, so a phase never runs in silence."""
        from tqdm.auto import tqdm

        main = self.rank == 0
        if main:
            log.info("%s ...", desc)
        return tqdm(total=total, desc=desc.split(":")[0], leave=False, dynamic_ncols=True,
                    disable=not (main and self.config.runtime.progress))


@dataclass
class Training:
    """The module the first stage trains, its :func:`nn.training.train` hooks, whatever the
    method keeps for its selection and report (``state``), and ``restart_step``: the optimizer
    step at which the training's learning-rate schedule starts again (a method that fixes its
    network there; :mod:`nn.training.schedule`), or None, and ``restart_warmup``: the steps of
    linear warm-up from it."""

    module: torch.nn.Module
    hooks: dict = field(default_factory=dict)
    state: object = None
    restart_step: int | None = None
    restart_warmup: int = 0


class Method:
    """A pruning method (module docstring).  Class attributes:

    ``name``      the registry key and ``--method`` value
    ``summary``   one line for ``--help`` and README
    ``lam``       default strength (None: the method takes none)
    ``options``   the dataclass of the method's own settings (None: it has none)
    ``rule``      the selection rule ``--select auto`` means for it (``bisection`` or
                  ``mac-target``), or None when the method decides its own structures
    ``finetunes`` whether the pruned model is fine-tuned
    ``uses_cost`` whether ``--cost`` changes what it does
    ``score``     the name of its score (reported with the selection)
    ``per_layer`` whether its removal order is per layer (else global)
    ``removes_blocks`` whether it can take ``--remove-blocks`` (remove whole residual blocks)
    ``trains_to_budget`` whether ``--budget`` changes its training (not only its selection)
    """

    name: str = ""
    summary: str = ""
    lam: float | None = None
    options: type | None = None
    rule: str | None = "mac-target"
    finetunes: bool = True
    uses_cost: bool = False
    score: str = ""
    per_layer: bool = False
    removes_blocks: bool = True
    trains_to_budget: bool = False

    def make_options(self, given):
        """The method's options from a dict, an instance or None (defaults); ``ValueError``
        for a field it does not have."""
        if self.options is None:
            if given:
                raise ValueError(f"method {self.name} takes no options, got {given!r}")
            return None
        if isinstance(given, self.options):
            return given
        given = dict(given or {})
        names = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise ValueError(f"method {self.name} has no option {unknown[0]!r}; its options: "
                             f"{', '.join(sorted(names))}")
        return self.options(**given)

    def check(self, config) -> None:
        """Raise ``ValueError`` for a configuration the method cannot run."""

    def training(self, run: Run) -> Training:
        return Training(run.model)

    def score_name(self, run: Run) -> str:
        return self.score

    def scores(self, run: Run, training: Training) -> dict[str, torch.Tensor]:
        """Score of every structure of ``run.pruned`` (float64 CPU tensors; lowest removed
        first)."""
        raise NotImplementedError(f"method {self.name} has no scores")

    def select(self, run: Run, training: Training) -> tuple[dict, dict]:
        from nn.selection import select_by_scores

        return select_by_scores(run, self, self.scores(run, training))

    def section(self, run: Run, training: Training) -> dict | None:
        return None

    def plots(self, report: dict, save, plt, title: str) -> None:
        """Draw the method's own figures with ``save(fig, name)``."""


def writer_pieces(model: torch.nn.Module, family, kind: type) -> list:
    """The writer pieces of ``family`` that are the weight of a ``kind`` module (e.g. the
    conv filters or the BN γ of a structure)."""
    mods = dict(model.named_modules())
    return [p for p in family.writers if p.dim is not None and p.param.endswith(".weight")
            and isinstance(mods[p.param.rsplit(".", 1)[0]], kind)]


def per_structure(model: torch.nn.Module, pieces: list, size: int, fn) -> torch.Tensor:
    """``sum over pieces of fn(slice rows)``: a float64 CPU score per structure, where each
    piece's tensor is viewed as ``size`` rows along its structure axis."""
    params = dict(model.named_parameters())
    out = torch.zeros(size, dtype=torch.float64)
    for p in pieces:
        t = params[p.param].detach().movedim(p.dim, 0).reshape(size, -1)
        out += fn(t).double().cpu()
    return out
