"""A stated budget in the variational training (nn.methods.variational.budget): lam as the
budget's multiplier, step by step.  The expected widths it prices, the ratio against the
selection's own cost, the least multiplier whose theta step fits, the ramp, and a budgeted run
end to end (lam set and recorded; ``--budget-lam fixed`` leaves it at ``--lam``).  Toy
networks, 1 thread."""

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


def setup(budget="macs=0.5", granularity=1, remove_blocks=True):
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
    return gated, BudgetTracker(gated, budget_cost(run), granularity), run


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


def test_multiplier_is_the_least_price_whose_step_fits():
    """Unconstrained step within the limit: lam 0.  Otherwise the returned lam's step fits and
    a 1% smaller one does not; the multiplier does not depend on where its bracket starts."""
    gated, tracker, _ = setup("macs=0.5")
    price = gated.marginal_costs(1.0)
    ce = torch.linspace(-0.02, 0.02, len(price))  # some gates worth keeping, some not
    lr, t = 0.05, 10**6  # past any ramp: the limit is the budget

    def cost(lam):
        th = gated.proposed_theta(ce + lam * price, lr, True)
        return tracker.budget.cost(tracker.widths(th))

    limit = tracker.limit(t)
    lam = tracker.multiplier(ce, price, lr, True, t)
    assert lam > 0 and cost(lam) <= limit < cost(0.99 * lam)
    for start in (1e-4, 1e3):
        with torch.no_grad():
            gated.lam_now.fill_(start)
        assert tracker.multiplier(ce, price, lr, True, t) == pytest.approx(lam, rel=2e-3)
    with pytest.raises(ValueError, match="ramp"):
        BudgetTracker(gated, tracker.budget, 1, ramp=-1)


def test_limit_glides_from_dense_to_the_budget():
    """With a ramp of 10 steps the limit is the dense cost at step 0 (the dense network fits
    it at lam 0), 0.75 of dense halfway for a budget of 0.5, the budget from step 10 on."""
    gated, _, run = setup("macs=0.5")
    tracker = BudgetTracker(gated, budget_cost(run), 1, ramp=10)
    dense = count_macs(run.model, TOY)
    assert [tracker.limit(t) / dense for t in (0, 5, 10, 50)] == \
        pytest.approx([1.0, 0.75, 0.5, 0.5])
    assert tracker.ratio(step=5) == pytest.approx(1 / 0.75)
    assert tracker.ratio() == pytest.approx(2.0)  # against the budget itself
    price = gated.marginal_costs(1.0)  # the dense network fits the dense limit at no price
    assert tracker.multiplier(torch.zeros_like(price), price, 0.05, True, 0) == 0.0
    assert tracker.multiplier(torch.zeros_like(price), price, 0.05, True, 10) > 0


def test_lam_is_a_buffer_the_checkpoint_carries():
    gated, _, _ = setup()
    with torch.no_grad():
        gated.lam_now.fill_(3.5)
    fresh, _, _ = setup()
    fresh.load_state_dict(gated.state_dict())
    assert fresh.lam == 3.5
    older = {k: v for k, v in gated.state_dict().items() if k != "lam_now"}
    fresh, _, _ = setup()  # a checkpoint from before the buffer: the module's own lam (2.0)
    fresh.load_state_dict(older)
    assert fresh.lam == 2.0
    holder = torch.nn.ModuleDict({"gates": setup()[0]})  # under a prefix, too
    holder.load_state_dict({f"gates.{k}": v for k, v in older.items()})
    assert holder["gates"].lam == 2.0


SYN = {"n_train": 192, "n_test": 96, "image_size": 8, "num_classes": 4}


def budgeted_run(tmp_path, epochs: int, **options) -> dict:
    """The report of a variational run to ``--budget macs=0.4`` on synthetic images (6 steps
    an epoch, no fine-tuning), with theta_lr 0.05 and ``options``."""
    return run_pipeline(RunConfig(
        data={"name": "synthetic", "synthetic": SYN}, model={"name": "resnet20", "width": 0.25},
        optim={"epochs": epochs, "finetune_epochs": 0, "batch_size": 32, "eval_batch_size": 96,
               "lr": 0.05},
        method={"name": "variational", "lam": 0.5, "options": {"theta_lr": 0.05, **options}},
        selection={"bisect_images": 96, "budget": "macs=0.4", "granularity": 2,
                   "remove_blocks": True},
        runtime={"latency_batches": (), "progress": False, "device": "cpu", "amp": "off",
                 "out": str(tmp_path / "run")}))


