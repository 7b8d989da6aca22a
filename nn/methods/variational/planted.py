"""A planted problem for the variational pruner (DESIGN §6): a teacher with known units and blocks
embedded in a student full of distractors; :func:`run` trains the pruner on it and says whether
it recovered the teacher's structure.  ``tests/test_nn_planted.py`` asserts it on a few seeds,
``benchmarks/planted_seeds.py`` counts the seeds recovered per estimator.

**Teacher.**  A one-stage CIFAR-style ResNet, ``ResNet(BasicBlock, (3,), (8,), "cifar", 4, 1,
shortcut="A")`` on 1x8x8 Gaussian-noise images, with a planted structure: block ``layer1.0``
keeps 3 of its 8 conv1 units, ``layer1.2`` keeps 2 (positions drawn per seed), block ``layer1.1``
is removed (the rest zeroed by :func:`nn.models.apply_masks_`; a zeroed branch is the identity).
Label-invariant rescalings make it well posed: the stream-writing BNs and the conv2 weights are
multiplied by ``SIGNAL`` (``relu`` is positively homogeneous and bn2 normalises conv2, so only the
logits scale), BN statistics are calibrated on the input distribution, the fc bias is balanced
so the 4 classes are equally frequent, and only inputs whose teacher margin is in the top 20% of
their class are used, with the logits scaled so those margins are >= 2 nats.

**Student.**  The same architecture with every unit and block live: the teacher's weights, plus
*distractors* at the standard initialisation (kaiming convs, BN gamma 1 / beta 0) in the 5 + 6
unused units and in the whole branch of ``layer1.1``.  Embedding the teacher (instead of
training from scratch) makes the structure identifiable.

**Parameters.**  ``lam = 0.5``, ``beta = 0.5``, ``gamma = 0.5``, ``theta_lr = 0.02``
(preconditioned), no warm-up, weight ``lr = 0.001``, 12 epochs of 32 batches of 64.
"""

from __future__ import annotations

import torch

from nn.cost import CostConfig
from nn.methods.variational.gated import GatedResNet
from nn.methods.variational.method import VariationalOptions, hooks, recalibrate_bn
from nn.models import BasicBlock, ResNet, apply_masks_, compress

__all__ = ["make_teacher", "make_student", "sample", "labels", "calibrate", "Batches", "run",
           "PLANTED_UNITS", "REMOVED_BLOCKS", "BLOCKS"]

WIDTH, LAYERS, SIZE, CLASSES = 8, (3,), (1, 8, 8), 4
PLANTED_UNITS = {"layer1.0.conv1": 3, "layer1.2.conv1": 2}
REMOVED_BLOCKS = ("layer1.1",)
BLOCKS = tuple(f"layer1.{b}" for b in range(LAYERS[0]))
SIGNAL = 3.0     # teacher structures vs distractors at standard init
TOP = 0.8        # keep inputs whose teacher margin is above this quantile of their class
MARGIN = 2.0     # logit scale: the kept inputs' margins are >= this many nats
N_TRAIN, N_TEST, BATCH = 2048, 1024, 64
LAM, BETA, GAMMA, THETA_LR, WARMUP, EPOCHS, LR = 0.5, 0.5, 0.5, 0.02, 0.0, 12, 0.001


class Batches:
    """``(x, y)`` mini-batches in a fresh seeded order each epoch."""

    def __init__(self, x, y, batch_size, seed):
        self.x, self.y, self.bs = x, y, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self):
        return len(self.x) // self.bs

    def __iter__(self):
        order = torch.randperm(len(self.x), generator=self.gen)
        for i in range(len(self)):
            j = order[i * self.bs:(i + 1) * self.bs]
            yield self.x[j], self.y[j]


def _bns(net):
    return [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]


@torch.no_grad()
def calibrate(net, x):
    """Running statistics = the population statistics of ``x`` (one full-batch pass)."""
    for bn in _bns(net):
        bn.reset_running_stats()
        bn.momentum = None
    net.train()
    net(x)
    for bn in _bns(net):
        bn.momentum = 0.1
    return net.eval()


