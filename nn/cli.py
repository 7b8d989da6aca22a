"""``python -m nn train ...``: the pruning pipeline (:mod:`nn.pipeline`) from the command line.

    python -m nn train --method spr --model resnet20 --data fashion-mnist --quick --out runs/q
    python -m nn train --method l1-filter --mac-target 0.5 --data cifar10 --data-dir data
    torchrun --nproc_per_node 4 -m nn train --method spr --data cifar10 --device cuda

Options are flat; each lands in one field of the nested :class:`nn.config.RunConfig` (the
:data:`OPTIONS` table says where), and ``--help`` prints that field's default.  ``--quick``
applies the :data:`QUICK` preset first (options given explicitly still win).  A method's own
options (``--alpha`` for spr and bigm, ``--theta-lr`` for variational, ...) are an error with
another method.  Old spellings keep working: ``--cost params|macs|SHARE``, ``--beta B``
(params share B, MACs 1 - B), ``--gamma G`` (blocks weight G), ``--slimming-lambda X``
(``--lam X``).  Bad arguments, an ``--out`` that already holds a run (without ``--resume``), a
missing or damaged dataset or weights file, a device or precision this machine lacks, data too
small for the batch, a loss that stops being finite (:class:`nn.training.NonFiniteError`) --
any :class:`nn.checks.ConfigError` -- or a file the run cannot read or write: one line on
stderr and exit status 2.  The final report is printed as a table.

One concept, the ``train`` command line: its option table, the parsers of its values, and how
flags become a :class:`~nn.config.RunConfig` -- the table and the translation change together.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from nn.checks import argtype
from nn.cost import CostConfig, parse_cost
from nn.latency.cli import add_latency_parser, run_latency_table
from nn.methods import METHODS, get_method

__all__ = ["main", "QUICK", "OPTIONS", "build_parser", "config_from_args"]

QUICK = {"data": {"subset": 15000}, "optim": {"epochs": 5, "finetune_epochs": 2,
                                             "finetune_lr": 0.02},
         "selection": {"tolerance": 1.0, "bisect_images": 4096},
         "runtime": {"latency_repeats": 20}}
"""``--quick``: a real-data demo on Fashion-MNIST sized for a 2-core CPU -- a stratified
15k-image training subset, 5 regularised epochs, bisection on 4096
training images with a 1 pp tolerance, 2 fine-tuning epochs (lr 0.02), the full 10k test set;
the method keeps its defaults."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage otherwise)
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


def _on_off(name):
    """``on`` -> True, ``off`` -> False."""
    def parse(text):
        if text not in ("on", "off"):
            raise argparse.ArgumentTypeError(f"{name} must be 'on' or 'off', got {text!r}")
        return text == "on"
    return parse


def _count_or_all(name):
    """An int >= 1, or ``all`` -> None (what the options call "every one")."""
    count = argtype(name, int, 1)

    def parse(text):
        if text == "all":
            return None
        try:
            return count(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= 1 or 'all', "
                                             f"got {text!r}") from None
    return parse


def _cost(text):
    """``key=value`` items (:func:`nn.cost.parse_cost`; only the keys given), or an old
    spelling: ``params``, ``macs`` or a MAC share in [0, 1] (the rest on parameters)."""
    if text in ("params", "macs", "latency"):
        return {"macs": float(text == "macs"), "params": float(text == "params"),
                "latency": float(text == "latency")}
    if "=" not in text:
        share = argtype("--cost", float, 0, hi=1)(text)
        return {"macs": share, "params": 1 - share}
    try:
        return parse_cost(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _batches(text):
    try:
        out = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--latency-batches must be comma-separated ints, "
                                         f"got {text!r}") from None
    if any(b < 1 for b in out):
        raise argparse.ArgumentTypeError(f"--latency-batches must be >= 1, got {text!r}")
    return out


def _synthetic(text):
    keys = {"n_train": int, "n_test": int, "image_size": int, "channels": int,
            "num_classes": int, "noise": float}
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        k, _, v = item.partition("=")
        if k not in keys or not v:
            raise argparse.ArgumentTypeError(f"--synthetic takes key=value items with keys "
                                             f"{', '.join(keys)}; got {item!r}")
        out[k] = argtype(f"--synthetic {k}", keys[k], 0, strict=keys[k] is int)(v)
    return out