@pytest.mark.parametrize("mode", ["project", "fixed"])
def test_budgeted_run_sets_lam(tmp_path, mode):
    """A budgeted run records lam and the budget ratio per epoch; ``project`` moves lam away
    from --lam and ends the training within the budget (the ramp done), ``fixed`` leaves it at
    --lam.  The selection meets the budget either way."""
    report = budgeted_run(tmp_path, 3, gate_warmup_epochs=0.5, budget_lam=mode)
    hist = report["history"]["train"]
    lams = [e["gates_lam"] for e in hist]
    assert report["complexity"]["macs_ratio"] <= 0.4 + 1e-12
    assert report["regularizer"]["budget_lam"] == mode
    if mode == "project":
        assert hist[-1]["gates_budget_ratio"] <= 1 + 1e-9
        assert lams[-1] != pytest.approx(0.5)
    else:
        assert "gates_budget_ratio" not in hist[-1]
        assert lams == [0.5] * len(hist)


def test_gates_fixed_to_the_budgets_selection_train_that_network(tmp_path, monkeypatch):
    """With ``budget_freeze`` 0.5 the gates are fixed halfway through the theta training: from
    then on every theta is 0 or 1 and none moves, the final selection is that one (made once),
    and it meets the budget."""
    import nn.budget

    calls = []
    select = nn.budget.select_to_budget

    def counted(*a, **k):
        calls.append(1)
        return select(*a, **k)

    monkeypatch.setattr(nn.budget, "select_to_budget", counted)
    report = budgeted_run(tmp_path, 4, gate_warmup_epochs=0.0, budget_freeze=0.5)
    assert len(calls) == 1  # the freeze's selection is the final one, not made twice
    assert report["selection"]["fixed_at_step"] == 12  # 0.5 of 4 epochs x 6 steps
    hist = report["history"]["train"]
    assert [e["gates_frozen"] for e in hist] == [False, True, True, True]
    fixed = [e["theta"] for e in hist[1:]]
    assert all(v in (0.0, 1.0) for t in fixed for vs in t.values() for v in vs)
    assert fixed[0] == fixed[-1]
    assert report["complexity"]["macs_ratio"] <= 0.4 + 1e-12
    assert report["regularizer"]["budget_freeze"] == 0.5
    kept = {n: sum(v) for n, v in fixed[-1].items() if not n.startswith("block.")}
    assert kept == {n: w for n, w in report["selection"]["widths"].items() if n in kept}
    # the schedule starts again at the freeze: from step 12 it warms up to the peak over 2 steps
    # (the default quarter epoch), and the logged lr (the epoch's last step) follows a cosine
    # over the 12 steps left, not the one over all 24
    lrs = [e["lr"] for e in hist]
    assert lrs[1] == pytest.approx(0.025 * (1 + math.cos(math.pi * 11 / 24)))
    assert lrs[2] == pytest.approx(0.025 * (1 + math.cos(math.pi * 5 / 12)))
    assert lrs[3] == pytest.approx(0.025 * (1 + math.cos(math.pi * 11 / 12)))
    assert report["regularizer"]["rewind_lr"] is True
    assert report["regularizer"]["rewind_warmup_epochs"] == 0.25


def test_the_rewound_schedule_warms_up_over_rewind_warmup_epochs(tmp_path):
    # 6 steps an epoch, restart at step 12: 1.5 epochs of warm-up (9 steps) put step 17 (the
    # end of epoch 3) at 6/9 of the rewound cosine and the last step (23) at all of it
    report = budgeted_run(tmp_path, 4, gate_warmup_epochs=0.0, budget_freeze=0.5,
                          rewind_warmup_epochs=1.5)
    lrs = [e["lr"] for e in report["history"]["train"]]
    assert lrs[1] == pytest.approx(0.025 * (1 + math.cos(math.pi * 11 / 24)))  # before: as is
    assert lrs[2] == pytest.approx(6 / 9 * 0.025 * (1 + math.cos(math.pi * 5 / 12)))
    assert lrs[3] == pytest.approx(0.025 * (1 + math.cos(math.pi * 11 / 12)))
    assert report["regularizer"]["rewind_warmup_epochs"] == 1.5


def test_without_rewinding_the_schedule_runs_on_through_the_freeze(tmp_path):
    report = budgeted_run(tmp_path, 4, gate_warmup_epochs=0.0, budget_freeze=0.5,
                          rewind_lr=False)
    lrs = [e["lr"] for e in report["history"]["train"]]
    assert lrs == pytest.approx([0.025 * (1 + math.cos(math.pi * (6 * e - 1) / 24))
                                 for e in (1, 2, 3, 4)])
    assert report["regularizer"]["rewind_lr"] is False
    assert report["regularizer"]["rewind_warmup_epochs"] is None


