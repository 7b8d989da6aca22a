"""A module tree with torchvision's ResNet names is accepted as it is (duck-typed).

``TVResNet``/``TVBasicBlock``/``TVBottleneck`` mirror torchvision's ``ResNet``, ``BasicBlock``
and ``Bottleneck`` (v1.5: the stride on the 3x3 conv) -- their attributes, registration order
and forward -- with a ``base`` width so the models stay small; torchvision itself cannot import
with the CPU torch build used here.  On the same architecture: our state_dict loads key for
key and gives the same logits, the prunable structures are equal, compress gives pruned logits
equal to masked logits and the same pruned network as ours, and GatedResNet wraps it.  Where
torchvision imports, the real ``torchvision.models.resnet18(num_classes=10)`` is checked too.
"""

import pytest
import torch
from torch import nn as tnn

from nn import (apply_masks, compress, count_macs, count_params, layer_macs,
                prunable_structures)
from nn.methods.variational.gated import GatedResNet
from nn.models import BasicBlock, Bottleneck, PadShortcut, ResNet, family_of
from nn.models.resnet import arch_of, layout

from helpers import random_bn_

D = torch.float64


def conv3x3(cin, cout, stride=1):
    return tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def conv1x1(cin, cout, stride=1):
    return tnn.Conv2d(cin, cout, 1, stride, bias=False)


