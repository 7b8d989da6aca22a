"""``python -m nn train ...``: the pruning pipeline (nn.pipeline) from the command line.

    python -m nn train --method spr --model resnet20 --data fashion-mnist --quick --out runs/q
    python -m nn train --method l1-filter --mac-target 0.5 --data cifar10 --data-dir data
    torchrun --nproc_per_node 4 -m nn train --method spr --data cifar10 --device cuda

Every option defaults to :class:`nn.pipeline.PipelineConfig`'s field; ``--quick`` applies the
:data:`QUICK` preset first (options given explicitly still win).  Bad arguments, an ``--out``
that already holds a run (without ``--resume``) or a missing dataset: one line on stderr and
exit status 2.  The final report is printed as a table (rank 0).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

from nn.baselines import METHODS, SCORES
from nn.data import DATASETS
from nn.models import MODELS

__all__ = ["main", "QUICK", "build_parser", "config_from_args"]

QUICK = dict(
    data="fashion-mnist", subset=15000, epochs=5, finetune_epochs=2, finetune_lr=0.02,
    tolerance=1.0, bisect_images=4096, latency_repeats=20, preset="quick")
"""``--quick``: a real-data demo on Fashion-MNIST that ends on 2 CPU cores in well under 15
minutes -- a stratified 15k-image training subset, 5 regularised epochs, bisection on 4096
training images with a 1 pp tolerance, 2 fine-tuning epochs (lr 0.02), the full 10k test set;
the penalty keeps PipelineConfig's defaults (tuned on this run)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage otherwise)
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


def _num(name, kind=float, lo=None, strict=False, hi=None):
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be {'an integer' if kind is int else 'a number'}, "
                f"got {text!r}") from None
        if kind is float and not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"{name} must be finite, got {text!r}")
        if lo is not None and (x <= lo if strict else x < lo):
            raise argparse.ArgumentTypeError(
                f"{name} must be {'>' if strict else '>='} {lo}, got {text}")
        if hi is not None and x > hi:
            raise argparse.ArgumentTypeError(f"{name} must be <= {hi}, got {text}")
        return x
    return parse


