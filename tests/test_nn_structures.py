"""Prunable structures: counts per model, ownership of every parameter, sizes and costs."""

from collections import Counter

import pytest
import torch

from nn import Family, Piece, build_model, group_weights, prunable_structures

CASES = [("resnet20", dict(shortcut="A")), ("resnet20", dict(shortcut="B")),
         ("resnet18", dict(width=0.25)), ("resnet50", dict(width=0.25)),
         ("resnet50", dict(width=0.25, shortcut="A"))]


def _fams(name, kw, size=(3, 32, 32)):
    m = build_model(name, **kw)
    return m, prunable_structures(m, size)


def test_resnet20_counts():
    _, fams = _fams("resnet20", {})
    kinds = Counter(f.kind for f in fams)
    assert kinds == {"filter": 9, "stream": 3, "block_out": 9, "block": 7}
    assert sorted(f.size for f in fams if f.kind == "filter") == [16] * 3 + [32] * 3 + [64] * 3
    assert [f.size for f in fams if f.kind == "stream"] == [16, 32, 64]
    # the first blocks of stages 2 and 3 change width: not removable
    assert "block.layer2.0" not in {f.name for f in fams}
    assert "block.layer1.0" in {f.name for f in fams}
    names = [f.name for f in fams]
    assert len(names) == len(set(names))


def test_resnet50_and_resnet18_counts():
    _, f50 = _fams("resnet50", dict(width=0.25))
    assert Counter(f.kind for f in f50) == {"filter": 33, "stream": 4, "block_out": 16, "block": 12}
    stem = next(f for f in f50 if f.name == "conv1")  # feeds layer1.0's conv1 and downsample
    assert stem.kind == "filter" and {p.param for p in stem.readers} == {
        "layer1.0.conv1.weight", "layer1.0.downsample.0.weight"}
    _, f18 = _fams("resnet18", dict(width=0.25))
    assert Counter(f.kind for f in f18) == {"filter": 8, "stream": 4, "block_out": 8, "block": 5}
    s1 = next(f for f in f18 if f.name == "stream.layer1")  # stem writes the layer1 stream
    assert Piece("conv1.weight", 0) in s1.writers


def _coverage(model, fams, kinds, role="writers"):
    params = dict(model.named_parameters())
    cover = {n: torch.zeros_like(p, dtype=torch.long) for n, p in params.items()}
    for f in fams:
        if f.kind not in kinds:
            continue
        for p in getattr(f, role):
            if p.dim is None:
                cover[p.param] += 1
            else:
                cover[p.param] += 1  # every slice j of the axis belongs to structure j once
                assert params[p.param].shape[p.dim] == f.size
    return cover


@pytest.mark.parametrize("name, kw", CASES)
def test_every_parameter_owned_as_claimed(name, kw):
    m, fams = _fams(name, kw)
    own = _coverage(m, fams, ("filter", "stream"))
    for n, c in own.items():
        want = 0 if n.startswith("fc.") else 1
        assert bool((c == want).all()), n  # filter+stream writers partition all but fc
    out = _coverage(m, fams, ("block_out",))
    assert all(bool((out[n] <= own[n]).all()) for n in own)  # block_out writers are stream ones
    blocks = _coverage(m, fams, ("block",))
    for f in fams:
        if f.kind == "block":
            prefix = f.name[len("block."):] + "."
            mine = {n for n in own if n.startswith(prefix) and ".downsample." not in n}
            assert {p.param for p in f.writers} == mine and f.size == 1
    assert sum(int(c.sum()) for c in blocks.values()) == sum(
        f.params[0] for f in fams if f.kind == "block")
    # the only readers of the last stream outside the blocks: the fc columns
    last = [f for f in fams if f.kind == "stream"][-1]
    assert Piece("fc.weight", 1) in last.readers


@pytest.mark.parametrize("name, kw", CASES[:2] + CASES[3:4])
def test_params_and_macs_per_structure_by_hand(name, kw):
    m, fams = _fams(name, kw)
    by = {f.name: f for f in fams}
    if name == "resnet20":
        f = by["layer2.1.conv1"]  # 32 filters of 32x3x3 + BN, read by conv2 (32x3x3 each)
        assert f.params == (32 * 9 + 2 + 32 * 9,) * 32
        assert f.macs == (2 * 32 * 9 * 16 * 16,) * 32
        s3 = by["stream.layer3"]
        ds = 2 if kw["shortcut"] == "B" else 0  # downsample BN (+ 1x1 conv, below)
        want = 3 * (64 * 9 + 2) + ds + 2 * 64 * 9 + (32 if ds else 0) + 10
        assert s3.params == (want,) * 64  # writers: 3 last convs (+ds); readers: 2 conv1s, fc
        assert s3.macs == ((3 * 64 * 9 + 2 * 64 * 9 + (32 if ds else 0)) * 64 + 10,) * 64
        assert by["block.layer1.1"].params == (2 * (16 * 16 * 9 + 32),)
        assert by["layer3.2.conv2"].params == (64 * 9 + 2,) * 64
    else:
        f = by["layer1.0.conv2"]  # bottleneck middle 3x3: a free filter family of 16
        assert f.kind == "filter" and f.size == 16
        assert f.params == (16 * 9 + 2 + 64,) * 16


def test_group_weights_rows_are_writer_slices():
    m, fams = _fams("resnet20", dict(width=0.5))
    params = dict(m.named_parameters())
    f = next(f for f in fams if f.name == "stream.layer2")
    g = group_weights(params, f)
    assert g.shape == (16, 3 * (16 * 9 + 2) + 0)
    j = 5
    want = torch.cat([torch.cat([params[f"layer2.{b}.conv2.weight"][j].ravel(),
                                 params[f"layer2.{b}.bn2.weight"][j:j + 1],
                                 params[f"layer2.{b}.bn2.bias"][j:j + 1]]) for b in range(3)])
    assert torch.equal(g[j], want)
    blk = next(f for f in fams if f.kind == "block")
    assert group_weights(params, blk).shape == (1, blk.params[0])


def test_family_validation_and_non_resnet():
    with pytest.raises(ValueError, match="kind"):
        Family("x", "channel", 1, (Piece("a", 0),), (), (1,), (1,), None)
    with pytest.raises(ValueError, match="length"):
        Family("x", "filter", 2, (Piece("a", 0),), (), (1,), (1, 1), None)
    with pytest.raises(ValueError, match="dim"):
        Piece("conv1.weight", -1)
    with pytest.raises(ValueError, match="ResNet"):
        prunable_structures(torch.nn.Linear(3, 3))
