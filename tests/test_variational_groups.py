"""A gate on g units: ``--group`` for the variational pruner (nn.methods.variational).

Every check compares a ``group=4`` GatedResNet against the ``group=1`` one on a copy of the
same network with every unit's theta set to its group's: the same logits (sampled, forced and
mean field), the same exact expected cost and the group's marginal cost the sum of its units',
``flip`` and ``st`` estimating one gate per group, the budgeted selection keeping whole groups
end to end, and the error for a group that does not divide a family.  Tiny models, 1 thread.
"""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn as tnn

from helpers import random_bn_
from nn import compress, count_macs, count_params
from nn.cli import build_parser, config_from_args
from nn.config import RunConfig
from nn.cost import CostConfig
from nn.methods.variational import GatedResNet, Variational, VariationalOptions
from nn.models import BasicBlock, ResNet
from nn.pipeline import run_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOY = (1, 6, 6)
G = 4


def pair(seed=0, **kw):
    """The same random network gated with ``group=4`` and ``group=1``: unit families of 4, 4,
    8, 8 (6 gates of 4 units; 24 units), 3 removable blocks (the second stage projects)."""
    torch.manual_seed(seed)
    net = random_bn_(ResNet(BasicBlock, (2, 2), (4, 8), "cifar", num_classes=3, in_channels=1,
                            shortcut="B"))
    return GatedResNet(copy.deepcopy(net), TOY, group=G, **kw), GatedResNet(net, TOY, **kw)


def per_unit(g4, v):
    """A vector in ``g4``'s gate layout as the ``group=1`` layout: unit gates repeated 4x."""
    return torch.cat([g.units(v) for g in g4.gates])


def set_theta_(gated, theta):
    with torch.no_grad():
        gated.theta.copy_(torch.as_tensor(theta, dtype=gated.theta.dtype))


def bn_momentum_0_(*gated):
    for m in gated:
        for b in m.net.modules():
            if isinstance(b, tnn.BatchNorm2d):
                b.momentum = 0.0


# --------------------------------------------------------------------------- 1. gates and samples


