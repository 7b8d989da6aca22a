"""The physically pruned ResNet, built from a plain-data architecture spec: the saved format.

A pruned network is fully described by ``spec`` (dicts, lists, ints, strings, bools, None) plus
its ``state_dict``, so ``torch.load(path, weights_only=True)`` reads it back without unpickling
any class (:func:`nn.models.save_pruned`, :func:`nn.models.load_pruned`).  Spec layout
(``SPEC_FORMAT``)::

    {"format": SPEC_FORMAT, "in_channels": int, "num_classes": int,
     "stem": {"out": int, "kernel": int, "stride": int, "padding": int, "maxpool": bool},
     "widths": [int, ...],                # kept stream channels of each stage (fc reads the last)
     "stages": [[block, ...], ...],       # removed blocks are simply absent (renumbered)
     "source": {...}}                     # the dense model's ``arch`` (informational,
                                          # read from its layout when it has none)
    block = {"source": "layer1.2", "kind": "basic" | "bottleneck", "in": int, "out": int,
             "stride": int, "mid": [int, ...], "branch": "convs" | "const" | "none",
             "index": None | [int, ...], "shortcut": "identity" | "conv" | "pad",
             "pad_src": [int, ...], "pad_dst": [int, ...]}

A block computes ``relu(shortcut(x) + scatter_index(branch(x)))`` (the shared
:func:`nn.models.resnet.forward.block`): the branch writes
``len(index)`` of the ``out`` stream channels (``index = None``: all of them, a plain add;
otherwise ``index_add`` along channels, exact).  ``branch = "const"`` is a branch whose input
was cut (some inner conv kept no filter): it equals a per-channel constant, stored as the
parameter ``bias``.  ``"none"`` adds nothing.  Shortcut ``"pad"`` copies input channel
``pad_src[i]`` (subsampled by the stride) into output channel ``pad_dst[i]``; the rest is zero.
"""

from __future__ import annotations

import torch
from torch import nn as tnn

from nn.models.resnet import forward as fwd

__all__ = ["SPEC_FORMAT", "PrunedResNet", "PrunedBlock", "IndexShortcut", "from_spec"]

SPEC_FORMAT = "mipprune.nn.pruned-resnet/1"


class IndexShortcut(tnn.Module):
    """Option-A shortcut after pruning: ``y[:, dst] = x[:, src, ::s, ::s]``, zeros elsewhere."""

    def __init__(self, out_channels: int, stride: int, src, dst):
        super().__init__()
        if len(src) != len(dst):
            raise ValueError(f"pad_src and pad_dst differ in length: {len(src)} != {len(dst)}")
        self.out_channels, self.stride = out_channels, stride
        for name, idx in (("src", src), ("dst", dst)):  # from the spec, never meta
            self.register_buffer(name, torch.tensor(idx, dtype=torch.long, device="cpu"),
                                 persistent=False)

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        y = x.new_zeros((x.shape[0], self.out_channels, *x.shape[2:]))
        return y.index_copy(1, self.dst, x.index_select(1, self.src))


def _conv_bn(in_c, out_c, k, stride):
    return tnn.Conv2d(in_c, out_c, k, stride, k // 2, bias=False), tnn.BatchNorm2d(out_c)


class PrunedBlock(tnn.Module):
    """One block of a :class:`PrunedResNet` (see the module docstring for ``spec``)."""

    def __init__(self, spec: dict):
        super().__init__()
        self.branch, self.shortcut = spec["branch"], spec["shortcut"]
        in_c, out_c, stride, mid = spec["in"], spec["out"], spec["stride"], spec["mid"]
        index = spec["index"]
        width = out_c if index is None else len(index)
        if self.branch == "convs":
            if spec["kind"] == "basic":
                chans, kernels, strides = [in_c, *mid, width], [3, 3], [stride, 1]
            else:
                chans, kernels, strides = [in_c, *mid, width], [1, 3, 1], [1, stride, 1]
            if len(chans) != len(kernels) + 1 or min(chans) < 1:
                raise ValueError(f"bad widths {chans} for a {spec['kind']} block")
            for i, k in enumerate(kernels):
                conv, bn = _conv_bn(chans[i], chans[i + 1], k, strides[i])
                self.add_module(f"conv{i + 1}", conv)
                self.add_module(f"bn{i + 1}", bn)
            self.depth = len(kernels)
        elif self.branch == "const":
            self.bias = tnn.Parameter(torch.zeros(width))
        elif self.branch != "none":
            raise ValueError(f"branch must be 'convs', 'const' or 'none', got {self.branch!r}")
        if self.shortcut == "conv":
            self.downsample = tnn.Sequential(*_conv_bn(in_c, out_c, 1, stride))
        elif self.shortcut == "pad":
            self.downsample = IndexShortcut(out_c, stride, spec["pad_src"], spec["pad_dst"])
        elif self.shortcut != "identity":
            raise ValueError(f"shortcut must be 'identity', 'conv' or 'pad', got {self.shortcut!r}")
        self.full = index is None
        self.register_buffer("index", torch.tensor(index or [], dtype=torch.long, device="cpu"),
                             persistent=False)

    def forward(self, x):
        layers = () if self.branch != "convs" else tuple(
            (getattr(self, f"conv{i}"), getattr(self, f"bn{i}")) for i in range(1, self.depth + 1))
        return fwd.block(x, None if self.shortcut == "identity" else self.downsample, layers,
                         const=self.bias if self.branch == "const" else None,
                         index=None if self.full else self.index)


class PrunedResNet(tnn.Module):
    """A physically pruned ResNet: ``conv1``/``bn1`` stem, ``layerK`` stages, ``fc``."""

    def __init__(self, spec: dict):
        super().__init__()
        if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
            raise ValueError(f"not a pruned-ResNet spec (format {SPEC_FORMAT!r} expected)")
        self.spec = spec
        st = spec["stem"]
        self.conv1 = tnn.Conv2d(spec["in_channels"], st["out"], st["kernel"], st["stride"],
                                st["padding"], bias=False)
        self.bn1 = tnn.BatchNorm2d(st["out"])
        self.maxpool = tnn.MaxPool2d(3, 2, 1) if st["maxpool"] else tnn.Identity()
        for s, blocks in enumerate(spec["stages"]):
            self.add_module(f"layer{s + 1}", tnn.Sequential(*(PrunedBlock(b) for b in blocks)))
        self.avgpool = tnn.AdaptiveAvgPool2d(1)
        self.fc = tnn.Linear(spec["widths"][-1], spec["num_classes"])

    def forward(self, x):
        return fwd.network(self, x)


def from_spec(spec: dict, state_dict: dict) -> PrunedResNet:
    """Build the module and take ``state_dict``'s tensors as they are (dtype and device kept;
    built on the meta device first, so no random initialisation is spent)."""
    with torch.device("meta"):
        model = PrunedResNet(spec)
    model.load_state_dict(state_dict, strict=True, assign=True)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    p = next(iter(state_dict.values()), None)
    return model.to(p.device) if p is not None else model
