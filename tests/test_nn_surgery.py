"""Physical removal: pruned logits == masked logits, exact parameter/MAC savings, file format."""

import pytest
import torch

from nn import (PrunedResNet, analytic_macs, apply_masks, build_model, compress, count_macs,
                count_params, load_pruned, prunable_structures, save_pruned)

D = torch.float64
CIFAR = [(f"resnet{d}", dict(shortcut=s)) for d in (20, 32, 44, 56, 110) for s in "AB"]
IMAGENET = [("resnet18", dict(width=0.25)), ("resnet34", dict(width=0.125)),
            ("resnet50", dict(width=0.25)), ("resnet18", dict(width=0.25, shortcut="A")),
            ("resnet50", dict(width=0.25, shortcut="A"))]


def _model(name, kw, dtype=D, seed=0):
    """A model with random BN statistics and affine terms (so every constant is non-trivial)."""
    torch.manual_seed(seed)
    m = build_model(name, **kw).to(dtype)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.weight.data.uniform_(0.3, 1.0)
            mod.bias.data.normal_(0, 0.3)
            mod.running_mean.normal_(0, 0.3)
            mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _random_masks(fams, p, seed):
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for f in fams:
        m = torch.rand(f.size, generator=g) < p
        if f.kind == "stream" or f.name == "conv1":
            m[torch.randint(f.size, (1,), generator=g)] = True  # streams keep >= 1 channel
        masks[f.name] = m
    return masks


def _check_exact(model, masks, x, tol):
    pruned = compress(model, masks)
    masked = apply_masks(model, masks).eval()
    with torch.no_grad():
        want, got = masked(x), pruned(x)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * (1 + want.abs().max().item()))
    return pruned


@pytest.mark.parametrize("name, kw", CIFAR + IMAGENET,
                         ids=[f"{n}-{k.get('shortcut', 'B')}-{k.get('width', 1)}"
                              for n, k in CIFAR + IMAGENET])
def test_pruned_equals_masked_random_masks(name, kw):
    size = (3, 8, 8) if name in dict(CIFAR) else (3, 32, 32)
    model = _model(name, kw)
    fams = prunable_structures(model, size)
    x = torch.randn(3, *size, dtype=D)
    for seed, p in ((1, 0.6), (2, 0.25)):
        pruned = _check_exact(model, _random_masks(fams, p, seed), x, 1e-10)
        assert count_params(pruned) < count_params(model)
    stages = pruned.spec["stages"]
    assert any(b["index"] is not None for st in stages for b in st)  # subset adds exercised


def test_float32_tolerance_and_original_untouched():
    model = _model("resnet20", dict(shortcut="A"), dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fams = prunable_structures(model, (3, 16, 16))
    pruned = _check_exact(model, _random_masks(fams, 0.5, 3), torch.randn(4, 3, 16, 16), 1e-5)
    assert pruned.fc.weight.dtype == torch.float32 and not pruned.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name, kw", [("resnet20", dict(shortcut="A")),
                                      ("resnet56", dict(shortcut="B")),
                                      ("resnet50", dict(width=0.25))])
def test_every_removable_block_removed(name, kw):
    size = (3, 8, 8) if name != "resnet50" else (3, 32, 32)
    model = _model(name, kw)
    fams = prunable_structures(model, size)
    masks = {f.name: torch.zeros(1, dtype=torch.bool) for f in fams if f.kind == "block"}
    pruned = _check_exact(model, masks, torch.randn(2, *size, dtype=D), 1e-10)
    kept = [b["source"] for st in pruned.spec["stages"] for b in st]
    assert kept == [f"layer{s}.0" for s in range(2 if name != "resnet50" else 1,
                                                 len(model.arch["layers"]) + 1)]
    removed = sum(f.params[0] for f in fams if f.kind == "block")
    assert count_params(model) - count_params(pruned) == removed
    # with random masks on everything else as well
    both = _random_masks(fams, 0.5, 7) | masks
    _check_exact(model, both, torch.randn(2, *size, dtype=D), 1e-10)


@pytest.mark.parametrize("name, kw, cut", [
    ("resnet20", dict(shortcut="A"), ["layer1.1.conv1", "layer2.0.conv1", "layer3.2.conv1"]),
    ("resnet20", dict(shortcut="B"), ["layer2.0.conv1"]),
    ("resnet50", dict(width=0.25), ["layer1.0.conv1", "layer2.1.conv2", "layer3.0.conv2"]),
])
def test_cut_branch_becomes_an_exact_constant(name, kw, cut):
    size = (3, 8, 8) if name != "resnet50" else (3, 32, 32)
    model = _model(name, kw)
    fams = {f.name: f for f in prunable_structures(model, size)}
    masks = {c: torch.zeros(fams[c].size, dtype=torch.bool) for c in cut}
    x = torch.randn(3, *size, dtype=D)
    pruned = _check_exact(model, masks, x, 1e-10)
    consts = {b["source"]: b for st in pruned.spec["stages"] for b in st if b["branch"] == "const"}
    assert set(consts) == {c.rsplit(".", 1)[0] for c in cut}
    for src in consts:  # a non-trivial constant: dropping it instead would change the logits
        s, b = src[len("layer"):].split(".")
        blk = getattr(pruned, f"layer{s}")[int(b)]
        assert blk.bias.abs().max() > 1e-3
        with torch.no_grad():
            ref = pruned(x)
            blk.bias.zero_()
            assert not torch.allclose(pruned(x), ref)
            pruned = compress(model, masks)
    # with partial subsets of the stream too
    _check_exact(model, _random_masks(list(fams.values()), 0.7, 5) | masks, x, 1e-10)