def test_one_theta_per_group_and_the_same_network_as_repeated_unit_thetas():
    g4, g1 = pair()
    assert len(g4.theta) == 6 + 3 and len(g1.theta) == 24 + 3
    assert g4.n_units == 6 and g4.n_blocks == g1.n_blocks == 3
    for f in g4.families:
        gate = g4.by_name.get(f.name)
        if gate is not None:
            assert gate.size == (f.size // G if gate.kind == "unit" else 1)
            assert gate.group == (G if gate.kind == "unit" else 1)
    g = torch.Generator().manual_seed(1)
    set_theta_(g4, 0.2 + 0.6 * torch.rand(len(g4.theta), generator=g))
    set_theta_(g1, per_unit(g4, g4.theta))
    x = torch.randn(8, *TOY)
    bn_momentum_0_(g4, g1)
    for estimator in ("flip", "st", "reinforce"):
        g4.estimator = g1.estimator = estimator
        for seed in range(4):  # sampled: one draw per gate, applied to all 4 of its units
            torch.manual_seed(seed)
            got = g4.train()(x)
            xi = g4._xi.clone()
            assert xi.shape == g4.theta.shape
            want = g1.train()(x, xi=per_unit(g4, xi))
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():  # mean field, and with a dead group sliced out of the convs
        torch.testing.assert_close(g4.eval()(x), g1.eval()(x), rtol=0, atol=0)
        dead = g4.by_name["layer2.1.conv1"].start + 1  # its second group: units 4..7
        g4.alive[dead], g4.theta[dead] = False, 0.0
        units = g1.by_name["layer2.1.conv1"].start + torch.arange(4, 8)
        g1.alive[units], g1.theta[units] = False, 0.0
        assert g4._indices()["layer2.1.conv1"].tolist() == [0, 1, 2, 3]
        torch.testing.assert_close(g4(x), g1(x), rtol=0, atol=0)


def test_samples_are_one_bernoulli_per_group():
    """Keep rate of every group gate within 4 standard errors of its theta (1000 draws): the
    group is drawn once, so its 4 units are on together in every sample."""
    g4, _ = pair(estimator="reinforce")
    set_theta_(g4, torch.tensor([0.2, 0.5, 0.8, 0.3, 0.6, 0.9, 0.4, 0.7, 0.5]))
    x = torch.randn(2, *TOY)
    torch.manual_seed(2)
    n = 1000
    xs = torch.empty(n, len(g4.theta))
    units = {gate.name: [] for gate in g4.gates if gate.kind == "unit"}
    with torch.no_grad():
        for i in range(n):
            g4.train()(x)
            xs[i] = g4._xi.float()
            for name in units:
                units[name].append(g4.by_name[name].units(g4._xi))
    sigma = (g4.theta * (1 - g4.theta) / n).sqrt()
    assert ((xs.mean(0) - g4.theta).abs() <= 4 * sigma).all(), xs.mean(0)
    for name, masks in units.items():  # per unit: constant within each group, both values seen
        m = torch.stack(masks)
        assert m.shape[1] == g4.by_name[name].size * G
        rows = m.reshape(n, -1, G)
        assert (rows == rows[..., :1]).all() and m.any() and not m.all()


# --------------------------------------------------------------------------- 2. the cost


def test_expected_cost_of_a_group_is_the_sum_of_its_units():
    g4, g1 = pair()
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        th = torch.rand(len(g4.theta), generator=g, dtype=torch.float64)
        e4, e1 = g4.expected(th), g1.expected(per_unit(g4, th))
        for k in ("macs", "params", "blocks"):
            assert float(e4[k]) == pytest.approx(float(e1[k]), rel=1e-12), k
        assert float(g4.cost(th)) == pytest.approx(float(g1.cost(per_unit(g4, th))), rel=1e-12)
    assert float(e4["macs"]) < g4.dense_macs  # not the dense cost: theta matters
    # each group gate's marginal cost at theta = 1 (its preconditioner) sums its 4 units'
    for gate in g4.gates:
        unit = g1.by_name[gate.name]
        torch.testing.assert_close(g4.unit_cost[gate.slice].double(),
                                   g1.unit_cost[unit.slice].double().reshape(gate.size, -1)
                                   .sum(1), rtol=1e-6, atol=0)
    assert float(g4.unit_cost[0]) > 3.5 * float(g1.unit_cost[0])


def test_latency_price_of_a_group_is_its_units():
    lat = {"marginal": {}, "dense_ms": 2.0}
    cost = CostConfig(macs=0, params=0, latency=1.0)
    probe, _ = pair()
    lat["marginal"] = {g.name: 0.1 * (i + 1) for i, g in enumerate(probe.gates)}
    g4, g1 = pair(cost=cost, latency=lat)
    th = torch.linspace(0.1, 0.9, len(g4.theta), dtype=torch.float64)
    assert float(g4.cost(th)) == pytest.approx(float(g1.cost(per_unit(g4, th))), rel=1e-12)
    gate = g4.by_name["layer2.0.conv1"]
    assert float(g4._latency[gate.start]) == pytest.approx(G * lat["marginal"][gate.name] / 2.0)


def test_vertices_masks_and_rounding_keep_whole_groups():
    """Deterministic masks: a group's 4 units together; an empty family keeps its best group;
    the expected cost at the vertex is the compressed network's count."""
    g4, _ = pair()
    th = torch.tensor([0.7, 0.2, 0.9, 0.1, 0.3, 0.45, 1.0, 0.0, 1.0])
    set_theta_(g4, th)
    names = [gt.name for gt in g4.gates for _ in range(gt.size)]  # per entry of theta
    assert (names[1], names[7]) == ("layer1.1.conv1", "block.layer1.1")
    with torch.no_grad():  # block.layer1.1 is dead, and its unit gate with it
        g4.alive[[1, 7]] = False
        g4.theta[[1, 7]] = 0.0
    masks = g4.deterministic_masks()
    assert masks["layer1.0.conv1"].tolist() == [True] * 4
    assert masks["layer1.1.conv1"].tolist() == [False] * 4
    assert masks["layer2.0.conv1"].tolist() == [True] * 4 + [False] * 4
    assert masks["layer2.1.conv1"].tolist() == [False] * 4 + [True] * 4  # empty: best group
    keep = g4.deterministic_keep()
    assert keep.tolist() == [True, False, True, False, False, True, True, False, True]
    small = compress(g4.net, masks)
    e = g4.expected(keep.double())
    assert float(e["macs"]) == count_macs(small, TOY)
    assert float(e["params"]) == count_params(small)
    info = g4.round_()
    assert info["rounded_up"] == 3 and info["rounded_down"] == 2  # 0.45: its family's best
    x = torch.randn(3, *TOY)
    with torch.no_grad():
        torch.testing.assert_close(g4.eval()(x), small.eval()(x), rtol=1e-5, atol=1e-5)
    assert g4.alive.tolist() == keep.tolist()
    assert g4.stats()["units_alive"] == 12  # 3 unit gates of 4


def test_step_theta_kills_and_pins_whole_groups():
    g4, _ = pair(estimator="flip")  # the immediate death rule
    grad = torch.zeros(len(g4.theta))
    fam = g4.by_name["layer2.0.conv1"]
    grad[fam.slice] = torch.tensor([50.0, 60.0])  # both groups would die: the first is pinned
    died = g4.step_theta(grad, lr=1.0, precondition=False)
    assert died == 1
    assert g4.alive[fam.slice].tolist() == [True, False]
    assert g4.pinned[fam.start] and float(g4.theta[fam.start]) == 1.0
    assert g4.deterministic_masks()[fam.name].tolist() == [True] * 4 + [False] * 4


# --------------------------------------------------------------------------- estimators


def test_flip_flips_a_group_as_one_gate():
    """flip's estimate for a group gate is CE(group on) - CE(group off) with the other gates
    as sampled: the G=1 network with the group's 4 units switched together."""
    g4, g1 = pair(estimator="flip", flip_units=None, flip_blocks=None)
    set_theta_(g4, torch.full((len(g4.theta),), 0.6))
    bn_momentum_0_(g4, g1)
    x, y = torch.randn(16, *TOY), torch.randint(0, 3, (16,))
    xi = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    g1.train()
    with torch.no_grad():
        ce = F.cross_entropy(g4.train()(x, xi=xi), y)
        got = g4.theta_gradient(ce, (x, y))
        for s in range(len(xi)):
            on, off = xi.clone(), xi.clone()
            on[s], off[s] = True, False
            want = F.cross_entropy(g1(x, xi=per_unit(g4, on)), y) \
                - F.cross_entropy(g1(x, xi=per_unit(g4, off)), y)
            assert float(got[s]) == pytest.approx(float(want), abs=2e-6), s
    assert int((got.abs() > 1e-4).sum()) >= 4


def test_straight_through_of_a_group_is_the_sum_of_its_units():
    g4, g1 = pair(estimator="st")
    bn_momentum_0_(g4, g1)
    x, y = torch.randn(16, *TOY), torch.randint(0, 3, (16,))
    xi = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    F.cross_entropy(g4.train()(x, xi=xi), y).backward()
    F.cross_entropy(g1.train()(x, xi=per_unit(g4, xi)), y).backward()
    st4, st1 = g4._leaf.grad, g1._leaf.grad
    for gate in g4.gates:
        want = st1[g1.by_name[gate.name].slice].reshape(gate.size, -1).sum(1)
        torch.testing.assert_close(st4[gate.slice], want, rtol=1e-5, atol=1e-7)
    assert int((st4[:g4.n_units].abs() > 1e-4).sum()) >= 3


# --------------------------------------------------------------------------- 3. scores, end to end


def test_scores_give_every_unit_its_group_theta():
    g4, _ = pair()
    set_theta_(g4, torch.tensor([0.7, 0.2, 0.9, 0.1, 0.3, 0.45, 1.0, 0.0, 1.0]))
    with torch.no_grad():
        g4.alive[4], g4.theta[4] = False, 0.0
    pruned = [f for f in g4.families if f.kind == "filter"]
    scores = Variational().scores(SimpleNamespace(pruned=pruned), SimpleNamespace(module=g4))
    assert scores["layer2.0.conv1"].tolist() == pytest.approx([0.9] * 4 + [0.1] * 4)
    assert scores["layer2.1.conv1"].tolist() == pytest.approx([0.0] * 4 + [0.45] * 4)
    for f in pruned:
        s = scores[f.name]
        assert s.shape == (f.size,) and (s.reshape(-1, G) == s.reshape(-1, G)[:, :1]).all()


SYN = {"n_train": 192, "n_test": 96, "image_size": 8, "num_classes": 4}


def test_groups_train_and_leave_together_end_to_end(tmp_path):
    """--group 4 --budget macs=0.5 --granularity 4 --remove-blocks: one theta per 4 filters
    in the history, every kept width a multiple of 4, the kept groups the largest-theta
    ones, the saved model the report's, the plots drawn."""
    cfg = RunConfig(
        data={"name": "synthetic", "synthetic": SYN}, model={"name": "resnet20", "width": 0.25},
        optim={"epochs": 2, "finetune_epochs": 1, "batch_size": 32, "eval_batch_size": 96,
               "lr": 0.05, "finetune_lr": 0.01},
        method={"name": "variational", "lam": 3.0,
                "options": {"theta_lr": 0.05, "gate_warmup_epochs": 0.5, "group": G}},
        selection={"bisect_images": 96, "budget": "macs=0.5", "granularity": G,
                   "remove_blocks": True},
        runtime={"latency_batches": (), "progress": False, "device": "cpu", "amp": "off",
                 "out": str(tmp_path / "run")})
    report = run_pipeline(cfg)
    sel, out = report["selection"], tmp_path / "run"
    assert sel["rule"] == "budget" and sel["status"] == "optimal"
    assert report["complexity"]["macs_ratio"] <= 0.5 + 1e-12
    assert report["regularizer"]["group"] == G
    masks = torch.load(out / "select" / "masks.pt", weights_only=True)
    theta = report["history"]["train"][-1]["theta"]
    fams = [n for n in masks if not n.startswith("block.")]
    assert fams
    moved = 0
    for n in fams:
        m = masks[n]
        assert len(theta[n]) == m.numel() // G
        rows = m.reshape(-1, G)
        assert (rows == rows[:, :1]).all(), n  # whole groups kept or removed
        assert int(m.sum()) % G == 0 and sel["widths"][n] % G == 0
        kept, th = rows[:, 0], torch.tensor(theta[n])
        block = f"block.{n.rsplit('.', 1)[0]}"
        if kept.any() and not kept.all() and bool(masks.get(block, torch.tensor([True]))[0]):
            assert float(th[kept].min()) >= float(th[~kept].max()), n  # the best groups
            moved += 1
    assert moved >= 1  # some family was cut inside: the group order was exercised
    mids = [w for b in report["blocks"] for w in b["mid"]]
    assert mids and all(w % G == 0 for w in mids)  # the saved network's inner widths
    assert report["accuracy"]["reload_matches"]
    assert {"theta.png", "gates.png"} <= {p.split("/")[-1] for p in report["files"]["plots"]}
    assert json.loads((out / "report.json").read_text())["selection"]["widths"] == sel["widths"]


# --------------------------------------------------------------------------- 4. errors, CLI


def test_a_group_that_does_not_divide_a_family_is_a_clear_error():
    torch.manual_seed(0)
    net = ResNet(BasicBlock, (2, 2), (4, 6), "cifar", num_classes=3, in_channels=1,
                 shortcut="B")
    with pytest.raises(ValueError, match=r"group 4 does not divide family 'layer2\.0\.conv1' "
                                         r"of 6 units \(2 families\)"):
        GatedResNet(net, TOY, group=4)
    with pytest.raises(ValueError, match=r"group 3 does not divide family 'layer1\.0\.conv1' "
                                         r"of 4 units \(2 families\)"):
        GatedResNet(net, TOY, group=3)
    assert GatedResNet(net, TOY, group=2).n_units == 2 + 2 + 3 + 3
    for bad in (0, 1.0, True):
        with pytest.raises(ValueError, match="group must be an int >= 1"):
            GatedResNet(net, TOY, group=bad)
        with pytest.raises(ValueError, match="group must be an int >= 1"):
            VariationalOptions(group=bad)


def test_cli_group_reaches_the_variational_options_and_needs_a_matching_granularity():
    def cfg(*argv):
        return config_from_args(build_parser().parse_args(["train", *argv]))

    assert cfg("--method", "variational").method.options.group == 1
    assert cfg("--method", "variational", "--group", "4").method.options.group == 4
    ok = cfg("--method", "variational", "--group", "4", "--budget", "macs=0.5",
             "--granularity", "8")
    assert ok.selection.granularity == 8
    with pytest.raises(ValueError, match="--granularity must be a multiple of 4, got 6"):
        cfg("--method", "variational", "--group", "4", "--budget", "macs=0.5",
            "--granularity", "6")
    with pytest.raises(ValueError, match="--group is an option of spr, bigm, variational, "
                                         "not of --method dense"):
        cfg("--method", "dense", "--group", "4")