def _count_or_all(name):
    """An int >= 1, or ``all`` -> None (what the config calls "every one")."""
    count = _num(name, int, 1)

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
    if text in ("params", "macs"):
        return text
    x = _num("--cost", float, 0)(text)
    if x > 1:
        raise argparse.ArgumentTypeError(f"--cost must be params, macs or a MAC share in [0, 1], "
                                         f"got {text}")
    return x


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
        out[k] = _num(f"--synthetic {k}", keys[k], 0, strict=keys[k] is int)(v)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m nn", description="Train, prune, compress and fine-tune "
                "ResNets (mipprune's torch layer).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", argument_default=argparse.SUPPRESS,
                       help="regularised training -> selection -> compress -> fine-tune -> report",
                       description="Defaults: nn.pipeline.PipelineConfig (the published recipe); "
                       "--quick: the Fashion-MNIST demo preset.")
    a = t.add_argument
    a("--quick", action="store_true", help="Fashion-MNIST demo preset (explicit options win)")
    a("--method", choices=METHODS, help="SPR, its big-M ablation or a baseline")
    a("--model", choices=sorted(MODELS))
    a("--width", type=_num("--width", float, 0, True), help="channel multiplier")
    a("--shortcut", choices=("A", "B"), help="option A (pad) or B (1x1 conv)")
    a("--data", choices=tuple(DATASETS))
    a("--data-dir", help="dataset folder (nothing is downloaded)")
    a("--subset", type=_num("--subset", int, 1), help="stratified training subset size")
    a("--synthetic", type=_synthetic, help="make_synthetic keywords, e.g. n_train=256,image_size=8")
    a("--epochs", type=_num("--epochs", int, 1), help="regularised training epochs")
    a("--finetune-epochs", type=_num("--finetune-epochs", int, 0))
    a("--batch-size", type=_num("--batch-size", int, 1), help="global batch (split over ranks)")
    a("--eval-batch-size", type=_num("--eval-batch-size", int, 1))
    a("--lr", type=_num("--lr", float, 0, True))
    a("--finetune-lr", type=_num("--finetune-lr", float, 0, True))
    a("--momentum", type=_num("--momentum", float, 0))
    a("--nesterov", action="store_true")
    a("--weight-decay", type=_num("--weight-decay", float, 0))
    a("--schedule", choices=("cosine", "multistep", "constant"))
    a("--warmup-epochs", type=_num("--warmup-epochs", float, 0))
    a("--lam", type=_num("--lam", float, 0),
      help="SPR/big-M strength, or the variational price of the normalised expected cost "
           "(default 4.5 for spr/bigm, 1.0 for variational)")
    a("--alpha", type=_num("--alpha", float, 0, hi=1), help="ridge share: a = lam alpha n/N")
    a("--M-scale", dest="M_scale", type=_num("--M-scale", float, 0, True))
    a("--cost", type=_cost, help="n_j: params, macs or a MAC share in [0, 1]")
    a("--beyond-M", dest="beyond_M", choices=("extend", "project"))
    a("--reference", help="checkpoint/state_dict whose weights set M (default: initial weights)")
    a("--structures", choices=("filter", "stream", "filter+stream"),
      help="what is pruned and regularised (default: filter)")
    a("--score", choices=SCORES, help="spr/bigm ranking: group norm t_j or z*_j")
    a("--select", choices=("auto", "bisection", "mac-target"),
      help="auto: bisection for spr/bigm, MAC target for l1-filter/slimming")
    a("--tolerance", type=_num("--tolerance", float, 0, hi=100),
      help="allowed training-accuracy drop, percentage points")
    a("--bisect-images", type=_num("--bisect-images", int, 1))
    a("--mac-target", type=_num("--mac-target", float, 0, True, hi=1),
      help="fraction of dense MACs to keep")
    a("--slimming-lambda", type=_num("--slimming-lambda", float, 0))
    a("--beta", type=_num("--beta", float, 0, hi=1),
      help="variational: params share of the cost (1 - beta: MACs)")
    a("--gamma", type=_num("--gamma", float, 0),
      help="variational: extra price of depth, E[blocks]/B")
    a("--theta-lr", dest="theta_lr", type=_num("--theta-lr", float, 0, True),
      help="variational: projected-SGD step on the gate probabilities")
    a("--estimator", choices=("st", "reinforce", "flip"),
      help="variational: gradient estimator: flip (default: exact per-gate differences, "
           "unbiased, one extra partial forward per gate flipped), st (straight-through: "
           "free, biased) or reinforce (unbiased, high variance)")
    a("--flip-units", dest="flip_units", type=_count_or_all("--flip-units"),
      help="variational, flip: unit gates flipped per step, or 'all'")
    a("--flip-blocks", dest="flip_blocks", type=_count_or_all("--flip-blocks"),
      help="variational, flip: block gates flipped per step, or 'all'")
    a("--gate-warmup-epochs", dest="gate_warmup_epochs",
      type=_num("--gate-warmup-epochs", float, 0), help="variational: epochs before theta moves")
    a("--theta-init", dest="theta_init", type=_num("--theta-init", float, 0, True, hi=1),
      help="variational: initial keep probability of every gate")
    a("--device", help="auto, cpu, cuda, cuda:N")
    a("--amp", choices=("auto", "on", "off", "bf16", "fp16"))
    a("--channels-last", action="store_true")
    a("--compile", action="store_true")
    a("--seed", type=_num("--seed", int, 0))
    a("--out", help="run folder (stages, checkpoints, report, pruned.pt)")
    a("--resume", action="store_true", help="continue the run in --out, skipping done stages")
    a("--no-progress", dest="progress", action="store_false")
    a("--threads", type=_num("--threads", int, 1), help="torch CPU threads")
    a("--latency-batches", type=_batches, help="e.g. 1,64 ('' for none)")
    a("--latency-repeats", type=_num("--latency-repeats", int, 1))
    _document_defaults(t)
    return p


def _document_defaults(parser: argparse.ArgumentParser) -> None:
    """Append each option's default (PipelineConfig's field) and quick value to its help."""
    import dataclasses

    from nn.pipeline import PipelineConfig

    fields = {f.name: f.default for f in dataclasses.fields(PipelineConfig)}
    for act in parser._actions:
        if act.dest not in fields or isinstance(act, argparse._StoreTrueAction):
            continue
        text = f"default {fields[act.dest]!r}"
        if act.dest in QUICK and QUICK[act.dest] != fields[act.dest]:
            text += f", --quick {QUICK[act.dest]!r}"
        act.help = f"{act.help}; {text}" if act.help else text


def config_from_args(ns: argparse.Namespace):
    """PipelineConfig: defaults <- preset (``--quick``) <- explicit options."""
    from nn.pipeline import PipelineConfig

    given = {k: v for k, v in vars(ns).items() if k not in ("command", "quick")}
    if "structures" in given:
        given["structures"] = tuple(given["structures"].split("+"))
    kwargs = {**(QUICK if getattr(ns, "quick", False) else {}), **given}
    return PipelineConfig(**kwargs)


def main(argv=None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
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
    except (ConfigError, FileNotFoundError) as e:
        parser.error(str(e))
    if report is not None:
        print(format_table(report), flush=True)
    return 0