# flag -> (part, field, argparse keywords); "options" fields belong to the chosen method
OPTIONS = {
    "--method": ("method", "name", dict(choices=METHODS, help="pruning method")),
    "--model": ("model", "name", dict(help="resnet20/32/44/56/110, resnet18/34/50")),
    "--weights": ("model", "weights", dict(help="state_dict file to start from (e.g. a "
                  "torchvision ResNet checkpoint); spr's M is then taken from it")),
    "--width": ("model", "width", dict(type=argtype("--width", float, 0, True),
                                       help="channel multiplier")),
    "--shortcut": ("model", "shortcut", dict(choices=("A", "B"),
                                             help="option A (pad) or B (1x1 conv)")),
    "--data": ("data", "name", dict(help="fashion-mnist, cifar10, cifar100, imagenet, "
                                         "synthetic")),
    "--data-dir": ("data", "dir", dict(help="dataset folder (nothing is downloaded)")),
    "--subset": ("data", "subset", dict(type=argtype("--subset", int, 1),
                                        help="stratified training subset size")),
    "--synthetic": ("data", "synthetic", dict(type=_synthetic, help="make_synthetic "
                                              "keywords, e.g. n_train=256,image_size=8")),
    "--epochs": ("optim", "epochs", dict(type=argtype("--epochs", int, 1),
                                         help="regularised training epochs")),
    "--finetune-epochs": ("optim", "finetune_epochs",
                          dict(type=argtype("--finetune-epochs", int, 0))),
    "--batch-size": ("optim", "batch_size", dict(type=argtype("--batch-size", int, 1),
                                                 help="global batch (split over ranks)")),
    "--eval-batch-size": ("optim", "eval_batch_size",
                          dict(type=argtype("--eval-batch-size", int, 1))),
    "--lr": ("optim", "lr", dict(type=argtype("--lr", float, 0, True))),
    "--finetune-lr": ("optim", "finetune_lr", dict(type=argtype("--finetune-lr", float, 0, True))),
    "--momentum": ("optim", "momentum", dict(type=argtype("--momentum", float, 0))),
    "--nesterov": ("optim", "nesterov", dict(action="store_true")),
    "--weight-decay": ("optim", "weight_decay", dict(type=argtype("--weight-decay", float, 0))),
    "--schedule": ("optim", "schedule", dict(choices=("cosine", "multistep", "constant"))),
    "--warmup-epochs": ("optim", "warmup_epochs", dict(type=argtype("--warmup-epochs", float, 0),
                                                       help="linear lr warm-up")),
    "--lam": ("method", "lam", dict(type=argtype("--lam", float, 0),
                                    help="the method's strength")),
    "--structures": ("method", "structures", dict(
        choices=("filter", "stream", "filter+stream"), help="what is pruned and regularised")),
    "--cost": ("method", "cost", dict(type=_cost, help="price of a structure (spr, bigm, "
               "variational): weights of macs, params, blocks, latency (a structure's marginal "
               "latency from the latency table) and the basis saved|own, e.g. "
               "macs=0.5,params=0.5,blocks=0,basis=saved (basis own, params=1, macs=0: the SPR "
               "authors' own-parameter weighting; 'latency': latency=1 alone)")),
    "--beta": ("method", "cost", dict(type=argtype("--beta", float, 0, hi=1), help="old spelling: "
               "--cost params=B,macs=1-B")),
    "--gamma": ("method", "cost", dict(type=argtype("--gamma", float, 0),
                                       help="old spelling: --cost blocks=G")),
    "--slimming-lambda": ("method", "lam", dict(type=argtype("--slimming-lambda", float, 0),
                                                help="old spelling of --lam for slimming")),
    "--alpha": ("options", "alpha", dict(type=argtype("--alpha", float, 0, hi=1),
                                         help="ridge share: a = lam alpha cost")),
    "--M-scale": ("options", "M_scale", dict(type=argtype("--M-scale", float, 0, True),
                                             help="M = M_scale max|w|")),
    "--beyond-M": ("options", "beyond_M", dict(choices=("extend", "project"))),
    "--reference": ("options", "reference", dict(
        help="checkpoint/state_dict whose weights set M (default: the initial weights)")),
    "--group": ("options", "group", dict(type=argtype("--group", int, 1), help="structures per "
                "SPR group or gate, trained and kept together (pair with --granularity)")),
    "--score": ("options", "score", dict(choices=("norm", "z"),
                                         help="ranking: group norm t_j or z*_j")),
    "--theta-lr": ("options", "theta_lr", dict(type=argtype("--theta-lr", float, 0, True),
                   help="projected-SGD step on the gate probabilities")),
    "--estimator": ("options", "estimator", dict(
        choices=("batched", "st", "reinforce", "flip"), help="gradient estimator: batched "
        "(--flip-units + --flip-blocks gates flipped on a ghost batch of --flip-samples in one "
        "extra pass, averaged per gate), flip (exact per-gate differences on the batch, one "
        "extra partial forward per gate flipped), st (straight-through: free, biased) or "
        "reinforce (unbiased, high variance)")),
    "--flip-samples": ("options", "flip_samples", dict(type=argtype("--flip-samples", int, 1),
                       help="batched: the ghost batch the gates are flipped on")),
    "--flip-units": ("options", "flip_units", dict(type=_count_or_all("--flip-units"),
                     help="unit gates flipped per step, or 'all'")),
    "--flip-blocks": ("options", "flip_blocks", dict(type=_count_or_all("--flip-blocks"),
                      help="block gates flipped per step, or 'all'")),
    "--budget-lam": ("options", "budget_lam", dict(
        choices=("project", "fixed"), help="variational with --budget: project (lam is the "
        "budget's multiplier, each theta step kept within it) or fixed (--lam; the selection "
        "alone meets the budget)")),
    "--budget-ramp": ("options", "budget_ramp", dict(
        type=argtype("--budget-ramp", float, 0, hi=1), help="variational with --budget: share "
        "of the training after the warm-up over which its limit glides to the budget")),
    "--budget-freeze": ("options", "budget_freeze", dict(
        type=argtype("--budget-freeze", float, 0, hi=1), help="variational with --budget: "
        "share of the training after the warm-up at which the gates are fixed to the budget's "
        "selection, the rest training that network (1: never)")),
    "--rewind-lr": ("options", "rewind_lr", dict(
        type=_on_off("--rewind-lr"), metavar="{on,off}", help="variational with --budget: "
        "the learning-rate schedule starts again when the gates are fixed (--budget-freeze), "
        "so the fixed network trains on a whole schedule over the steps left")),
    "--rewind-warmup-epochs": ("options", "rewind_warmup_epochs", dict(
        type=argtype("--rewind-warmup-epochs", float, 0), help="variational with --budget and "
        "--rewind-lr on: epochs of linear learning-rate warm-up from that restart")),
    "--gate-warmup-epochs": ("options", "gate_warmup_epochs", dict(
        type=argtype("--gate-warmup-epochs", float, 0), help="epochs before theta moves")),
    "--theta-init": ("options", "theta_init", dict(type=argtype("--theta-init", float, 0, True,
                     hi=1), help="initial keep probability of every gate")),
    "--select": ("selection", "rule", dict(choices=("auto", "bisection", "mac-target"),
                 help="auto: the method's own rule")),
    "--tolerance": ("selection", "tolerance", dict(type=argtype("--tolerance", float, 0, hi=100),
                    help="allowed training-accuracy drop, percentage points")),
    "--bisect-images": ("selection", "bisect_images", dict(
        type=argtype("--bisect-images", int, 1), help="calibration images")),
    "--mac-target": ("selection", "mac_target", dict(
        type=argtype("--mac-target", float, 0, True, hi=1), help="fraction of dense MACs kept")),
    "--importance": ("options", "importance", dict(
        choices=("l1", "l2"), help="tp-magnitude: the group magnitude norm")),
    "--round-to": ("options", "round_to", dict(
        type=argtype("--round-to", int, 1), help="tp methods: pruned layers keep a multiple "
        "of this many channels")),
    "--budget": ("selection", "budget", dict(help="stated budget met exactly by the MILP "
                 "selection: macs=F, params=F, latency=F (fractions of dense) or latency=Xms")),
    "--granularity": ("selection", "granularity", dict(
        type=argtype("--granularity", int, 1), help="budget: kept counts are multiples of G")),
    "--remove-blocks": ("selection", "remove_blocks", dict(
        action="store_true", help="budget: whole residual blocks may be removed")),
    "--depth": ("selection", "depth", dict(
        choices=("search", "value"), help="budget with --remove-blocks: how many blocks go -- "
        "search: the exact optimum at every depth, the most accurate on the calibration "
        "images wins; value: the one optimum of the summed scores")),
    "--latency-table": ("selection", "latency_table", dict(
        help="budget latency: the table to read (default: measured now, or the cached one)")),
    "--device": ("runtime", "device", dict(help="auto, cpu, cuda, cuda:N")),
    "--amp": ("runtime", "amp", dict(choices=("auto", "on", "off", "bf16", "fp16"))),
    "--channels-last": ("runtime", "channels_last", dict(action="store_true")),
    "--compile": ("runtime", "compile", dict(action="store_true")),
    "--seed": ("runtime", "seed", dict(type=argtype("--seed", int, 0))),
    "--out": ("runtime", "out", dict(help="run folder (stages, checkpoints, report, "
                                          "pruned.pt)")),
    "--resume": ("runtime", "resume", dict(action="store_true",
                                           help="continue the run in --out")),
    "--no-progress": ("runtime", "progress", dict(action="store_false",
                                                  help="hide progress bars")),
    "--threads": ("runtime", "threads", dict(type=argtype("--threads", int, 1),
                                             help="torch CPU threads")),
    "--latency-batches": ("runtime", "latency_batches", dict(
        type=_batches, help="batch sizes timed, e.g. 1,64 ('' for none)")),
    "--latency-repeats": ("runtime", "latency_repeats",
                          dict(type=argtype("--latency-repeats", int, 1))),
}
_ALIASES = {"--beta", "--gamma", "--slimming-lambda"}
_UNSET = {"--shortcut": "the model's published choice (A for CIFAR, B for ImageNet ResNets)",
          "--data-dir": "the dataset's standard folder", "--subset": "the whole training set",
          "--threads": "torch's own", "--reference": None, "--synthetic": "make_synthetic's",
          "--flip-units": "all", "--flip-blocks": "all"}