def test_cli_budget_lam_and_ramp(capsys):
    from nn.cli import build_parser, config_from_args

    def cfg(*argv):
        return config_from_args(build_parser().parse_args(["train", *argv]))

    o = cfg("--method", "variational").method.options
    assert (o.budget_lam, o.budget_ramp, o.budget_freeze, o.rewind_lr,
            o.rewind_warmup_epochs) == ("project", 0.5, 0.5, True, 0.25)
    o = cfg("--method", "variational", "--budget-lam", "fixed", "--budget-ramp", "0.25",
            "--budget-freeze", "1", "--budget", "macs=0.4", "--rewind-lr", "off",
            "--rewind-warmup-epochs", "0.5").method.options
    assert (o.budget_lam, o.budget_ramp, o.budget_freeze, o.rewind_lr,
            o.rewind_warmup_epochs) == ("fixed", 0.25, 1.0, False, 0.5)
    for bad in (("--budget-ramp", "1.5"), ("--budget-lam", "dual"), ("--budget-freeze", "-1"),
                ("--rewind-lr", "yes"), ("--rewind-warmup-epochs", "-0.5")):
        with pytest.raises(SystemExit):
            cfg("--method", "variational", *bad)
        assert bad[0] in capsys.readouterr().err
    with pytest.raises(ValueError, match="--budget-lam is an option of variational"):
        cfg("--method", "spr", "--budget-lam", "fixed")


def test_price_is_the_slope_of_the_budgets_own_cost():
    """A MAC budget's price at theta = 1 is each gate's marginal MACs over the dense ones: for
    MACs (bilinear in the widths) one grid step's slope is the exact derivative of the expected
    MACs, so it equals the gates' own marginal cost with the MAC weight alone.  A block the
    budget may not remove costs its layers whatever its gate says: price 0."""
    from nn.cost import CostConfig

    gated, tracker, run = setup("macs=0.5", granularity=1)
    macs_only = GatedResNet(run.model, TOY, lam=1.0, cost=CostConfig(macs=1.0, params=0.0))
    exact = macs_only.marginal_costs().double()  # float32
    torch.testing.assert_close(tracker.price(), exact, rtol=1e-6, atol=0)
    assert (tracker.price()[gated.n_units:] > 0).all()
    gated, tracker, _ = setup("macs=0.5", granularity=1, remove_blocks=False)
    p = tracker.price()
    assert (p[gated.n_units:] == 0).all()
    torch.testing.assert_close(p[:gated.n_units], exact[:gated.n_units], rtol=1e-6, atol=0)
    # a block below one half is removed: its units cost nothing more, the block its layers
    # at their expected width (the price of theta = 1, cached, is not reused)
    gated, tracker, _ = setup("macs=0.5", granularity=1)
    tracker.price()
    set_theta_(gated, {"layer2.1.conv1": [1.0] * 4 + [0.0] * 4, "block.layer2.1": [0.4]})
    p = tracker.price()
    assert (p[gated.by_name["layer2.1.conv1"].slice] == 0).all()
    w = tracker.widths()
    block = tracker.budget.cost({**w, "layer2.1.conv1": 4}) - tracker.budget.cost(w)
    assert float(p[gated.by_name["block.layer2.1"].start]) == \
        pytest.approx(block / tracker.full, rel=1e-12)
    assert block < 0.9 * (tracker.full - tracker.budget.cost(
        {**tracker.budget.sizes, "layer2.1.conv1": 0}))  # less than the dense block's


def test_death_rule_weighs_evidence_against_the_price_it_is_given():
    """A worthless gate at theta = 0 with enough evidence dies against its price; given a price
    of 0 (a block a budget may not remove, a latency table's flat stretch) it stays."""
    from nn.methods.variational.evidence import DEATH_VISITS

    gated, _, _ = setup()
    gated = GatedResNet(gated.net, TOY, lam=1.0, estimator="batched")
    s = 0
    with torch.no_grad():
        gated.theta[s] = 0.0
    for _ in range(DEATH_VISITS):
        gated.record(torch.tensor([s]), torch.tensor([0.0]))
    push = torch.zeros_like(gated.theta)
    push[s] = 1.0
    assert gated.step_theta(push, 1.0, False, price=torch.zeros_like(push)) == 0
    assert bool(gated.alive[s])
    assert gated.step_theta(push, 1.0, False) == 1 and not bool(gated.alive[s])


def test_budgeted_selection_refills_dead_units_and_decides_blocks():
    """The selection fills a budget's slack with dead units (scored DEAD_SCORE, below every
    live gate), and brings a dead block back when it can afford it; the gates are set to its
    network exactly (theta 1 kept, 0 and dead removed)."""
    from nn.methods.variational.method import Variational

    gated, tracker, run = setup("macs=0.9", granularity=1)
    run.config.selection.depth = "value"
    with torch.no_grad():  # half of every unit family and one block dead
        for g in gated.gates:
            if g.kind == "unit":
                gated.alive[g.start + g.size // 2:g.start + g.size] = False
        gated.alive[gated.by_name["block.layer2.1"].start] = False
        gated.theta.copy_(gated.alive.float())
    sel = Variational()._budgeted(run, gated)
    units = int(gated.alive[:gated.n_units].sum())
    assert units > gated.n_units // 2  # dead units came back to fill the budget
    assert bool(gated.alive[gated.by_name["block.layer2.1"].start])
    assert tracker.budget.cost(tracker.widths()) <= tracker.budget.limit * (1 + 1e-9)
    assert sel["cost_predicted"] == pytest.approx(tracker.budget.cost(tracker.widths()))
    assert set(gated.theta.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(gated.theta.bool(), gated.alive)
