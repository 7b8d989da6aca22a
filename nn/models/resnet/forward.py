"""The one ResNet forward, shared by the dense, masked, gated and physically pruned networks.

    network  = head(blocks(stem(x)))
    stem(x)  = maxpool(relu(bn1(conv1(x))) * s)            s: per-channel multipliers (or none)
    head(h)  = fc(flatten(avgpool(h)))
    block(x) = relu(shortcut(x) + scatter_index(branch(x)))
    branch   = bn_k(conv_k(... relu(bn_1(conv_1(x))) ...))  or a per-channel constant, or none

Every form is this function with different arguments: the dense blocks pass their own layers;
a pruned block passes its smaller layers, a constant for a cut branch, and ``index`` (the
stream channels its last layer writes, added with ``index_add``: exact); the gated network
passes the live channels of each inner layer (``select``) and the gate multipliers.

Gate multipliers cost no pass over the activations: a unit's multiplier ``m`` (after BN + ReLU)
scales the input channel of the conv that reads it, ``conv(relu(a) * m) = conv_{W * m}(relu(a))``;
a block's scales the affine terms of its last BN, ``bn(z) * m = bn_{gamma m, beta m}(z)``.
Both are exact, the gradient w.r.t. the multipliers included.  With no selection and no
multiplier a layer is called as the module itself (``conv(x)``, ``bn(x)``), so forward hooks
see the dense network's layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn as tnn

__all__ = ["stages", "stem", "head", "network", "conv_bn", "branch", "block"]


def stages(net: tnn.Module) -> list[tnn.Module]:
    """``layer1``, ``layer2``, ... of ``net``, in order, up to the first one missing."""
    out = []
    while hasattr(net, f"layer{len(out) + 1}"):
        out.append(getattr(net, f"layer{len(out) + 1}"))
    return out


def stem(net: tnn.Module, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``maxpool(relu(bn1(conv1(x))) * scale)``; ``scale`` per stem channel (None: 1).  The
    multiplier comes after the ReLU: folded into ``bn1`` it would give a gate sampled off the
    straight-through gradient ``relu'(0) = 0``."""
    h = F.relu(net.bn1(net.conv1(x)), inplace=True)
    if scale is not None:
        h = h * scale.to(h.dtype)[None, :, None, None]
    return net.maxpool(h)


def head(net: tnn.Module, h: torch.Tensor) -> torch.Tensor:
    """``fc(flatten(avgpool(h)))``."""
    return net.fc(torch.flatten(net.avgpool(h), 1))


def network(net: tnn.Module, x: torch.Tensor) -> torch.Tensor:
    """Stem, every stage (each an ``nn.Sequential`` of blocks), head."""
    h = stem(net, x)
    for stage in stages(net):
        h = stage(h)
    return head(net, h)


def _bn(bn: tnn.BatchNorm2d, x: torch.Tensor, idx: torch.Tensor | None,
        scale: torch.Tensor | None) -> torch.Tensor:
    """``bn`` restricted to channels ``idx`` (None: all), its output multiplied by ``scale``
    (per channel or a scalar, folded into the affine terms; None: 1).  In training the running
    statistics (of ``x``, unscaled) of those channels are updated exactly as the full BN would
    update them."""
    w, b, rm, rv = bn.weight, bn.bias, bn.running_mean, bn.running_var
    if idx is not None:
        w, b, rm, rv = (t.index_select(0, idx) for t in (w, b, rm, rv))
    if scale is not None:
        scale = scale.to(w.dtype)
        w, b = w * scale, b * scale
    if not bn.training:
        return F.batch_norm(x, rm, rv, w, b, False, 0.0, bn.eps)
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else \
        1.0 / float(bn.num_batches_tracked)
    out = F.batch_norm(x, rm, rv, w, b, True, momentum, bn.eps)
    if idx is not None:
        with torch.no_grad():
            bn.running_mean.index_copy_(0, idx, rm)
            bn.running_var.index_copy_(0, idx, rv)
    return out


def conv_bn(x: torch.Tensor, conv: tnn.Conv2d, bn: tnn.BatchNorm2d, out_idx=None, in_idx=None,
            in_scale=None, out_scale=None) -> torch.Tensor:
    """``bn(conv(x))`` restricted to output channels ``out_idx`` and input channels ``in_idx``
    (None: all), the input channels multiplied by ``in_scale`` (folded into the weight) and the
    output by ``out_scale`` (folded into the BN affine terms)."""
    if out_idx is None and in_idx is None and in_scale is None:
        y = conv(x)
    else:
        w = conv.weight
        if out_idx is not None:
            w = w.index_select(0, out_idx)
        if in_idx is not None:
            w = w.index_select(1, in_idx)
        if in_scale is not None:
            w = w * in_scale.to(w.dtype)[None, :, None, None]
        y = F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    if out_idx is None and out_scale is None:
        return bn(y)
    return _bn(bn, y, out_idx, out_scale)


def branch(x: torch.Tensor, layers, select=None, scales=None, out_scale=None) -> torch.Tensor:
    """``bn_k(conv_k(... relu(bn_1(conv_1(x))) ...))`` over ``layers`` (``(conv, bn)`` pairs).

    ``select[i]``: the output channels of layer ``i`` computed (None: all; the last layer's
    entry is its output subset); layer ``i + 1`` reads exactly those.  ``scales[i]``: the
    multipliers of layer ``i``'s computed channels after its ReLU (``i < k - 1``; None: 1).
    ``out_scale``: the multiplier of the last BN's output."""
    k = len(layers)
    prev = prev_scale = None
    for i, (conv, bn) in enumerate(layers):
        sel = None if select is None else select[i]
        last = i == k - 1
        x = conv_bn(x, conv, bn, sel, prev, prev_scale, out_scale if last else None)
        if not last:
            x = F.relu(x, inplace=True)
            prev_scale = None if scales is None else scales[i]
        prev = sel
    return x


def block(x: torch.Tensor, shortcut, layers=(), *, select=None, scales=None, out_scale=None,
          const: torch.Tensor | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(shortcut(x) + scatter_index(branch(x)))``.

    ``shortcut``: a module, or None for the identity.  The branch is the conv-BN chain of
    ``layers`` (:func:`branch`, with ``select``/``scales``/``out_scale``); without layers it is
    ``const`` (one value per written channel, broadcast over batch and space: a cut branch), or
    nothing at all (``relu(shortcut(x))``).  ``index``: the stream channels the branch writes
    (None: all of them, a plain add; else ``index_add`` along channels)."""
    out = x if shortcut is None else shortcut(x)
    if layers:
        b = branch(x, layers, select, scales, out_scale)
    elif const is not None:
        b = const.to(out.dtype)[None, :, None, None].expand(out.shape[0], -1, *out.shape[2:])
    else:
        return torch.relu(out)  # not in place: out may be the block's input
    out = out + b if index is None else out.index_add(1, index, b)
    return F.relu(out, inplace=True)
