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

Per-sample multipliers (a 2-D ``(batch, channels)`` scale, or ``(batch, 1)`` for a block's
output) cannot be folded into shared weights: they multiply the activations instead, at the
same place (the conv's input, the last BN's output), which is the same function.  With
``bn_groups`` G > 1 the batch is G equal-sized ghost batches, **interleaved**: row ``i G + g`` is
sample ``i`` of batch ``g``.  Each is normalised in training by its own statistics (running
statistics untouched), as if each had been a forward of its own: the variational pruner's
batched flips evaluate G gate patterns in one pass this way.  Interleaved, the batch is a free
view ``(N / G, G C, H, W)`` in which every (batch, channel) pair is a channel of its own, so one
fused ``batch_norm`` normalises all of them (a third of the time of separate reductions).
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


def stem(net: tnn.Module, x: torch.Tensor, scale: torch.Tensor | None = None,
         bn_groups: int = 1) -> torch.Tensor:
    """``maxpool(relu(bn1(conv1(x))) * scale)``; ``scale`` per stem channel (None: 1).  The
    multiplier comes after the ReLU: folded into ``bn1`` it would give a gate sampled off the
    straight-through gradient ``relu'(0) = 0``."""
    h = F.relu(_bn(net.bn1, net.conv1(x), None, None, bn_groups) if bn_groups > 1
               else net.bn1(net.conv1(x)), inplace=True)
    if scale is not None:
        h = h * _broadcast(scale.to(h.dtype))
    return net.maxpool(h)


def _broadcast(scale: torch.Tensor) -> torch.Tensor:
    """A per-channel ``(C,)`` or per-sample ``(N, C)`` scale shaped to multiply ``(N, C, H,
    W)`` activations."""
    return scale[None, :, None, None] if scale.dim() == 1 else scale[:, :, None, None]


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
        scale: torch.Tensor | None, groups: int = 1) -> torch.Tensor:
    """``bn`` restricted to channels ``idx`` (None: all), its output multiplied by ``scale``
    (per channel or a scalar, folded into the affine terms; per sample, ``(N, 1)`` or ``(N,
    C)``: multiplying the output; None: 1).  In training the running statistics (of ``x``,
    unscaled) of those channels are updated exactly as the full BN would update them; with
    ``groups`` > 1, each of the ``groups`` interleaved ghost batches (rows ``g, g + groups,
    ...``) is normalised by its own (biased) statistics, ``(x - mean_g) / sqrt(var_g + eps)``,
    and nothing is updated."""
    if scale is not None and scale.dim() == 2:
        return _bn(bn, x, idx, None, groups) * scale.to(x.dtype)[:, :, None, None]
    w, b, rm, rv = bn.weight, bn.bias, bn.running_mean, bn.running_var
    if idx is not None:
        w, b, rm, rv = (t.index_select(0, idx) for t in (w, b, rm, rv))
    if scale is not None:
        scale = scale.to(w.dtype)
        w, b = w * scale, b * scale
    if not bn.training:
        return F.batch_norm(x, rm, rv, w, b, False, 0.0, bn.eps)
    if groups > 1:  # interleaved: (N / G, G C, ...) has one channel per (batch, channel)
        n, c = x.shape[:2]
        out = F.batch_norm(x.reshape(n // groups, groups * c, *x.shape[2:]), None, None,
                           w.repeat(groups), b.repeat(groups), True, 0.0, bn.eps)
        return out.reshape(x.shape)
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
            in_scale=None, out_scale=None, bn_groups: int = 1) -> torch.Tensor:
    """``bn(conv(x))`` restricted to output channels ``out_idx`` and input channels ``in_idx``
    (None: all), the input channels multiplied by ``in_scale`` (folded into the weight; per
    sample, ``(N, C)``: multiplying ``x``) and the output by ``out_scale`` (folded into the BN
    affine terms, or per sample, :func:`_bn`); ``bn_groups``: ghost batches of the BN."""
    if in_scale is not None and in_scale.dim() == 2:
        x, in_scale = x * in_scale.to(x.dtype)[:, :, None, None], None
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
    if out_idx is None and out_scale is None and bn_groups == 1:
        return bn(y)
    return _bn(bn, y, out_idx, out_scale, bn_groups)


def branch(x: torch.Tensor, layers, select=None, scales=None, out_scale=None,
           bn_groups: int = 1) -> torch.Tensor:
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
        x = conv_bn(x, conv, bn, sel, prev, prev_scale, out_scale if last else None, bn_groups)
        if not last:
            x = F.relu(x, inplace=True)
            prev_scale = None if scales is None else scales[i]
        prev = sel
    return x


def block(x: torch.Tensor, shortcut, layers=(), *, select=None, scales=None, out_scale=None,
          const: torch.Tensor | None = None, index: torch.Tensor | None = None,
          bn_groups: int = 1) -> torch.Tensor:
    """``relu(shortcut(x) + scatter_index(branch(x)))``.

    ``shortcut``: a module, or None for the identity.  The branch is the conv-BN chain of
    ``layers`` (:func:`branch`, with ``select``/``scales``/``out_scale``); without layers it is
    ``const`` (one value per written channel, broadcast over batch and space: a cut branch), or
    nothing at all (``relu(shortcut(x))``).  ``index``: the stream channels the branch writes
    (None: all of them, a plain add; else ``index_add`` along channels).  ``bn_groups``: ghost
    batches of every BN, the shortcut's (a ``(conv, bn)`` sequence) included."""
    if shortcut is None:
        out = x
    elif bn_groups > 1 and isinstance(shortcut, tnn.Sequential) and len(shortcut) == 2 \
            and isinstance(shortcut[1], tnn.modules.batchnorm._BatchNorm):
        out = conv_bn(x, shortcut[0], shortcut[1], bn_groups=bn_groups)
    else:
        out = shortcut(x)
    if layers:
        b = branch(x, layers, select, scales, out_scale, bn_groups)
    elif const is not None:
        b = const.to(out.dtype)[None, :, None, None].expand(out.shape[0], -1, *out.shape[2:])
    else:
        return torch.relu(out)  # not in place: out may be the block's input
    out = out + b if index is None else out.index_add(1, index, b)
    return F.relu(out, inplace=True)