"""What a default of None means, per option (None: the help text says it already)."""


def _owners(field: str) -> list[str]:
    """The methods whose options have ``field``."""
    return [m for m in METHODS if get_method(m).options is not None
            and field in {f.name for f in dataclasses.fields(get_method(m).options)}]


def _default_text(flag: str) -> str:
    """Where the default comes from, printed once in ``--help``."""
    from nn.config import RunConfig

    part, name, kw = OPTIONS[flag]
    if flag in _ALIASES or kw.get("action") in ("store_true", "store_false"):
        return ""
    if part == "options":
        owners = _owners(name)
        cls = get_method(owners[0]).options
        value = {f.name: f.default for f in dataclasses.fields(cls)}[name]
        text = f"{', '.join(owners)}" + ("" if value is None and _UNSET.get(flag) is None
                                          else f"; default {_shown(flag, value)}")
    elif (part, name) == ("method", "lam"):
        text = "default " + ", ".join(f"{m} {get_method(m).lam:g}" for m in METHODS
                                      if get_method(m).lam is not None)
    elif (part, name) == ("method", "cost"):
        text = f"default {CostConfig().formula()}"
    else:
        value = getattr(getattr(RunConfig(), part), name)
        if value is None and _UNSET.get(flag) is None:
            return ""
        text = f"default {'+'.join(value) if name == 'structures' else _shown(flag, value)}"
    quick = QUICK.get(part, {}).get(name)
    return text + (f"; --quick {quick!r}" if quick is not None else "")


