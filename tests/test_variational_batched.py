"""The ``batched`` gate estimator (nn.methods.variational.estimators.batched_flips) and the theta
update it drives: ghost-batch BN groups and per-sample multipliers in the one ResNet forward;
every flip difference equal to a separate forward of the ghost batch under the two patterns; the
shuffled gate cycles; the running averages; death only on evidence gathered at theta = 0.
Toy networks on 1x6x6 inputs, 1 thread."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn as tnn

from helpers import random_bn_
from nn.methods.variational import GatedResNet
from nn.methods.variational.estimators import batched_flips
from nn.methods.variational.gated import AVERAGE_DECAY, DEATH_VISITS
from nn.models import BasicBlock, ResNet
from nn.models.resnet import forward as fwd

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOY = (1, 6, 6)


def two_stage(seed=0, shortcut="B"):
    """Two stages of two BasicBlocks (widths 3 and 4), the second starting with a projection:
    4 unit families, 3 removable blocks; random BN affine terms and statistics."""
    torch.manual_seed(seed)
    return random_bn_(ResNet(BasicBlock, (2, 2), (3, 4), "cifar", num_classes=3, in_channels=1,
                             shortcut=shortcut))


def bns(module):
    return [m for m in module.modules() if isinstance(m, tnn.BatchNorm2d)]


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_ghost_groups_are_separate_forwards(shortcut):
    """``bn_groups`` G on G interleaved batches (row ``i G + g``: sample i of batch g) = G
    separate train-mode forwards of the block (the projection shortcut's BN included), and the
    running statistics stay as they were."""
    net = two_stage(1, shortcut).train()
    for m in bns(net):
        m.momentum = 0.0
    blk = net.layer2[0]
    layers = ((blk.conv1, blk.bn1), (blk.conv2, blk.bn2))
    x = torch.relu(torch.randn(3 * 5, 3, 6, 6))
    stats = [b.clone() for n, b in net.named_buffers() if "running" in n]
    with torch.no_grad():
        got = fwd.block(x, blk.downsample, layers, bn_groups=3)
        want = torch.stack([fwd.block(x[g::3], blk.downsample, layers) for g in range(3)],
                           1).flatten(0, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in
               zip(stats, [b for n, b in net.named_buffers() if "running" in n]))
    assert not torch.allclose(got, fwd.block(x, blk.downsample, layers))  # groups matter


def test_per_sample_multipliers_are_separate_patterns():
    """Rows of multipliers (one gate pattern per sample) give, sample by sample, the network
    of that pattern (eval mode: no coupling through BN), on a net with sliced-out units."""
    gated = GatedResNet(two_stage(2), TOY, estimator="st").eval()
    with torch.no_grad():
        gated.alive[gated.by_name["layer2.0.conv1"].start] = False  # a dead unit: sliced out
    n = len(gated.theta)
    g = torch.Generator().manual_seed(3)
    pats = (torch.rand(6, n, generator=g) < 0.6) & gated.alive
    x = torch.randn(6, *TOY, generator=g)
    idx = gated._indices()
    rows = pats.float()
    with torch.no_grad():
        h = gated._stem(x, rows)
        for p in range(len(gated.layout.blocks)):
            h = gated._block(p, h, rows, [True] * n, idx)
        got = fwd.head(gated.net, h)
        for i in range(6):
            want = gated._tail(gated._stem(x[i:i + 1], rows[i]), 0, rows[i],
                               pats[i].tolist(), idx)
            torch.testing.assert_close(got[i:i + 1], want, rtol=1e-5, atol=1e-5)


def test_batched_flips_are_ghost_batch_differences():
    """Every value is CE(s on) - CE(s off) of a separate train-mode forward of the ghost batch
    (its samples, from the block input the step saved, BN statistics of those samples) under
    the step's pattern with gate s set; every live gate is flipped when asked for all."""
    gated = GatedResNet(two_stage(4), TOY, estimator="batched", flip_units=None,
                        flip_blocks=None, flip_samples=5).train()
    with torch.no_grad():
        gated.theta.fill_(0.6)
    x, y = torch.randn(16, *TOY), torch.randint(0, 3, (16,))
    torch.manual_seed(5)
    with torch.no_grad():
        gated(x)
        inputs, xi = list(gated._inputs), gated._xi.clone()
        stats = [b.clone() for n, b in gated.net.named_buffers() if "running" in n]
        gates, values, samples = batched_flips(gated, x, y)
    assert gated._inputs is None  # the saved activations are released
    assert all(torch.equal(a, b) for a, b in  # BN running statistics untouched
               zip(stats, [b for n, b in gated.net.named_buffers() if "running" in n]))
    assert sorted(gates.tolist()) == list(range(len(gated.theta)))
    assert len(samples) == 5 and len(set(samples.tolist())) == 5
    for m in bns(gated.net):
        m.momentum = 0.0
    idx = gated._indices()
    first = min(gated._gate_block)
    h0 = inputs[first][samples]

    def ce(pattern):
        with torch.no_grad():
            logits = gated._tail(h0, first, pattern.float(), pattern.tolist(), idx)
            return float(F.cross_entropy(logits, y[samples]))

    for s, v in zip(gates.tolist(), values.tolist()):
        on, off = xi.clone(), xi.clone()
        on[s], off[s] = True, False
        assert v == pytest.approx(ce(on) - ce(off), abs=2e-5), s


def test_gate_cycles_visit_every_free_gate_once_per_cycle():
    gated = GatedResNet(two_stage(0), TOY, estimator="batched")
    free = gated.alive.clone()
    free[1] = False  # a dead unit gate is skipped
    nu = gated.n_units
    torch.manual_seed(0)
    seen = []
    while len(seen) < nu - 1:  # as many draws as free unit gates, 2 at a time
        got = gated.next_gates(free, "unit", min(2, nu - 1 - len(seen)))
        assert len(got) == len(set(got)) and all(0 <= s < nu for s in got)
        seen += got
    assert sorted(seen) == [s for s in range(nu) if s != 1]  # one cycle: each exactly once
    blocks = gated.next_gates(free, "block", None)
    assert sorted(blocks) == list(range(nu, len(gated.theta)))
    assert gated.next_gates(torch.zeros_like(free), "unit", 3) == []


def test_record_is_a_running_mean_then_a_moving_average():
    gated = GatedResNet(two_stage(0), TOY, estimator="batched")
    vals = [0.5, -0.1, 0.3]
    for v in vals:
        gated.record(torch.tensor([2]), torch.tensor([v]))
    assert float(gated.est_mean[2]) == pytest.approx(sum(vals) / 3)
    assert float(gated.est_sq[2]) == pytest.approx(sum(v * v for v in vals) / 3)
    assert int(gated.est_n[2]) == 3 and int(gated.est_n[3]) == 0
    # two values of one gate in one step count as two visits
    gated.record(torch.tensor([3, 3]), torch.tensor([1.0, 3.0]))
    assert float(gated.est_mean[3]) == pytest.approx(2.0) and int(gated.est_n[3]) == 2
    for _ in range(100):  # long after 1 / a visits: the weight of a new value is a
        gated.record(torch.tensor([2]), torch.tensor([1.0]))
    before = float(gated.est_mean[2])
    gated.record(torch.tensor([2]), torch.tensor([0.0]))
    assert float(gated.est_mean[2]) == pytest.approx(before * (1 - AVERAGE_DECAY))
    avg = gated.averaged_ce_gradient()
    assert float(avg[0]) == 0.0 and float(avg[2]) == float(gated.est_mean[2])


def test_one_estimate_cannot_kill_a_gate():
    """A gate pushed to theta = 0 stays alive at 0 (its average restarts there); it dies once
    DEATH_VISITS estimates at 0 show its value below its price with confidence, and a gate at 0
    whose estimates show value climbs back."""
    gated = GatedResNet(two_stage(0), TOY, lam=1.0, estimator="batched")
    s, t = 0, 1
    with torch.no_grad():
        gated.theta[[s, t]] = 0.01
    gated.record(torch.tensor([s, t] * 10), torch.tensor([0.0, 0.0] * 10))
    push = torch.zeros_like(gated.theta)
    push[[s, t]] = 10.0  # one huge estimate
    assert gated.step_theta(push, 1.0, precondition=False) == 0
    assert bool(gated.alive[s]) and float(gated.theta[s]) == 0.0
    assert int(gated.est_n[s]) == 0  # arrived at 0: judged on what follows
    for _ in range(DEATH_VISITS - 1):  # worthless at 0 (CE unchanged), but too few estimates
        gated.record(torch.tensor([s]), torch.tensor([0.0]))
    assert gated.step_theta(push, 1.0, precondition=False) == 0 and bool(gated.alive[s])
    gated.record(torch.tensor([s]), torch.tensor([0.0]))
    assert gated.step_theta(push, 1.0, precondition=False) == 1  # enough evidence: it dies
    assert not bool(gated.alive[s]) and bool(gated.alive[t])
    # gate t at 0 is worth 0.5 nats (CE(on) - CE(off) = -0.5): it stays, and its average
    # (not a single estimate) brings it back
    for _ in range(DEATH_VISITS):
        gated.record(torch.tensor([t]), torch.tensor([-0.5]))
    assert gated.step_theta(push, 1.0, precondition=False) == 0 and bool(gated.alive[t])
    with torch.enable_grad():
        price = gated.marginal_costs()
    g = price + gated.averaged_ce_gradient()
    gated.step_theta(g, 0.1, precondition=False)
    assert float(gated.theta[t]) > 0