class TVBasicBlock(tnn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.relu = tnn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVBottleneck(tnn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = tnn.BatchNorm2d(planes * self.expansion)
        self.relu = tnn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVResNet(tnn.Module):
    """torchvision's ResNet tree; ``shortcut="A"`` puts our PadShortcut where torchvision
    puts its 1x1 conv + BN, ``stem="cifar"`` the usual CIFAR edit (3x3/1 conv, no max-pool)."""

    def __init__(self, block, layers, num_classes=10, base=64, shortcut="B", stem="imagenet"):
        super().__init__()
        self.inplanes = base
        if stem == "imagenet":
            self.conv1 = tnn.Conv2d(3, base, 7, 2, 3, bias=False)
        else:
            self.conv1 = conv3x3(3, base)
        self.bn1 = tnn.BatchNorm2d(base)
        self.relu = tnn.ReLU(inplace=True)
        self.maxpool = tnn.MaxPool2d(3, 2, 1) if stem == "imagenet" else tnn.Identity()
        self.shortcut = shortcut
        self.layer1 = self._make_layer(block, base, layers[0])
        self.layer2 = self._make_layer(block, base * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, base * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, base * 8, layers[3], 2)
        self.avgpool = tnn.AdaptiveAvgPool2d((1, 1))
        self.fc = tnn.Linear(base * 8 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        out = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = PadShortcut(self.inplanes, out, stride) if self.shortcut == "A" else \
                tnn.Sequential(conv1x1(self.inplanes, out, stride), tnn.BatchNorm2d(out))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = out
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return tnn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# (kind, shortcut, stem): both block types, both shortcut options, both stems
CASES = [("basic", "B", "imagenet"), ("basic", "A", "cifar"), ("bottleneck", "B", "imagenet"),
         ("bottleneck", "A", "cifar")]
SIZE = {"imagenet": (3, 32, 32), "cifar": (3, 8, 8)}


def pair(kind, shortcut, stem, base=8, seed=0):
    """Our ResNet and the torchvision tree with the same architecture and weights (float64)."""
    torch.manual_seed(seed)
    block, tv_block = (BasicBlock, TVBasicBlock) if kind == "basic" else \
        (Bottleneck, TVBottleneck)
    ours = ResNet(block, (2, 2, 2, 2), tuple(base * 2 ** i for i in range(4)), stem,
                  shortcut=shortcut)
    ours = random_bn_(ours, seed).to(D).eval()
    tv = TVResNet(tv_block, (2, 2, 2, 2), base=base, shortcut=shortcut, stem=stem).to(D).eval()
    assert list(tv.state_dict()) == list(ours.state_dict())  # key for key, in order
    tv.load_state_dict(ours.state_dict(), strict=True)
    return ours, tv


def random_masks(fams, p, seed):
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for f in fams:
        m = torch.rand(f.size, generator=g) < p
        if f.kind == "stream" or f.name == "conv1":
            m[0] = True
        masks[f.name] = m
    return masks


@pytest.mark.parametrize("kind, shortcut, stem", CASES)
def test_same_logits_layout_and_structures_as_ours(kind, shortcut, stem):
    ours, tv = pair(kind, shortcut, stem)
    size = SIZE[stem]
    x = torch.randn(2, *size, dtype=D)
    with torch.no_grad():
        assert torch.equal(tv(x), ours(x))
    assert family_of(tv).name == "resnet"
    assert layout(tv) == layout(ours)
    assert prunable_structures(tv, size) == prunable_structures(ours, size)
    assert layer_macs(tv, size) == layer_macs(ours, size)
    assert count_macs(tv, size) == count_macs(ours, size)
    assert count_params(tv) == count_params(ours)


def test_arch_is_read_from_the_layout():
    ours, tv = pair("bottleneck", "B", "imagenet")
    derived = arch_of(tv)
    assert derived["name"] == "TVResNet" and derived["width"] is None
    skip = ("name", "width")
    assert {k: v for k, v in derived.items() if k not in skip} == \
        {k: v for k, v in ours.arch.items() if k not in skip}
    assert arch_of(pair("basic", "A", "cifar")[1])["stem"] == "cifar"


@pytest.mark.parametrize("kind, shortcut, stem", CASES)
def test_compress_equals_masked_and_ours(kind, shortcut, stem):
    ours, tv = pair(kind, shortcut, stem)
    size = SIZE[stem]
    fams = prunable_structures(tv, size)
    x = torch.randn(3, *size, dtype=D)
    by = {f.name: f for f in fams}
    # a cut branch in layer2.1 (its first conv keeps no filter, the rest of it is kept)
    cut = {"layer2.1.conv1": torch.zeros(by["layer2.1.conv1"].size, dtype=torch.bool),
           "block.layer2.1": torch.tensor([True]), "block.layer3.1": torch.tensor([False])}
    cut |= {n: torch.ones(f.size, dtype=torch.bool) for n, f in by.items()
            if n.startswith("layer2.1.") and n != "layer2.1.conv1"}
    for seed, p in ((1, 0.6), (2, 0.3)):
        masks = random_masks(fams, p, seed) | cut
        pruned = compress(tv, masks)
        masked = apply_masks(tv, masks).eval()
        assert type(masked) is TVResNet
        with torch.no_grad():
            want, got = masked(x), pruned(x)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * (1 + want.abs().max()))
        mine = compress(ours, masks)
        assert {k: v for k, v in pruned.spec.items() if k != "source"} == \
            {k: v for k, v in mine.spec.items() if k != "source"}
        sd, sd_mine = pruned.state_dict(), mine.state_dict()
        assert list(sd) == list(sd_mine) and all(torch.equal(sd[k], sd_mine[k]) for k in sd)
        assert pruned.spec["source"] == arch_of(tv)
        assert any(b["branch"] == "const" for st in pruned.spec["stages"] for b in st)


@pytest.mark.parametrize("kind, shortcut, stem", CASES[:3])
def test_gated_resnet_wraps_it(kind, shortcut, stem):
    ours, tv = pair(kind, shortcut, stem)
    size = SIZE[stem]
    g_tv, g_ours = GatedResNet(tv, size, estimator="st"), GatedResNet(ours, size, estimator="st")
    assert [g.name for g in g_tv.gates] == [g.name for g in g_ours.gates]
    assert g_tv.dense_macs == g_ours.dense_macs and torch.equal(g_tv.unit_cost, g_ours.unit_cost)
    x = torch.randn(2, *size, dtype=D)
    with torch.no_grad():  # eval at theta = 1: the dense network
        torch.testing.assert_close(g_tv.eval()(x), tv(x), rtol=1e-12, atol=1e-12)
    xi = torch.rand(g_tv.theta.shape, generator=torch.Generator().manual_seed(3)) < 0.7
    outs = []
    for g in (g_tv, g_ours):
        g.train()
        g.theta.fill_(0.5)
        logits = g(x, xi=xi)
        logits.sum().backward()
        outs.append((logits.detach(), g._leaf.grad.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    masks = g_tv.deterministic_masks()
    assert set(masks) == {g.name for g in g_tv.gates}


def test_shapes_the_surgery_cannot_rebuild_are_rejected():
    _, tv = pair("bottleneck", "B", "imagenet")
    tv.layer2[1].conv2 = tnn.Conv2d(16, 16, 3, 1, 1, groups=4, bias=False)  # ResNeXt-like
    with pytest.raises(ValueError, match="layer2.1.conv2"):
        layout(tv)
    with pytest.raises(ValueError, match="no model family accepts this TVResNet"):
        prunable_structures(tv)
    _, tv = pair("basic", "B", "imagenet")
    tv.maxpool = tnn.MaxPool2d(2)
    with pytest.raises(ValueError, match="maxpool"):
        compress(tv, {})
    _, tv = pair("basic", "B", "imagenet")
    tv.layer3[0].downsample = None  # the stage would share the previous stream
    with pytest.raises(ValueError, match="layer3.0 has an identity shortcut"):
        GatedResNet(tv, (3, 32, 32))
    ours, _ = pair("basic", "B", "imagenet")
    with pytest.raises(ValueError, match="already compressed"):
        layout(compress(ours, {}))


def _torchvision():
    try:
        import torchvision
    except Exception as e:  # the registry's torchvision fails to import with CPU-only torch
        pytest.skip(f"torchvision does not import here: {type(e).__name__}: {e}")
    return torchvision


def test_real_torchvision_resnet18():
    tv = _torchvision().models.resnet18(num_classes=10)
    from nn import build_model
    ours = random_bn_(build_model("resnet18", num_classes=10), 0).to(D).eval()
    tv = tv.to(D).eval()
    tv.load_state_dict(ours.state_dict(), strict=True)
    size = (3, 32, 32)
    x = torch.randn(2, *size, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(tv(x), ours(x), rtol=1e-12, atol=1e-12)
    fams = prunable_structures(tv, size)
    assert fams == prunable_structures(ours, size)
    masks = random_masks(fams, 0.5, 4)
    with torch.no_grad():
        want, got = apply_masks(tv, masks).eval()(x), compress(tv, masks)(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * (1 + want.abs().max()))
    gated = GatedResNet(tv, size).eval()
    with torch.no_grad():
        torch.testing.assert_close(gated(x), tv(x), rtol=1e-12, atol=1e-12)
