"""The torch SPR regularizer: same values as mipprune.penalty, sound gradients, the published recipe."""

import math

import numpy as np
import pytest
import torch

from nn import SPRConfig, SPRRegularizer, bigm_penalty, build_model, spr_penalty
from nn.models import build_families, group_weights

import mipprune.penalty as S
from nn.cost import CostConfig

D = torch.float64


def _boundary_rows(delta):
    """Rows placed on/near the case boundaries for a = 0.3, b = 0.7, returned with M."""
    a, b = 0.3, 0.7
    c = math.sqrt(a / b)
    g = torch.Generator().manual_seed(1)
    flat = torch.ones(6, dtype=D) / math.sqrt(6)  # spread: m / t small
    peaky = torch.tensor([1.0, 0.1, -0.2, 0.05, 0.1, -0.1], dtype=D)
    peaky = peaky / peaky.norm()
    rows, Ms = [], []
    # C1|C2: c t = 1 (box M = 10 far away)
    rows.append(flat * (1 + delta) / c); Ms.append(10.0)
    rows.append(flat * (1 - delta) / c); Ms.append(10.0)
    # C2|C3: m / M = c t, with c t = 0.5 < 1  ->  M = m / (c t)
    s = 0.5 / c
    r = float(peaky.abs().max())
    rows.append(peaky * s); Ms.append(r * s / (0.5 * (1 + delta)))
    rows.append(peaky * s); Ms.append(r * s / (0.5 * (1 - delta)))
    # zero row, C3 interior, beyond the box (C1 extension), generic random
    rows.append(torch.zeros(6, dtype=D)); Ms.append(1.0)
    rows.append(peaky * 0.2); Ms.append(r / (2 * c))  # u = 2 c t
    rows.append(peaky * 3.0); Ms.append(1.0)
    rows.append(torch.randn(6, generator=g, dtype=D)); Ms.append(5.0)
    return torch.stack(rows), a, b, torch.tensor(Ms, dtype=D)


def test_boundary_rows_sit_where_claimed():
    w, a, b, M = _boundary_rows(1e-3)
    case = S.spr(w.numpy(), a, b, M.numpy()).case
    assert case.tolist()[:7] == [S.C1, S.C2, S.C3, S.C2, S.C2, S.C3, S.C1]


def test_spr_penalty_equals_numpy_spr():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 7, generator=g, dtype=D) * torch.rand(40, 1, generator=g, dtype=D) * 3
    w[::9] = 0
    a = torch.rand(40, generator=g, dtype=D)
    b = torch.rand(40, generator=g, dtype=D)
    M = 0.5 + 2 * torch.rand(40, generator=g, dtype=D)
    got = spr_penalty(w, a, b, M).numpy()
    want = S.spr_value(w.numpy(), a.numpy(), b.numpy(), M.numpy())
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)
    num, _ = S.spr_numeric(w.numpy(), a.numpy(), b.numpy(), M.numpy())
    np.testing.assert_allclose(got, num, rtol=1e-7, atol=1e-10)
    cases = set(S.spr(w.numpy(), a.numpy(), b.numpy(), M.numpy()).case.tolist())
    assert cases == {S.C1, S.C2, S.C3}
    np.testing.assert_allclose(bigm_penalty(w, a, b, M).numpy(),
                               S.bigm_value(w.numpy(), a.numpy(), b.numpy(), M.numpy()),
                               rtol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_spr_penalty_any_float_dtype_and_scalar_coefficients(dtype):
    w = torch.tensor([[0.3, -0.4], [0.0, 0.0], [2.0, 0.1]], dtype=dtype)
    v = spr_penalty(w, 0.5, 0.5, 1.0)
    assert v.dtype == dtype and v.shape == (3,)
    want = S.spr_value(w.double().numpy(), 0.5, 0.5, 1.0)
    np.testing.assert_allclose(v.double().numpy(), want, rtol=1e-2 if dtype == torch.bfloat16
                               else 1e-6)


def test_gradcheck_near_every_boundary():
    w, a, b, M = _boundary_rows(1e-3)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: spr_penalty(x, a, b, M), (w,), eps=1e-7,
                                    atol=1e-6)
    rows = [2, 3, 5, 6, 7]  # no tied maxima: bigm depends on ||w||_inf
    x = w.detach()[rows].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: bigm_penalty(x, a, b, M[rows]), (x,), eps=1e-7,
                                    atol=1e-6)


