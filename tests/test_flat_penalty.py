"""The flat SPR penalty (nn.flat_penalty): the value and gradient of mipprune.penalty's formula,
in a fixed number of tensor operations, on every layout a training run meets."""

import pytest
import torch

from benchmarks.measure import launch_count
from helpers import random_bn_
from nn import SPRConfig, SPRRegularizer, build_model
from nn.training import TrainConfig, train

D = torch.float64
LAUNCH_GOAL = 30


def _edge_cases_(model, reg):
    """Weights that visit every branch: zero groups, tiny groups, ties of |w| at the maximum,
    groups beyond the box (m > M), and the three cases."""
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i, f in enumerate(reg.families):
            for p in f.writers:
                t = params[p.param]
                if p.dim is None:
                    continue
                t.mul_(torch.exp(torch.randn((), generator=g)))  # spread families over cases
                v = t.movedim(p.dim, 0)
                v[0].zero_()
                if f.size > 2:
                    v[1].mul_(1e-30)  # squares underflow in float32
                if f.size > 3:
                    v[2].mul_(4.0 * reg.M[f.name] / max(float(v[2].abs().max()), 1e-30))
                if f.size > 4 and v[3].numel() > 1:
                    v[3].view(-1)[:2] = 0.7 * reg.M[f.name]  # a tie at the maximum
                    v[3].view(-1)[1] *= -1


def _reference(reg):
    """mipprune.penalty.spr through autograd, family by family (the formula itself)."""
    for p in reg.model.parameters():
        p.grad = None
    total = sum(v.sum() for v in reg.group_penalties().values())
    total.backward()
    grads = {n: p.grad.clone() for n, p in reg.model.named_parameters() if p.grad is not None}
    return float(total.detach()), grads


def _flat(reg, scale=None):
    reg.path = "flat"
    for p in reg.model.parameters():
        p.grad = None
    value = reg.add_grad_(scale)
    return float(value), {n: p.grad.clone() for n, p in reg.model.named_parameters()
                          if p.grad is not None}


def _close(got, want, rtol):
    assert got.keys() == want.keys()
    for n in want:
        scale = float(want[n].abs().max())
        err = float((got[n] - want[n]).abs().max())
        assert err <= rtol * max(scale, 1e-300), (n, err, scale)


@pytest.mark.parametrize("penalty", ["spr", "bigm"])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0])  # a = 0, generic, b = 0
@pytest.mark.parametrize("kinds,group", [(("filter",), 1), (("filter", "stream", "block"), 1),
                                         (("filter",), 2)])
