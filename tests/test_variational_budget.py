"""A stated budget in the variational training (nn.methods.variational.budget): lam as the
budget's multiplier.  The expected widths it prices, the ratio against the selection's own
cost, the multiplicative dual step, and a budgeted run end to end (lam moved and recorded;
``--budget-gain 0`` leaves it fixed).  Toy networks, 1 thread."""

import math
from types import SimpleNamespace

import pytest
import torch

from helpers import random_bn_
from nn import count_macs
from nn.budget import budget_cost
from nn.config import RunConfig
from nn.methods.variational import GatedResNet
from nn.methods.variational.budget import BudgetTracker
from nn.models import BasicBlock, ResNet, prunable_structures
from nn.pipeline import run_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOY = (1, 6, 6)


def setup(budget="macs=0.5", gain=0.1, granularity=1, remove_blocks=True):
    """A gated two-stage ResNet (unit families of 4, 4, 8, 8; 3 removable blocks), the run
    view ``budget_cost`` reads, and its tracker."""
    torch.manual_seed(0)
    net = random_bn_(ResNet(BasicBlock, (2, 2), (4, 8), "cifar", num_classes=3, in_channels=1,
                            shortcut="B"))
    structures = prunable_structures(net, TOY)
    run = SimpleNamespace(
        model=net, input_size=TOY, structures=structures,
        pruned=[f for f in structures if f.kind == "filter"],
        config=SimpleNamespace(selection=SimpleNamespace(
            budget=budget, remove_blocks=remove_blocks, granularity=granularity)))
    gated = GatedResNet(net, TOY, lam=2.0)
    return gated, BudgetTracker(gated, budget_cost(run), gain, granularity), run


def set_theta_(gated, values: dict):
    with torch.no_grad():
        for name, v in values.items():
            gated.theta[gated.by_name[name].slice] = torch.as_tensor(v, dtype=torch.float32)


def test_widths_are_the_expected_counts_snapped_to_the_grid():
    """Each family: the sum of its live thetas, to the nearest allowed width; a block whose
    gate is below 1/2 has its carrier at 0 (the block removed)."""
    gated, tracker, _ = setup(granularity=2)
    set_theta_(gated, {"layer1.0.conv1": [1.0, 0.9, 0.2, 0.1],        # 2.2 -> 2
                       "layer1.1.conv1": [1.0, 1.0, 0.8, 0.8],        # 3.6 -> 4
                       "layer2.0.conv1": [0.7] * 8,                   # 5.6 -> 6
                       "layer2.1.conv1": [1.0] * 8,
                       "block.layer2.1": [0.4]})
    with torch.no_grad():  # a dead gate counts 0 whatever its theta says
        gated.alive[gated.by_name["layer2.0.conv1"].start] = False
    w = tracker.widths()  # layer2.0: 7 live x 0.7 = 4.9 -> 4 (grid 2, 4, 6, 8)
    assert w == {"layer1.0.conv1": 2, "layer1.1.conv1": 4, "layer2.0.conv1": 4,
                 "layer2.1.conv1": 0}


def test_ratio_is_the_selection_cost_over_the_limit():
    """At theta = 1 the cost is the dense network's: ratio 1 / budget.  With a block's gate
    off and a family halved, the cost is the MACs of that network as the counter counts it."""
    gated, tracker, run = setup("macs=0.5")
    assert tracker.ratio() == pytest.approx(2.0)
    set_theta_(gated, {"block.layer1.1": [0.0], "layer2.1.conv1": [1.0] * 4 + [0.0] * 4})
    pruned = ResNet(BasicBlock, (2, 2), (4, 8), "cifar", num_classes=3, in_channels=1,
                    shortcut="B")
    pruned.layer1[1] = torch.nn.Identity()
    l21 = pruned.layer2[1]
    l21.conv1 = torch.nn.Conv2d(8, 4, 3, padding=1, bias=False)
    l21.bn1 = torch.nn.BatchNorm2d(4)
    l21.conv2 = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)
    dense = count_macs(run.model, TOY)
    assert tracker.ratio() == pytest.approx(count_macs(pruned, TOY) / (0.5 * dense), rel=1e-9)