def test_gradient_finite_and_continuous_exactly_on_the_kinks():
    def grad(delta):
        w, a, b, M = _boundary_rows(delta)
        w.requires_grad_(True)
        spr_penalty(w, a, b, M).sum().backward()
        assert torch.isfinite(w.grad).all()
        return w.grad, (w.detach(), a, b, M)

    g0, args = grad(0.0)
    # SPR is C^1 across C1|C2 (rows 0, 1) and C2|C3 (rows 2, 3): both sides agree with the kink
    for delta in (1e-9, -1e-9):
        torch.testing.assert_close(grad(delta)[0][:4], g0[:4], rtol=1e-6, atol=1e-8)
    # and autograd is the closed-form gradient of mipprune.penalty.spr_grad
    torch.testing.assert_close(g0, S.spr_grad(*args), rtol=1e-12, atol=1e-14)


def test_no_nan_at_zero_in_any_case():
    w = torch.zeros(4, 5, dtype=D, requires_grad=True)
    # b = 0 and a = 0 are legal edge cases too
    v = spr_penalty(w, torch.tensor([0.0, 1.0, 1.0, 0.5], dtype=D),
                    torch.tensor([1.0, 0.0, 1.0, 0.5], dtype=D), 0.1)
    v.sum().backward()
    assert torch.equal(v, torch.zeros(4, dtype=D))
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("bad, match", [
    (dict(w=torch.zeros(3)), "2-D"),
    (dict(a=-1.0), "a must be >= 0"),
    (dict(M=0.0), "M must be > 0"),
    (dict(b=torch.ones(4)), "shape"),
    (dict(a="x"), "a must be a number"),
])
def test_spr_penalty_rejects_bad_input(bad, match):
    args = dict(w=torch.zeros(3, 2), a=1.0, b=1.0, M=1.0) | bad
    with pytest.raises(ValueError, match=match):
        spr_penalty(**args)


# ---- the regularizer on a model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def r20():
    torch.manual_seed(0)
    m = build_model("resnet20").double()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(torch.rand_like(p) * 0.6)  # groups spread over all three cases
    return m


def _np_groups(m, fam):
    """The groups of two families, rebuilt by hand from the state_dict (independent code)."""
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    if fam == "layer1.0.conv1":
        bn_w, bn_b = sd["layer1.0.bn1.weight"], sd["layer1.0.bn1.bias"]
        return np.stack([np.concatenate([sd["layer1.0.conv1.weight"][j].ravel(), [bn_w[j], bn_b[j]]])
                         for j in range(16)]), 16 * 9 + 2 + 16 * 9
    rows = []
    for c in range(16):
        parts = [sd["conv1.weight"][c].ravel(), [sd["bn1.weight"][c], sd["bn1.bias"][c]]]
        for blk in range(3):
            parts += [sd[f"layer1.{blk}.conv2.weight"][c].ravel(),
                      [sd[f"layer1.{blk}.bn2.weight"][c], sd[f"layer1.{blk}.bn2.bias"][c]]]
        rows.append(np.concatenate(parts))
    # writers: stem 3*9+2, 3 blocks (16*9+2); readers: 3 block conv1 (16*9), layer2.0.conv1 (32*9)
    return np.stack(rows), 3 * 9 + 2 + 3 * (16 * 9 + 2) + 3 * 16 * 9 + 32 * 9


PARAMS = CostConfig(macs=0, params=1)  # n_j / N: parameters only


def test_regularizer_equals_numpy_recipe(r20):
    lam, alpha, scale = 0.7, 0.3, 1.5
    reg = SPRRegularizer(r20, SPRConfig(lam=lam, alpha=alpha, M_scale=scale, cost=PARAMS,
                                        kinds=("filter", "stream")))
    got = reg.group_penalties()
    N = 269722
    for fam in ("layer1.0.conv1", "stream.layer1"):
        w, n = _np_groups(r20, fam)
        a, b, M = lam * alpha * n / N, lam * (1 - alpha) * n / N, scale * np.abs(w).max()
        assert reg.M[fam] == pytest.approx(M, rel=1e-15)
        np.testing.assert_allclose(reg.a[fam].numpy(), a, rtol=1e-15)
        np.testing.assert_allclose(got[fam].detach().numpy(), S.spr_value(w, a, b, M),
                                   rtol=1e-13)
    total = sum(v.sum() for v in got.values())
    torch.testing.assert_close(reg(), total, rtol=1e-13, atol=0)
    assert set(got) == {f.name for f in build_families(r20) if f.kind in ("filter", "stream")}


