"""MACs (flop counter vs shapes vs closed form), parameters of pruned models, latency."""

import pytest
import torch

from nn import (analytic_macs, build_model, compress, count_macs, count_params, layer_macs,
                measure_latency, prunable_structures)


def _cifar_macs(n, hw=32, shortcut="A", classes=10):
    """Closed form for CIFAR ResNet-(6n+2): 3x3 convs only, plus option-B 1x1 downsamples."""
    conv = lambda cin, cout, side: cin * cout * 9 * side * side  # noqa: E731
    total = conv(3, 16, hw) + 2 * n * conv(16, 16, hw)
    for cin, cout, side in ((16, 32, hw // 2), (32, 64, hw // 4)):
        total += conv(cin, cout, side) + (2 * n - 1) * conv(cout, cout, side)
        total += cin * cout * side * side if shortcut == "B" else 0
    return total + 64 * classes


def test_resnet56_macs_about_125m():
    m = build_model("resnet56")
    macs = count_macs(m, (3, 32, 32))
    assert 125e6 <= macs <= 127e6
    assert macs == analytic_macs(m, (3, 32, 32)) == _cifar_macs(9) == 125_485_696


@pytest.mark.parametrize("name, n, shortcut, hw", [("resnet20", 3, "A", 32),
                                                   ("resnet32", 5, "B", 16),
                                                   ("resnet110", 18, "B", 8)])
def test_flop_counter_equals_analytic_and_closed_form(name, n, shortcut, hw):
    m = build_model(name, shortcut=shortcut)
    size = (3, hw, hw)
    assert count_macs(m, size) == analytic_macs(m, size) == _cifar_macs(n, hw, shortcut)
    assert layer_macs(m, size)["fc"] == 640


def test_imagenet_macs_match_published():
    r18 = build_model("resnet18", num_classes=1000)
    assert 1.80e9 <= analytic_macs(r18, (3, 224, 224)) <= 1.83e9  # "1.8 GFLOPs"
    m = build_model("resnet50", width=0.25, num_classes=10)
    assert count_macs(m, (3, 64, 64)) == analytic_macs(m, (3, 64, 64))


def test_pruned_model_counts_and_masking_does_not_save():
    m = build_model("resnet20", shortcut="A").eval()
    fams = prunable_structures(m, (3, 32, 32))
    g = torch.Generator().manual_seed(0)
    masks = {f.name: torch.rand(f.size, generator=g) < 0.5 for f in fams if f.kind == "filter"}
    for v in masks.values():
        v[0] = True
    pruned = compress(m, masks)
    macs = count_macs(pruned, (3, 32, 32))
    assert macs == analytic_macs(pruned, (3, 32, 32))  # index_add / pad are not MACs
    saved = sum(f.macs[j] for f in fams if f.name in masks for j in range(f.size)
                if not masks[f.name][j])
    assert count_macs(m, (3, 32, 32)) - macs == saved
    assert count_params(pruned) < count_params(m)


def test_counting_leaves_training_flags_and_bn_stats_alone():
    m = build_model("resnet20", width=0.25).train()
    m.layer1[0].eval()
    stats = m.bn1.running_mean.clone()
    count_macs(m, (3, 32, 32))
    prunable_structures(m, (3, 32, 32))
    assert m.training and not m.layer1[0].training and m.layer1[1].training
    assert torch.equal(m.bn1.running_mean, stats)


def test_measure_latency():
    m = build_model("resnet20", width=0.25)
    r = measure_latency(m, (3, 32, 32), batch_size=2, device="cpu", warmup=1, repeats=5)
    assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["min_ms"] > 0
    assert r["batch_size"] == 2 and r["repeats"] == 5 and r["device"] == "cpu"
    assert r["throughput"] == pytest.approx(2 / (r["median_ms"] / 1e3))
    assert not m.training
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(m, (3, 32, 32), repeats=0)