def test_dual_step_moves_lam_with_the_excess():
    """Over the budget lam rises by exp(gain * min(1, ratio - 1)); under it, it falls."""
    gated, tracker, _ = setup("macs=0.5", gain=0.1)
    assert tracker.step(0) == pytest.approx(2.0)
    assert gated.lam == pytest.approx(2.0 * math.exp(0.1))
    set_theta_(gated, {f"block.layer{i}": [0.0] for i in ("1.1", "2.1")})
    set_theta_(gated, {"layer1.0.conv1": [0.25] * 4, "layer2.0.conv1": [0.125] * 8})
    r = tracker.step(1)
    assert r < 1
    assert gated.lam == pytest.approx(2.0 * math.exp(0.1) * math.exp(0.1 * (r - 1)))
    with pytest.raises(ValueError, match="gain"):
        BudgetTracker(gated, tracker.budget, 0.0, 1)
    with pytest.raises(ValueError, match="ramp"):
        BudgetTracker(gated, tracker.budget, 0.1, 1, ramp=-1)


def test_limit_glides_from_dense_to_the_budget():
    """With a ramp of 10 steps the dense network is at its limit at step 0 (ratio 1, lam
    unmoved), halfway at 0.75 of dense for a budget of 0.5, at the budget from step 10 on."""
    gated, _, run = setup("macs=0.5", gain=0.1)
    tracker = BudgetTracker(gated, budget_cost(run), 0.1, 1, ramp=10)
    dense = count_macs(run.model, TOY)
    assert [tracker.limit(t) / dense for t in (0, 5, 10, 50)] == \
        pytest.approx([1.0, 0.75, 0.5, 0.5])
    assert tracker.step(0) == pytest.approx(1.0) and gated.lam == pytest.approx(2.0)
    assert tracker.step(5) == pytest.approx(1 / 0.75)
    assert tracker.ratio() == pytest.approx(2.0)  # against the budget itself


def test_lam_is_a_buffer_the_checkpoint_carries():
    gated, tracker, _ = setup()
    tracker.step(0)
    state = gated.state_dict()
    fresh, _, _ = setup()
    fresh.load_state_dict(state)
    assert fresh.lam == pytest.approx(gated.lam) and fresh.lam != 2.0


SYN = {"n_train": 192, "n_test": 96, "image_size": 8, "num_classes": 4}


@pytest.mark.parametrize("gain", [0.05, 0.0])
def test_budgeted_run_moves_lam(tmp_path, gain):
    """A budgeted run records lam and the budget ratio per epoch; with a gain lam moves away
    from its start, with gain 0 it stays at --lam.  The budget is met either way."""
    cfg = RunConfig(
        data={"name": "synthetic", "synthetic": SYN}, model={"name": "resnet20", "width": 0.25},
        optim={"epochs": 2, "finetune_epochs": 0, "batch_size": 32, "eval_batch_size": 96,
               "lr": 0.05},
        method={"name": "variational", "lam": 0.5,
                "options": {"theta_lr": 0.05, "gate_warmup_epochs": 0.5, "budget_gain": gain}},
        selection={"bisect_images": 96, "budget": "macs=0.4", "granularity": 2,
                   "remove_blocks": True},
        runtime={"latency_batches": (), "progress": False, "device": "cpu", "amp": "off",
                 "out": str(tmp_path / "run")})
    report = run_pipeline(cfg)
    hist = report["history"]["train"]
    lams = [e["gates_lam"] for e in hist]
    assert report["complexity"]["macs_ratio"] <= 0.4 + 1e-12
    assert report["regularizer"]["budget_gain"] == gain
    if gain:
        assert all(e["gates_budget_ratio"] > 0 for e in hist)
        assert lams[-1] != pytest.approx(0.5)
    else:
        assert "gates_budget_ratio" not in hist[-1]
        assert lams == [0.5] * len(hist)


def test_cli_budget_gain_and_ramp(capsys):
    from nn.cli import build_parser, config_from_args

    def cfg(*argv):
        return config_from_args(build_parser().parse_args(["train", *argv]))

    o = cfg("--method", "variational").method.options
    assert (o.budget_gain, o.budget_ramp) == (0.02, 0.5)
    o = cfg("--method", "variational", "--budget-gain", "0", "--budget-ramp", "0.25",
            "--budget", "macs=0.4").method.options
    assert (o.budget_gain, o.budget_ramp) == (0.0, 0.25)
    with pytest.raises(SystemExit):
        cfg("--method", "variational", "--budget-ramp", "1.5")
    assert "--budget-ramp" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--budget-gain is an option of variational"):
        cfg("--method", "spr", "--budget-gain", "0.1")