def test_value_and_gradient_equal_mippprune_formula(penalty, alpha, kinds, group):
    torch.manual_seed(0)
    model = random_bn_(build_model("resnet20", width=0.25)).double()
    reg = SPRRegularizer(model, SPRConfig(lam=2.0, alpha=alpha, kinds=kinds, penalty=penalty,
                                          group=group))
    _edge_cases_(model, reg)
    v_ref, g_ref = _reference(reg)
    v, g = _flat(reg)
    assert v == pytest.approx(v_ref, rel=1e-12)
    _close(g, g_ref, 1e-9)
    # the autograd form of the same path
    for p in model.parameters():
        p.grad = None
    reg().backward()
    _close({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, g_ref, 1e-9)


def test_every_case_is_visited_by_the_edge_cases():
    model = random_bn_(build_model("resnet20", width=0.25)).double()
    reg = SPRRegularizer(model, SPRConfig(lam=2.0, kinds=("filter", "stream")))
    _edge_cases_(model, reg)
    share = reg.case_stats()["all"]
    assert min(share["C1"], share["C2"], share["C3"]) > 0


def test_float32_model_matches_float64_formula():
    """The flat path's float64 algebra: a float32 model's penalty equals the formula on the
    same weights in float64 (the autograd path in float32 is the less accurate one)."""
    torch.manual_seed(1)
    m32 = random_bn_(build_model("resnet20", width=0.5))
    m64 = build_model("resnet20", width=0.5).double()
    m64.load_state_dict(m32.state_dict())
    cfg = SPRConfig(lam=4.5, kinds=("filter", "stream"))
    r32, r64 = SPRRegularizer(m32, cfg), SPRRegularizer(m64, cfg)
    _edge_cases_(m32, r32)
    m64.load_state_dict(m32.state_dict())
    v_ref, g_ref = _reference(r64)
    v, g = _flat(r32)
    assert v == pytest.approx(v_ref, rel=1e-12)
    _close({n: t.double() for n, t in g.items()}, g_ref, 1e-6)


def test_scale_multiplies_gradient_and_adds_to_existing_grads():
    model = random_bn_(build_model("resnet20", width=0.25))
    reg = SPRRegularizer(model, SPRConfig(lam=1.0))
    v1, g1 = _flat(reg)
    v2, g2 = _flat(reg, scale=torch.tensor(1024.0))
    assert v1 == v2
    _close(g2, {n: 1024 * t for n, t in g1.items()}, 1e-6)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    reg.add_grad_()
    got = {n: p.grad for n, p in model.named_parameters() if n in g1}
    _close(got, {n: 1 + t for n, t in g1.items()}, 1e-6)
    untouched = [p.grad for n, p in model.named_parameters() if n not in g1]
    assert untouched and all(bool((t == 1).all()) for t in untouched)


def test_channels_last_weights_are_read_in_place():
    torch.manual_seed(2)
    model = random_bn_(build_model("resnet20", width=0.25))
    reg = SPRRegularizer(model, SPRConfig(lam=1.0, kinds=("filter", "stream")))
    v_ref, g_ref = _flat(reg)
    n_ref = launch_count(reg.add_grad_)["cpu_ops"]
    model.to(memory_format=torch.channels_last)
    conv = next(p for p in model.parameters() if p.ndim == 4)
    assert not conv.is_contiguous() and conv.is_contiguous(memory_format=torch.channels_last)
    v, g = _flat(reg)
    assert v == pytest.approx(v_ref, rel=1e-12)
    _close(g, g_ref, 1e-6)
    assert launch_count(reg.add_grad_)["cpu_ops"] == n_ref  # views, no per-tensor copies
    assert conv.grad.stride() == conv.stride()


@pytest.mark.parametrize("penalty", ["spr", "bigm"])
def test_launches_do_not_grow_with_the_number_of_groups(penalty):
    """The issue's goal: at most 30 kernel launches per step (torch.profiler, CPU operators
    that compute), the same for ResNet-20 and ResNet-56 (3x the groups)."""
    counts = {}
    for name in ("resnet20", "resnet56"):
        reg = SPRRegularizer(build_model(name), SPRConfig(lam=1.0, penalty=penalty))
        reg.path = "flat"  # the GPU's path, counted on the CPU
        counts[name] = launch_count(reg.add_grad_)["cpu_ops"]
    assert counts["resnet20"] == counts["resnet56"] <= LAUNCH_GOAL, counts


def test_autograd_form_costs_a_kernel_per_parameter_the_fused_form_does_not():
    """Why training uses add_grad_: in a step, autograd adds a loss term's gradient to each
    parameter's gradient one kernel at a time."""
    torch.manual_seed(0)
    model = build_model("resnet20", width=0.25)
    reg = SPRRegularizer(model, SPRConfig(lam=1.0))
    reg.path = "flat"
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])

    def plain():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    def autograd():
        model.zero_grad(set_to_none=True)
        (torch.nn.functional.cross_entropy(model(x), y) + reg()).backward()

    def fused():
        plain()
        reg.add_grad_()

    base = launch_count(plain)["cpu_ops"]
    n_tensors = len(reg.flat.names)
    assert launch_count(fused)["cpu_ops"] - base <= LAUNCH_GOAL
    assert launch_count(autograd)["cpu_ops"] - base >= n_tensors


def test_cpu_default_is_the_per_family_formula_and_agrees_with_the_flat_path():
    torch.manual_seed(4)
    model = random_bn_(build_model("resnet20", width=0.5))
    reg = SPRRegularizer(model, SPRConfig(lam=3.0, kinds=("filter", "stream")))
    _edge_cases_(model, reg)
    assert not reg._flat_here()  # "auto" on the CPU
    v_flat, g_flat = _flat(reg)
    reg.path = "auto"
    for p in model.parameters():
        p.grad = None
    v = float(reg.add_grad_(torch.tensor(2.0)))
    g = {n: p.grad / 2 for n, p in model.named_parameters() if p.grad is not None}
    assert v == pytest.approx(v_flat, rel=1e-6)
    _close(g, g_flat, 1e-5)
    # the per-family path is mipprune's formula itself, through autograd
    v_ref, g_ref = _reference(reg)
    assert v == v_ref
    _close(g, g_ref, 1e-7)
    assert float(reg().detach()) == v_ref


@pytest.mark.parametrize("path", ["flat", "per-family"])
def test_training_with_extra_grad_equals_training_with_the_autograd_term(tmp_path, path):
    """train(extra_grad=reg.add_grad_) takes the same steps as train(extra_loss=reg())."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))
               for _ in range(4)]
    losses = {}
    for mode in ("extra_loss", "extra_grad"):
        torch.manual_seed(0)
        model = build_model("resnet20", width=0.25)
        reg = SPRRegularizer(model, SPRConfig(lam=0.5, alpha=0.3))
        reg.path = path
        hook = ({"extra_loss": lambda m: reg()} if mode == "extra_loss" else
                {"extra_grad": lambda m, scale: reg.add_grad_(scale)})
        res = train(model, batches, None, TrainConfig(epochs=2, lr=0.05, seed=0, progress=False),
                    **hook)
        losses[mode] = [(h["train_loss"], h["train_extra"]) for h in res.history]
        losses[mode + "_w"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for (ce1, ex1), (ce2, ex2) in zip(losses["extra_loss"], losses["extra_grad"]):
        assert ce1 == pytest.approx(ce2, rel=1e-5)
        assert ex1 == pytest.approx(ex2, rel=1e-5)
    assert torch.allclose(losses["extra_loss_w"], losses["extra_grad_w"], rtol=1e-4, atol=1e-6)