def test_all_free_filters_removed_leaves_constants():
    model = _model("resnet20", dict(shortcut="B"))
    fams = prunable_structures(model, (3, 8, 8))
    masks = {f.name: torch.zeros(f.size, dtype=torch.bool) for f in fams if f.kind == "filter"}
    pruned = _check_exact(model, masks, torch.randn(2, 3, 8, 8, dtype=D), 1e-10)
    # left: stem, option-B downsamples, one bias per block (its stream width), fc
    want = (3 * 9 * 16 + 32) + (16 * 32 + 64) + (32 * 64 + 128) + 3 * (16 + 32 + 64) + 650
    assert count_params(pruned) == want


@pytest.mark.parametrize("name, kw", [("resnet20", dict(shortcut="B")),
                                      ("resnet50", dict(width=0.25))])
def test_removal_saves_exactly_the_claimed_params_and_macs(name, kw):
    size = (3, 16, 16) if name == "resnet20" else (3, 32, 32)
    model = _model(name, kw, dtype=torch.float32)
    fams = prunable_structures(model, size)
    p0, m0 = count_params(model), count_macs(model, size)
    macs = analytic_macs  # = count_macs (test_nn_complexity), without the flop counter's overhead
    g = torch.Generator().manual_seed(0)
    # one family at a time (families overlap: a conv read by one is written by another); keep
    # >= 1 so no branch is cut.  Every stream, the stem, and filter / block_out families of the
    # first and last blocks (downsample and identity ones): each kind of piece is exercised.
    names = {f.name for f in fams if f.kind == "stream" or f.name == "conv1"}
    blocks = ("layer1.0.", "layer2.0.", f"layer{len(model.arch['layers'])}.2.")
    names |= {f.name for f in fams if f.kind in ("filter", "block_out")
              and f.name.startswith(blocks)}
    for f in fams:
        if f.name not in names:
            continue
        keep = torch.rand(f.size, generator=g) < 0.5
        keep[0] = True
        pruned = compress(model, {f.name: keep})
        gone = [j for j in range(f.size) if not keep[j]]
        assert p0 - count_params(pruned) == sum(f.params[j] for j in gone), f.name
        assert m0 - macs(pruned, size) == sum(f.macs[j] for j in gone), f.name
    if name == "resnet20":  # free filter families are disjoint: remove all but one of each
        masks = {f.name: torch.arange(f.size) == 0 for f in fams if f.kind == "filter"}
        saved = sum(sum(f.params[1:]) for f in fams if f.kind == "filter")
        assert p0 - count_params(compress(model, masks)) == saved


def test_save_load_round_trip_weights_only(tmp_path):
    model = _model("resnet50", dict(width=0.25, shortcut="A"))
    fams = prunable_structures(model, (3, 32, 32))
    masks = _random_masks(fams, 0.5, 11) | {"layer2.1.conv1": torch.zeros(32, dtype=torch.bool)}
    pruned = compress(model, masks)
    path = save_pruned(pruned, tmp_path / "net.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt"]  # no temporary left over
    blob = torch.load(path, weights_only=True)
    assert blob["spec"] == pruned.spec
    loaded = load_pruned(path)
    assert isinstance(loaded, PrunedResNet) and not loaded.training
    assert loaded.fc.weight.dtype == D
    x = torch.randn(2, 3, 32, 32, dtype=D)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a pruned model"):
        load_pruned(tmp_path / "other.pt")


def test_masked_model_zeroes_exactly_the_removed_slices():
    model = _model("resnet20", dict(shortcut="A"))
    masks = {"layer1.0.conv1": torch.tensor([False] + [True] * 15),
             "stream.layer2": torch.tensor([True] * 31 + [False])}
    masked = apply_masks(model, masks)
    assert masked.layer1[0].conv1.weight[0].abs().sum() == 0
    assert masked.layer1[0].conv1.weight[1:].abs().min() > 0
    assert masked.layer1[0].bn1.bias[0] == 0
    assert masked.layer1[0].conv2.weight[:, 0].abs().sum() == 0
    assert masked.layer2[1].conv2.weight[31].abs().sum() == 0
    assert masked.layer3[0].conv1.weight[:, 31].abs().sum() == 0  # reader in the next stage
    assert masked.layer2[0].downsample.keep.tolist() == [1.0] * 31 + [0.0]
    assert model.layer2[0].downsample.keep.min() == 1  # original untouched


def test_bad_masks_raise():
    model = _model("resnet20", dict(shortcut="A"))
    with pytest.raises(ValueError, match="every channel of 'stream.layer2'"):
        compress(model, {"stream.layer2": torch.zeros(32, dtype=torch.bool)})
    with pytest.raises(ValueError, match="unknown families"):
        compress(model, {"layer9.0.conv1": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        compress(model, {"layer1.0.conv1": torch.ones(15, dtype=torch.bool)})
    with pytest.raises(ValueError, match="bool"):
        apply_masks(model, {"layer1.0.conv1": torch.ones(16)})
    r50 = _model("resnet50", dict(width=0.125))
    with pytest.raises(ValueError, match="'conv1'"):
        compress(r50, {"conv1": torch.zeros(8, dtype=torch.bool)})
