"""Runnable forms of the timed units (:class:`~nn.latency.layers.Layer`) at given widths, and
the inference form of a whole network.

:func:`inference_form` folds every eval-mode BatchNorm into the convolution before it
(``W' = W gamma / sigma``, ``b' = beta - gamma mu / sigma``, ``sigma = sqrt(var + eps)``; exact
up to float rounding) and leaves ``nn.Identity`` in the BN's place, so the network still runs
its own forward.  :func:`build_unit` makes the code each unit runs inside that forward:

``conv``  a ``Conv2d`` with bias (the folded BN), called as a module, then ``F.relu(...,
          inplace=True)`` for ``conv+relu``: exactly the calls of the stem and of
          :func:`nn.models.resnet.forward.branch`;
``add``   a real :class:`~nn.models.resnet.pruned.PrunedBlock` of the unit's widths, folded,
          whose convs are replaced by modules returning preset tensors (the last one of the
          block's output shape, the inner ones of one element): one call runs the block's
          whole Python path, the folded BNs' identity calls, the shortcut (identity, option A's
          :class:`~nn.models.resnet.pruned.IndexShortcut` with the source/destination channels
          :func:`nn.compress` gives the first ``in``/``out`` stream channels, option B's
          folded 1x1 conv), the add and the ReLU -- everything of the block but its
          convolutions' work;
``pool``  ``MaxPool2d(3, 2, 1)``, or ``flatten(AdaptiveAvgPool2d(1)(x), 1)`` (the head);
``fc``    the ``Linear`` layer.

Inputs and preset outputs are random normal tensors, one per shape (a unit never writes into
its input: every in-place ReLU acts on a tensor the unit itself produced).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn as tnn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from nn.latency.layers import Layer
from nn.models.resnet.pruned import PrunedBlock

__all__ = ["inference_form", "Tensors", "pad_channels", "build_unit"]


def inference_form(model: tnn.Module) -> tnn.Module:
    """A deep copy of ``model`` in ``eval()`` with every BatchNorm folded into its conv (module
    docstring).  Pairs are sibling modules ``convK``/``bnK`` (stems, blocks) and a ``Conv2d``
    followed by a ``BatchNorm2d`` in an ``nn.Sequential`` (option-B shortcuts)."""
    model = copy.deepcopy(model).eval()
    for mod in list(model.modules()):
        children = dict(mod.named_children())
        if isinstance(mod, tnn.Sequential):
            pairs = [(a, b) for a, b in zip(children, list(children)[1:])
                     if isinstance(children[a], tnn.Conv2d)
                     and isinstance(children[b], tnn.BatchNorm2d)]
        else:
            pairs = [(a, "bn" + a[4:]) for a, m in children.items()
                     if a.startswith("conv") and isinstance(m, tnn.Conv2d)
                     and isinstance(children.get("bn" + a[4:]), tnn.BatchNorm2d)]
        for a, b in pairs:
            setattr(mod, a, fuse_conv_bn_eval(children[a], children[b]))
            setattr(mod, b, tnn.Identity())
    return model


class Tensors:
    """Random normal tensors on ``device`` in ``dtype``, one per shape (drawn on the CPU from a
    generator seeded with ``seed``, so a shape's tensor does not depend on the device)."""

    def __init__(self, device, dtype: torch.dtype, seed: int = 0):
        self.device, self.dtype = torch.device(device), dtype
        self._gen = torch.Generator().manual_seed(seed)
        self._made: dict[tuple, torch.Tensor] = {}

    def get(self, shape: tuple[int, ...]) -> torch.Tensor:
        t = self._made.get(shape)
        if t is None:
            t = torch.randn(shape, generator=self._gen).to(self.device, self.dtype)
            self._made[shape] = t
        return t


class _Preset(tnn.Module):
    """Stands in for a convolution of an ``add`` unit: returns its preset tensor."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out


def _check_width(layer: Layer, side: str, w: int) -> None:
    fam = getattr(layer, f"{side}_family")
    dense = getattr(layer, f"{side}_channels")
    if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= dense:
        raise ValueError(f"{side} width of {layer.name} must be an int in 1..{dense}, got {w!r}")
    if fam is None and w != dense:
        raise ValueError(f"{layer.name} has a fixed {side} width {dense}, got {w}")


def pad_channels(layer: Layer, in_w: int, out_w: int) -> tuple[list[int], list[int]]:
    """Option A after pruning to the first ``in_w``/``out_w`` stream channels: input channel
    ``i`` lands on output channel ``front + i`` (``front = (C_out - C_in) // 2`` of the dense
    shortcut) when that one is kept.  Returns the ``(pad_src, pad_dst)`` lists of the spec."""
    front = (layer.out_channels - layer.in_channels) // 2
    src = [i for i in range(in_w) if front + i < out_w]
    return src, [front + i for i in src]


def _skeleton(layer: Layer, in_w: int, out_w: int, batch: int, t: Tensors) -> tnn.Module:
    """The ``add`` unit: a folded PrunedBlock whose convs return preset tensors."""
    s = layer.stride
    src, dst = pad_channels(layer, in_w, out_w) if layer.op == "pad" else ([], [])
    spec = {"source": layer.name, "kind": "basic" if layer.depth == 2 else "bottleneck",
            "in": in_w, "out": out_w, "stride": s, "mid": [1] * (layer.depth - 1),
            "branch": "convs", "index": None, "shortcut": layer.op, "pad_src": src,
            "pad_dst": dst}
    blk = inference_form(PrunedBlock(spec)).to(t.device, t.dtype)
    ho, wo = (layer.height - 1) // s + 1, (layer.width - 1) // s + 1
    for i in range(1, layer.depth + 1):
        last = i == layer.depth
        setattr(blk, f"conv{i}", _Preset(t.get((batch, out_w, ho, wo) if last else (1, 1, 1, 1))))
    return blk.eval()


def build_unit(layer: Layer, in_w: int, out_w: int, batch: int, tensors: Tensors
               ) -> Callable[[], object]:
    """A function running ``layer``'s unit once at input width ``in_w`` and output width
    ``out_w`` on a batch of ``batch`` (module docstring), with inputs from ``tensors`` (whose
    device and dtype it uses).  Call it under ``torch.inference_mode()``.  ``ValueError`` for a
    width outside ``1..dense``, a fixed axis not at its dense count, or a tied unit given two
    widths."""
    _check_width(layer, "in", in_w)
    _check_width(layer, "out", out_w)
    if layer.tied and in_w != out_w:
        raise ValueError(f"{layer.name} reads and writes one family: in width {in_w} must "
                         f"equal out width {out_w}")
    t = tensors
    h, w = layer.height, layer.width
    if layer.kind == "conv":
        conv = tnn.Conv2d(in_w, out_w, layer.kernel, layer.stride, layer.padding, bias=True)
        conv = conv.to(t.device, t.dtype).eval()
        x = t.get((batch, in_w, h, w))
        if layer.op == "conv+relu":
            return lambda: F.relu(conv(x), inplace=True)
        return lambda: conv(x)
    if layer.kind == "add":
        blk = _skeleton(layer, in_w, out_w, batch, t)
        x = t.get((batch, in_w, h, w))
        return lambda: blk(x)
    if layer.kind == "pool":
        x = t.get((batch, in_w, h, w))
        if layer.op == "max":
            pool = tnn.MaxPool2d(layer.kernel, layer.stride, layer.padding)
            return lambda: pool(x)
        avg = tnn.AdaptiveAvgPool2d(1)
        return lambda: torch.flatten(avg(x), 1)
    fc = tnn.Linear(in_w, out_w).to(t.device, t.dtype).eval()
    x = t.get((batch, in_w))
    return lambda: fc(x)