def _shown(flag: str, value) -> str:
    if value is None:
        return _UNSET[flag]
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return "on" if value else "off"
    return repr(value)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m nn", description="Train, prune, compress and fine-tune "
                "ResNets (mipprune's torch layer).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", argument_default=argparse.SUPPRESS,
                       help="training -> selection -> compress -> fine-tune -> report",
                       description="Methods: " + "; ".join(
                           f"{m}: {get_method(m).summary}" for m in METHODS))
    t.add_argument("--quick", action="store_true",
                   help="Fashion-MNIST demo preset (explicit options win)")
    for flag, (part, name, kw) in OPTIONS.items():
        extra = _default_text(flag)
        help_text = "; ".join(x for x in (kw.get("help"), extra) if x)
        if kw.get("action") is None and "choices" not in kw and "metavar" not in kw:
            kw = kw | {"metavar": flag.lstrip("-").upper().replace("-", "_")}
        t.add_argument(flag, dest=flag, **(kw | {"help": help_text or None}))
    add_latency_parser(sub)
    return p


def config_from_args(ns: argparse.Namespace):
    """:class:`~nn.config.RunConfig`: defaults <- preset (``--quick``) <- explicit options.
    ``ValueError`` (one line) for a combination that cannot run."""
    from nn.config import RunConfig

    given = {k: v for k, v in vars(ns).items() if k.startswith("--")}
    quick = getattr(ns, "quick", False)
    parts = {part: dict(QUICK.get(part, {})) if quick else {} for part in
             ("data", "model", "optim", "selection", "runtime")}
    method = {"cost": {}, "options": {}}
    for alias, real in (("--slimming-lambda", "--lam"), ("--beta", "--cost"),
                        ("--gamma", "--cost")):
        if alias in given and real in given:
            raise ValueError(f"{alias} is an old spelling of {real}: give one of them")
    for flag, value in given.items():
        part, name, _ = OPTIONS[flag]
        if flag == "--beta":
            method["cost"] |= {"params": value, "macs": 1 - value}
        elif flag == "--gamma":
            method["cost"]["blocks"] = value
        elif part == "options":
            method["options"][name] = (flag, value)
        elif part == "method":
            method[name] = value if name != "cost" else method["cost"] | value
        else:
            parts[part][name] = value
    name = method.get("name", RunConfig().method.name)
    chosen = get_method(name)
    opts = {}
    for field, (flag, value) in method.pop("options").items():
        if name not in _owners(field):
            raise ValueError(f"{flag} is an option of {', '.join(_owners(field))}, not of "
                             f"--method {name}")
        opts[field] = value
    if chosen.lam is None and "lam" in method:
        raise ValueError(f"--lam: method {name} takes no strength")
    if method["cost"] and not chosen.uses_cost:
        raise ValueError(f"--cost: method {name} does not read a cost")
    rule = parts["selection"].get("rule", "auto")
    if rule == "auto":
        rule = "budget" if parts["selection"].get("budget") else chosen.rule
    for flag, needs in (("--mac-target", "mac-target"), ("--tolerance", "bisection")):
        if flag in given and rule != needs:
            raise ValueError(f"{flag} is read by the {needs} rule only, and this run selects "
                             f"by {rule or 'the method itself'}: add --select {needs}"
                             + (" or state --budget macs=F" if needs == "mac-target" else ""))
    if "structures" in method:
        method["structures"] = tuple(method["structures"].split("+"))
    method["cost"] = dataclasses.replace(CostConfig(), **method["cost"])
    method["options"] = opts
    return RunConfig(**parts, method=method, preset="quick" if quick else None)


def main(argv=None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command == "latency-table":
        return run_latency_table(ns, parser)
    try:
        cfg = config_from_args(ns)
    except ValueError as e:
        parser.error(str(e))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from nn.pipeline import ConfigError, run_pipeline
    from nn.report import format_table

    try:
        report = run_pipeline(cfg)
    except (ConfigError, OSError) as e:  # a run that cannot go on; a file it cannot read/write
        parser.error(str(e))
    if report is not None:
        print(format_table(report), flush=True)
    return 0
