"""ResNet definitions: published sizes, torchvision names, both shortcuts, any input/classes;
and the torch layer imports without pyomo."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nn import MODELS, build_model, count_params
from nn.models import PadShortcut

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, classes, published, exact", [
    ("resnet20", 10, 0.27e6, 269_722),
    ("resnet56", 10, 0.85e6, 853_018),
    ("resnet110", 10, 1.7e6, 1_727_962),
    ("resnet18", 1000, 11.7e6, 11_689_512),  # torchvision's count
    ("resnet50", 1000, 25.6e6, 25_557_032),  # torchvision's count
])
def test_parameter_counts_match_published(name, classes, published, exact):
    n = count_params(build_model(name, num_classes=classes))
    digits = 2 if published < 1e6 else 1
    assert round(n / 1e6, digits) == round(published / 1e6, digits)
    assert n == exact


def test_option_b_adds_exactly_the_downsample_convs_and_bns():
    a, b = build_model("resnet20", shortcut="A"), build_model("resnet20", shortcut="B")
    # stage 2 and 3 first blocks: 1x1 conv (in*out) + BN (2*out)
    assert count_params(b) - count_params(a) == (16 * 32 + 64) + (32 * 64 + 128)
    assert isinstance(a.layer2[0].downsample, PadShortcut)
    assert a.layer1[0].downsample is None and b.layer1[0].downsample is None
    assert not any(p.numel() for p in a.layer3[0].downsample.parameters())


def test_torchvision_parameter_names():
    names = {n for n, _ in build_model("resnet50", num_classes=1000).named_parameters()}
    for n in ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn1.bias",
              "layer1.0.conv3.weight", "layer1.0.downsample.0.weight",
              "layer1.0.downsample.1.weight", "layer4.2.bn3.weight", "fc.weight", "fc.bias"):
        assert n in names
    sd = build_model("resnet18", num_classes=1000).state_dict()
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert "layer1.0.downsample.0.weight" not in sd  # identity shortcut, as in torchvision


@pytest.mark.parametrize("name", sorted(MODELS))
def test_grayscale_28x28_and_width_multiplier(name):
    small = name in ("resnet18", "resnet34", "resnet50")
    m = build_model(name, num_classes=7, in_channels=1, width=0.25 if small else 0.5).eval()
    with torch.no_grad():
        y = m(torch.randn(2, 1, 28, 28))
    assert y.shape == (2, 7) and torch.isfinite(y).all()
    assert m.conv1.in_channels == 1
    assert m.arch["widths"][0] == (16 if small else 8)


def test_depth_is_6n_plus_2():
    for depth in (20, 32, 44, 56, 110):
        m = build_model(f"resnet{depth}")
        convs = sum(isinstance(x, torch.nn.Conv2d) for x in m.modules())
        assert convs + 1 == depth  # convs + fc


@pytest.mark.parametrize("kw, match", [
    (dict(name="resnet21"), "unknown model"), (dict(shortcut="C"), "shortcut"),
    (dict(width=0), "width"), (dict(num_classes=0), "num_classes"),
    (dict(in_channels=2.0), "in_channels"),
])
def test_build_model_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        build_model(**({"name": "resnet20"} | kw))


def test_nn_imports_without_pyomo_or_highspy():
    code = (
        "import sys\n"
        "sys.modules['pyomo'] = None\n"
        "sys.modules['highspy'] = None\n"
        "import nn\n"
        "m = nn.build_model('resnet20', width=0.25)\n"
        "reg = nn.SPRRegularizer(m, nn.SPRConfig(lam=1.0))\n"
        "reg().backward()\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('pyomo', 'highspy')"
        " and sys.modules[k] is not None]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