@torch.no_grad()
def make_teacher(seed):
    """The planted network (eval mode), its masks, and per-class margin thresholds."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ResNet(BasicBlock, LAYERS, (WIDTH,), "cifar", CLASSES, SIZE[0], shortcut="A")
    masks = {}
    for name, k in PLANTED_UNITS.items():
        m = torch.zeros(WIDTH, dtype=torch.bool)
        m[torch.randperm(WIDTH, generator=gen)[:k]] = True
        masks[name] = m
    masks.update({f"block.{b}": torch.zeros(1, dtype=torch.bool) for b in REMOVED_BLOCKS})
    apply_masks_(net, masks)
    for name, p in net.named_parameters():
        if name.startswith("bn1.") or ".bn2." in name or ".conv2." in name:
            p.mul_(SIGNAL)
    x = torch.randn(8192, *SIZE, generator=gen)
    calibrate(net, x)
    logits = net(x)
    net.fc.bias -= logits.mean(0)
    logits -= logits.mean(0)
    bias = torch.zeros(CLASSES)
    for _ in range(500):  # equal class frequencies
        freq = torch.bincount((logits + bias).argmax(1), minlength=CLASSES).float() / len(x)
        bias -= 0.5 * logits.std() * (freq - 1 / CLASSES)
    net.fc.bias += bias
    logits = net(x)
    top2 = logits.topk(2, 1).values
    gap, label = top2[:, 0] - top2[:, 1], logits.argmax(1)
    threshold = torch.stack([gap[label == k].quantile(TOP) for k in range(CLASSES)])
    scale = MARGIN / float(threshold.min())
    net.fc.weight.mul_(scale)
    net.fc.bias.mul_(scale)
    return net, masks, threshold * scale


@torch.no_grad()
def sample(net, threshold, n, gen):
    """``n`` inputs on which the teacher is confident, and its labels."""
    kept = []
    while sum(len(k) for k in kept) < n:
        x = torch.randn(4 * n, *SIZE, generator=gen)
        logits = net(x)
        top2 = logits.topk(2, 1).values
        kept.append(x[top2[:, 0] - top2[:, 1] > threshold[logits.argmax(1)]])
    x = torch.cat(kept)[:n]
    return x, net(x).argmax(1)


@torch.no_grad()
def labels(net, x):
    return net(x).argmax(1)


def make_student(teacher, masks, seed):
    """The teacher's weights in a full network whose other units and blocks are distractors."""
    torch.manual_seed(1000 + seed)
    student = ResNet(BasicBlock, LAYERS, (WIDTH,), "cifar", CLASSES, SIZE[0], shortcut="A")
    fresh, planted = student.state_dict(), teacher.state_dict()
    state = {}
    for key, value in fresh.items():
        block = ".".join(key.split(".")[:2]) if key.startswith("layer") else None
        unit_mask = masks.get(f"{block}.conv1")
        if block in REMOVED_BLOCKS:
            state[key] = value                     # a whole distractor branch
        elif unit_mask is not None and key.split(".")[2] in ("conv1", "bn1", "conv2") \
                and not key.endswith("num_batches_tracked"):
            value = value.clone()                  # distractor units, planted units copied
            if ".conv2." in key:
                value[:, unit_mask] = planted[key][:, unit_mask]
            else:
                value[unit_mask] = planted[key][unit_mask]
            state[key] = value
        else:
            state[key] = planted[key]
    student.load_state_dict(state)
    return student



def run(seed: int, **options) -> dict:
    """Train the pruner on the planted problem of ``seed`` (``options``: of
    :class:`VariationalOptions`, over this problem's ``theta_lr`` and warm-up), round, recalibrate
    BN and compress.  Returns ``recovered`` (exactly the planted units in each kept block and
    exactly the planted blocks kept, and >= 97% agreement with the teacher on held-out inputs),
    ``agreement``, ``wrong`` (the families kept wrongly), ``theta`` (before rounding) and
    ``seconds``."""
    import time

    from nn.training import TrainConfig, train

    t0 = time.perf_counter()
    teacher, masks, threshold = make_teacher(seed)
    gen = torch.Generator().manual_seed(seed + 7)
    x, y = sample(teacher, threshold, N_TRAIN, gen)
    xt, yt = sample(teacher, threshold, N_TEST, gen)
    cfg = VariationalOptions(**{"theta_lr": THETA_LR, "gate_warmup_epochs": WARMUP, **options})
    gated = GatedResNet(make_student(teacher, masks, seed), SIZE, lam=LAM,
                        cost=CostConfig(macs=1 - BETA, params=BETA, blocks=GAMMA),
                        estimator=cfg.estimator, flip_units=cfg.flip_units,
                        flip_blocks=cfg.flip_blocks, flip_samples=cfg.flip_samples)
    loader = Batches(x, y, BATCH, seed)
    train(gated, loader, None, TrainConfig(epochs=EPOCHS, lr=LR, device="cpu", progress=False,
                                           seed=seed), **hooks(gated, cfg, len(loader)))
    before = gated.theta_by_family()
    gated.round_()
    recalibrate_bn(gated, loader)
    kept = gated.deterministic_masks()
    wrong = [b for b in BLOCKS if bool(kept[f"block.{b}"][0]) == (b in REMOVED_BLOCKS)]
    wrong += [n for n, want in masks.items()
              if not n.startswith("block.") and kept[n].tolist() != want.tolist()]
    small = compress(gated.net, kept)
    with torch.no_grad():
        agree = float((small(xt).argmax(1) == yt).float().mean())
    return {"seed": seed, "recovered": not wrong and agree >= 0.97, "agreement": agree,
            "wrong": wrong, "theta": before, "seconds": time.perf_counter() - t0}
