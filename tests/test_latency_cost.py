"""``--cost latency``: a structure's price is its marginal latency from the latency table, read
the same way by SPR (a_j, b_j) and the variational pruner (a linear term in theta)."""

import pytest
import torch

from nn import CostConfig, SPRConfig, SPRRegularizer, build_model, prunable_structures
from nn.budget_latency import marginal_latency
from nn.cost import parse_cost
from nn.latency import measure_table, network_layers, predict
from nn.methods.variational import GatedResNet

SIZE = (3, 8, 8)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("resnet20", 4, 3, 0.25).eval()
    table = measure_table(model, SIZE, batch=2, granularity=2, repeats=1, warmup=0,
                          quiet=None, steady=False, progress=False)
    layers = network_layers(model, SIZE)
    structures = prunable_structures(model, SIZE)
    lat = {"marginal": marginal_latency(table, layers, structures),
           "dense_ms": predict(table, layers)}
    return model, table, layers, structures, lat


def test_marginal_latency_is_the_slope_below_the_dense_width(tiny):
    model, table, layers, structures, lat = tiny
    f = next(s for s in structures if s.name == "layer2.1.conv1")  # 8 wide, grid step 2
    want = 0.0
    for ly in layers:
        if f.name in (ly.in_family, ly.out_family):
            lo_in = 6 if ly.in_family == f.name else ly.in_channels
            lo_out = 6 if ly.out_family == f.name else ly.out_channels
            want += (table.lookup(ly, ly.in_channels, ly.out_channels)
                     - table.lookup(ly, lo_in, lo_out)) / 2
    assert lat["marginal"][f.name] == pytest.approx(max(0.0, table.scale * want), rel=1e-12)
    assert all(v >= 0 for v in lat["marginal"].values())
    block = "block.layer2.1"
    assert lat["marginal"][block] == pytest.approx(table.scale * sum(
        table.lookup(ly, ly.in_channels, ly.out_channels) for ly in layers
        if ly.block == block), rel=1e-12)
    assert lat["marginal"][block] > 0 and lat["dense_ms"] > 0


def test_spr_reads_the_latency_weight(tiny):
    model, _, _, _, lat = tiny
    cfg = SPRConfig(lam=2.0, alpha=0.25, cost=CostConfig(macs=0, params=0, latency=1.0))
    reg = SPRRegularizer(model, cfg, SIZE, latency=lat)
    for f in reg.families:
        want = lat["marginal"][f.name] / lat["dense_ms"]
        torch.testing.assert_close(reg.a[f.name], torch.full((f.size,), 0.5 * want,
                                                            dtype=torch.float64))
    with pytest.raises(ValueError, match="latency"):
        SPRRegularizer(model, cfg, SIZE)


def test_the_variational_cost_is_linear_in_theta_with_the_marginal_latencies(tiny):
    model, _, _, _, lat = tiny
    gated = GatedResNet(model, SIZE, lam=1.5, cost=CostConfig(macs=0, params=0, latency=2.0),
                        latency=lat)
    g = gated.marginal_costs()
    for gate in gated.gates:
        want = 1.5 * 2.0 * lat["marginal"][gate.name] / lat["dense_ms"]
        torch.testing.assert_close(g[gate.slice].double(),
                                   torch.full((gate.size,), want, dtype=torch.float64),
                                   rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="latency"):
        GatedResNet(model, SIZE, cost=CostConfig(latency=1.0))


def test_cost_latency_spellings():
    assert parse_cost("latency=1,macs=0,params=0") == {"latency": 1.0, "macs": 0.0,
                                                        "params": 0.0}
    with pytest.raises(ValueError, match="latency"):
        CostConfig(latency=-1)