def test_regularizer_is_a_loss_term_with_autograd_gradient(r20):
    reg = SPRRegularizer(r20, SPRConfig(lam=1.0, cost=PARAMS))
    r20.zero_grad(set_to_none=True)
    loss = reg()
    assert all(p.grad is None for p in r20.parameters())
    loss.backward()
    g = r20.layer1[0].conv1.weight.grad
    w, _ = _np_groups(r20, "layer1.0.conv1")
    fam = "layer1.0.conv1"
    want = S.spr_grad(w, reg.a[fam].numpy(), reg.b[fam].numpy(), reg.M[fam])
    np.testing.assert_allclose(g.reshape(16, -1).numpy(), want[:, :-2], rtol=1e-12, atol=1e-15)
    assert r20.fc.weight.grad is None  # fc is not a group
    r20.zero_grad(set_to_none=True)


def test_cost_macs_and_mix(r20):
    fam = "layer1.0.conv1"
    conv = 9 * 32 * 32 * 16 * 16  # one 16->16 3x3 conv at 32x32 (= 32->32 at 16x16, ...)
    macs_total = 3 * 9 * 16 * 32 * 32 + 6 * conv + 2 * (conv // 2 + 5 * conv) + 64 * 10
    assert macs_total == 40_551_040  # ResNet-20 at 32x32
    per = 3 * 3 * 16 * 32 * 32 * 2  # writer (conv1 filter) + reader (conv2 input channel)
    r_m = SPRRegularizer(r20, SPRConfig(lam=1.0, alpha=0.5, cost=CostConfig(macs=1, params=0)))
    assert float(r_m.b[fam][0]) == pytest.approx(0.5 * per / macs_total, rel=1e-12)
    r_x = SPRRegularizer(r20, SPRConfig(lam=1.0, alpha=0.5,
                                        cost=CostConfig(macs=0.25, params=0.75)))
    n = 16 * 9 + 2 + 16 * 9
    assert float(r_x.b[fam][0]) == pytest.approx(
        0.5 * (0.75 * n / 269722 + 0.25 * per / macs_total), rel=1e-12)


def test_own_basis_is_the_authors_weighting_and_saved_counts_the_readers(r20):
    """basis own, params only: n_j = the filter and its BN pair (writers), over all params;
    basis saved adds the reader slices (here the next conv's input channel: 2x)."""
    fam, N = "layer1.0.conv1", 269722
    own = SPRRegularizer(r20, SPRConfig(lam=1.0, alpha=0.5,
                                        cost=CostConfig(macs=0, params=1, basis="own")))
    saved = SPRRegularizer(r20, SPRConfig(lam=1.0, alpha=0.5, cost=PARAMS))
    assert float(own.a[fam][0]) == pytest.approx(0.5 * (16 * 9 + 2) / N, rel=1e-12)
    assert float(saved.a[fam][0]) == pytest.approx(0.5 * (16 * 9 + 2 + 16 * 9) / N, rel=1e-12)
    ratio = float(saved.a[fam][0] / own.a[fam][0])
    assert 1.9 < ratio < 2.1
    with pytest.raises(ValueError, match="basis"):
        CostConfig(basis="writers")


def test_reference_state_dict_and_checkpoint_give_M(r20, tmp_path):
    ref = {k: v * 0 + 0.25 for k, v in r20.state_dict().items()}
    ref["layer1.0.bn1.bias"] = ref["layer1.0.bn1.bias"].clone()
    ref["layer1.0.bn1.bias"][3] = -4.0
    cfg = SPRConfig(lam=1.0, M_scale=2.0)
    reg = SPRRegularizer(r20, cfg, reference=ref)
    assert reg.M["layer1.0.conv1"] == 8.0 and reg.M["layer1.1.conv1"] == 0.5
    torch.save({"state_dict": ref, "epoch": 3}, tmp_path / "ref.pt")
    reg2 = SPRRegularizer(r20, cfg, reference=tmp_path / "ref.pt")
    assert reg2.M == reg.M
    with pytest.raises(ValueError, match="all zero"):
        SPRRegularizer(r20, cfg, reference={k: v * 0 for k, v in r20.state_dict().items()})


def test_project_keeps_weights_in_the_box_only_when_asked():
    m = build_model("resnet20", width=0.5).double()
    for mode in ("extend", "project"):
        reg = SPRRegularizer(m, SPRConfig(lam=1.0, beyond_M=mode))
        with torch.no_grad():
            m.layer2[1].conv1.weight.mul_(50)
        before = m.layer2[1].conv1.weight.clone()
        reg.project_()
        w = m.layer2[1].conv1.weight
        if mode == "extend":
            assert torch.equal(w, before)
        else:
            M = reg.M["layer2.1.conv1"]
            assert w.abs().max() <= M and (w.abs() == M).any()
            for f in reg.families:
                for p in f.writers:
                    assert dict(m.named_parameters())[p.param].abs().max() <= reg.M[f.name]


def test_case_stats_match_numpy_cases(r20):
    reg = SPRRegularizer(r20, SPRConfig(lam=5.0, alpha=0.2, M_scale=1.0, cost=PARAMS,
                                        kinds=("filter", "stream")))
    stats = reg.case_stats()
    w, n = _np_groups(r20, "stream.layer1")
    fam = "stream.layer1"
    case = S.spr(w, reg.a[fam].numpy(), reg.b[fam].numpy(), reg.M[fam]).case
    assert stats[fam]["C2"] == pytest.approx(np.mean(case == S.C2))
    assert stats["all"]["n"] == sum(f.size for f in reg.families)
    for s in stats.values():
        assert s["C1"] + s["C2"] + s["C3"] == pytest.approx(1.0)
    assert 0 < stats["all"]["C1"] < 1  # the scaled weights put groups in several cases


def test_bigm_option_uses_bigm_value(r20):
    reg = SPRRegularizer(r20, SPRConfig(lam=1.0, penalty="bigm", kinds=("filter",)))
    w, _ = _np_groups(r20, "layer1.0.conv1")
    fam = "layer1.0.conv1"
    np.testing.assert_allclose(reg.group_penalties()[fam].detach().numpy(),
                               S.bigm_value(w, reg.a[fam].numpy(), reg.b[fam].numpy(),
                                            reg.M[fam]), rtol=1e-13)
    assert all(f.kind == "filter" for f in reg.families)


@pytest.mark.parametrize("kw, match", [
    (dict(lam=-1.0), "lam"), (dict(lam=1.0, alpha=1.5), "alpha"),
    (dict(lam=1.0, M_scale=0), "M_scale"), (dict(lam=1.0, cost="flops"), "cost"),
    (dict(lam=1.0, cost=2.0), "cost"), (dict(lam=float("inf")), "lam"), (dict(lam=1.0, kinds=("filters",)), "kinds"),
    (dict(lam=1.0, beyond_M="clip"), "beyond_M"), (dict(lam=1.0, penalty="l1"), "penalty"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SPRConfig(**kw)


def test_groups_of_g_structures_are_one_spr_group_each(r20):
    """group=g: row j of a family's groups concatenates structures jg..jg+g-1; a and b are the
    sums of their structures' costs; the penalty equals SPR on those rows."""
    g = 4
    one = SPRRegularizer(r20, SPRConfig(lam=2.0, alpha=0.3, cost=PARAMS))
    grp = SPRRegularizer(r20, SPRConfig(lam=2.0, alpha=0.3, cost=PARAMS, group=g))
    params = dict(r20.named_parameters())
    for f in grp.families:
        w = group_weights(params, f).detach()
        rows = w.reshape(f.size // g, -1)
        torch.testing.assert_close(grp.weights(params, f), rows)
        torch.testing.assert_close(grp.a[f.name], one.a[f.name].reshape(-1, g).sum(1))
        want = S.spr_value(rows.double().numpy(), grp.a[f.name].numpy(), grp.b[f.name].numpy(),
                           grp.M[f.name])
        np.testing.assert_allclose(grp.group_penalties()[f.name].detach().double().numpy(),
                                   want, rtol=1e-5)
    with pytest.raises(ValueError, match="does not divide"):
        SPRRegularizer(r20, SPRConfig(lam=1.0, group=3))
    with pytest.raises(ValueError, match="group"):
        SPRConfig(lam=1.0, group=0)
