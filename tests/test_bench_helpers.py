"""Benchmark helpers (benchmarks.measure): exact inference transforms and mask construction."""

import pathlib

import pytest
import torch

from benchmarks.measure import (block_masks, fold_bn, fraction_masks, merge_masks, padded_macs,
                                round_masks)
from nn import build_model, compress, count_macs, prunable_structures


def _randomised(model, seed=0):
    """Non-trivial BN statistics so folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_fold_bn_is_exact_on_dense_and_pruned(shortcut):
    torch.manual_seed(0)
    model = _randomised(build_model("resnet20", width=0.5, shortcut=shortcut).double())
    fams = prunable_structures(model, (3, 16, 16))
    pruned = compress(model, merge_masks(fraction_masks(fams, 0.5, seed=1), block_masks(fams, 0.3)))
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    for net in (model, pruned):
        folded = fold_bn(net)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        with torch.no_grad():
            torch.testing.assert_close(folded(x), net(x), rtol=1e-10, atol=1e-10)


def test_mask_counts():
    fams = prunable_structures(build_model("resnet20"), (3, 32, 32))
    masks = fraction_masks(fams, 0.3, seed=0)
    filters = [f for f in fams if f.kind == "filter"]
    assert set(masks) == {f.name for f in filters}
    for f in filters:
        assert int((~masks[f.name]).sum()) == round(0.3 * f.size)
    assert fraction_masks(fams, 0.3, seed=0).keys() == masks.keys()
    assert all(torch.equal(masks[k], fraction_masks(fams, 0.3, seed=0)[k]) for k in masks)
    rounded = round_masks(fams, masks, multiple=8)
    assert all(int(m.sum()) % 8 == 0 for m in rounded.values())
    blocks = block_masks(fams, 1 / 3)
    n_blocks = sum(f.kind == "block" for f in fams)
    assert sum(int((~m).sum()) for m in blocks.values()) == round(n_blocks / 3)
    with pytest.raises(ValueError, match="fraction must be in"):
        fraction_masks(fams, 1.0)


def test_padded_macs():
    model = build_model("resnet20")  # widths 16/32/64: already multiples of 16
    assert padded_macs(model, (3, 32, 32)) == count_macs(model, (3, 32, 32))
    fams = prunable_structures(model, (3, 32, 32))
    pruned = compress(model, fraction_masks(fams, 0.5, seed=0))
    assert padded_macs(pruned, (3, 32, 32), block=1) == count_macs(pruned, (3, 32, 32))
    assert padded_macs(pruned, (3, 32, 32)) > count_macs(pruned, (3, 32, 32))


def test_library_never_imports_benchmarks():
    """DESIGN §2: benchmarks use the library, never the other way round."""
    root = pathlib.Path(__file__).resolve().parent.parent
    offenders = [str(p.relative_to(root))
                 for d in ("nn", "mipprune") for p in (root / d).rglob("*.py")
                 if any(line.strip().startswith(("import benchmarks", "from benchmarks"))
                        for line in p.read_text().splitlines())]
    assert offenders == []
