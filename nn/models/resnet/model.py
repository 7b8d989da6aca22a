"""ResNets for CIFAR (ResNet-20/32/44/56/110) and ImageNet (ResNet-18/34/50): the builder.

No torchvision needed; parameter names follow torchvision's ResNets (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.bn1``, ``layer1.0.downsample.0/1``, ``fc``) so its weights load
into the ImageNet models where torchvision exists (``model.load_state_dict(tv.state_dict())``).

    CIFAR     depth 6n+2: 3x3 stem (16 w), 3 stages of n BasicBlocks, widths 16w/32w/64w
    ImageNet  7x7/2 stem + 3x3/2 max-pool (64 w), 4 stages, widths 64w..512w, BasicBlock
              (ResNet-18/34) or Bottleneck (ResNet-50; expansion 4, stride on the 3x3 conv)

A block's shortcut is the identity when its input and output agree (stride 1, same width);
otherwise option A (:class:`PadShortcut`: stride-s subsampling + zero channel padding, no
parameters) or option B (1x1 conv + BN, named ``downsample.0/1``).  CIFAR models default to
option A (the published ResNet-20..110 counts), ImageNet models to option B (torchvision).
The forward of every block and of the network is :mod:`nn.models.resnet.forward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn as tnn

from nn.models.resnet import forward as fwd

__all__ = ["MODELS", "BasicBlock", "Bottleneck", "PadShortcut", "ResNet", "build_model"]


class PadShortcut(tnn.Module):
    """Option-A shortcut: ``y = pad_c(x[:, :, ::s, ::s]) * keep``.

    Input channel ``i`` lands on output channel ``front + i`` with ``front = (out - in) // 2``
    (the rest is zero padding).  ``keep`` (a buffer of ones, shape ``(out,)``) is the only state:
    :func:`nn.models.apply_masks` zeroes the entries of removed stream channels so that the
    masked model carries nothing into them, exactly like the physically pruned one.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"PadShortcut needs out_channels >= in_channels, got {out_channels}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.front = (out_channels - in_channels) // 2
        self.register_buffer("keep", torch.ones(out_channels))

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        back = self.out_channels - self.in_channels - self.front
        return F.pad(x, (0, 0, 0, 0, self.front, back)) * self.keep.to(x.dtype)[:, None, None]


def _shortcut(in_c: int, out_c: int, stride: int, option: str):
    if stride == 1 and in_c == out_c:
        return None
    if option == "A":
        return PadShortcut(in_c, out_c, stride)
    return tnn.Sequential(
        tnn.Conv2d(in_c, out_c, 1, stride, bias=False), tnn.BatchNorm2d(out_c)
    )


class BasicBlock(tnn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, both convs 3x3."""

    expansion = 1

    def __init__(self, in_c: int, planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        self.conv1 = tnn.Conv2d(in_c, planes, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.relu = tnn.ReLU(inplace=True)
        self.downsample = _shortcut(in_c, planes, stride, shortcut)

    def forward(self, x):
        return fwd.block(x, self.downsample, ((self.conv1, self.bn1), (self.conv2, self.bn2)))


class Bottleneck(tnn.Module):
    """``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))``:
    1x1 reduce, 3x3 (carries the stride, torchvision "v1.5"), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, in_c: int, planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        out_c = planes * self.expansion
        self.conv1 = tnn.Conv2d(in_c, planes, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv3 = tnn.Conv2d(planes, out_c, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(out_c)
        self.relu = tnn.ReLU(inplace=True)
        self.downsample = _shortcut(in_c, out_c, stride, shortcut)

    def forward(self, x):
        return fwd.block(x, self.downsample, ((self.conv1, self.bn1), (self.conv2, self.bn2),
                                              (self.conv3, self.bn3)))


@dataclass(frozen=True)
class _Spec:
    block: type
    layers: tuple[int, ...]
    widths: tuple[int, ...]
    stem: str  # "cifar" | "imagenet"


MODELS: dict[str, _Spec] = {
    **{f"resnet{6 * n + 2}": _Spec(BasicBlock, (n, n, n), (16, 32, 64), "cifar")
       for n in (3, 5, 7, 9, 18)},
    "resnet18": _Spec(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), "imagenet"),
    "resnet34": _Spec(BasicBlock, (3, 4, 6, 3), (64, 128, 256, 512), "imagenet"),
    "resnet50": _Spec(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), "imagenet"),
}


def _scaled(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


class ResNet(tnn.Module):
    """Stem -> ``layer1..layerK`` -> global average pool -> ``fc``.

    ``arch`` is a plain dict (name, stem, block, layers, widths, shortcut, in_channels,
    num_classes, width) describing the dense network; a compressed network's spec keeps it
    as its ``source``.
    """

    def __init__(self, block: type, layers, widths, stem: str = "cifar", num_classes: int = 10,
                 in_channels: int = 3, width: float = 1.0, shortcut: str = "A", name: str = ""):
        super().__init__()
        widths = tuple(_scaled(c, width) for c in widths)
        stem_c = widths[0]
        if stem == "cifar":
            self.conv1 = tnn.Conv2d(in_channels, stem_c, 3, 1, 1, bias=False)
            self.maxpool = tnn.Identity()
        else:
            self.conv1 = tnn.Conv2d(in_channels, stem_c, 7, 2, 3, bias=False)
            self.maxpool = tnn.MaxPool2d(3, 2, 1)
        self.bn1 = tnn.BatchNorm2d(stem_c)
        self.relu = tnn.ReLU(inplace=True)
        in_c = stem_c
        for i, (n, planes) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for b in range(n):
                blocks.append(block(in_c, planes, stride if b == 0 else 1, shortcut))
                in_c = planes * block.expansion
            self.add_module(f"layer{i + 1}", tnn.Sequential(*blocks))
        self.avgpool = tnn.AdaptiveAvgPool2d(1)
        self.fc = tnn.Linear(in_c, num_classes)
        self.arch = {"name": name, "stem": stem, "block": block.__name__, "layers": list(layers),
                     "widths": list(widths), "shortcut": shortcut, "in_channels": in_channels,
                     "num_classes": num_classes, "width": float(width)}
        for m in self.modules():
            if isinstance(m, tnn.Conv2d):
                tnn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stages(self) -> list[tnn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.arch["layers"]))]

    def forward(self, x):
        return fwd.network(self, x)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                shortcut: str | None = None) -> ResNet:
    """A ResNet from the registry :data:`MODELS` (``resnet20/32/44/56/110``, ``resnet18/34/50``).

    ``shortcut`` is ``"A"`` (parameter-free) or ``"B"`` (1x1 conv + BN); ``None`` takes the
    published choice: A for the CIFAR models, B for the ImageNet ones.  ``width`` multiplies
    every channel count (rounded, at least 1).  Any ``in_channels`` and ``num_classes`` work
    (e.g. 1 and 10 for 28x28 Fashion-MNIST).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    spec = MODELS[name]
    if shortcut is None:
        shortcut = "A" if spec.stem == "cifar" else "B"
    if shortcut not in ("A", "B"):
        raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
    for label, v in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{label} must be a positive int, got {v!r}")
    if not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"width must be a positive number, got {width!r}")
    return ResNet(spec.block, spec.layers, spec.widths, spec.stem, num_classes, in_channels,
                  width, shortcut, name)
