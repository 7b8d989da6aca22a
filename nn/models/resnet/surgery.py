"""A ResNet under masks (:mod:`nn.models.structures`): the masked model, and the physically
smaller one.  Semantics (what "removing" a structure means):

* **masked model** (:func:`apply_masks`): every writer *and* reader slice of a removed structure
  is set to zero; an option-A :class:`~nn.models.resnet.model.PadShortcut` also stops feeding
  removed stream channels (its ``keep`` buffer).  A removed conv filter's BN has ``gamma =
  beta = 0``, so its channel is exactly 0 after BN (eval mode), hence every removed channel
  carries 0.
* **pruned model** (:func:`compress`): those slices are physically gone; a removed block is
  replaced by its (identity) shortcut -- exact because a block's input is a ReLU output, so
  ``relu(x + 0) = x``; a block whose last conv keeps a subset of the stream channels adds into
  just those (``index_add``); a stream channel removed in a stage disappears from the whole
  stage, the option-A padding / downsample of the next stage's first block, and ``fc``.
* **cut branch**: if an inner conv of a block keeps *no* filter, everything after it sees a zero
  input, and the branch output is the constant ``bn_last(... bn(0) ...)`` (e.g. ``bn2(0) =
  beta - gamma * mean / sqrt(var + eps)`` for a BasicBlock whose conv1 is gone).  The pruned
  block keeps exactly that constant (eval-mode BN statistics) as a bias added to the stream, so
  pruned and masked logits agree in ``eval()``.

In ``eval()`` the pruned model's logits equal the masked model's (up to float rounding).
Limitations: a stream (and the ResNet-50 stem family ``"conv1"``) must keep at least one
channel; only blocks with an identity shortcut can be removed
(:mod:`nn.models.resnet.structures`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn as tnn

from nn.models.resnet.model import PadShortcut
from nn.models.resnet.pruned import SPEC_FORMAT, PrunedResNet, from_spec
from nn.models.resnet.structures import arch_of, build_families, layout
from nn.models.structures import Family, check_masks

__all__ = ["apply_masks", "apply_masks_", "compress"]


def apply_masks_(model: tnn.Module, masks: dict,
                 families: list[Family] | None = None) -> tnn.Module:
    """Zero, in place, the writer and reader slices of every removed structure (and the
    option-A shortcut entries of removed stream channels).  Returns ``model``."""
    families = build_families(model) if families is None else families
    masks = check_masks(families, masks)
    params = dict(model.named_parameters())
    mods = dict(model.named_modules())
    with torch.no_grad():
        for f in families:
            drop = torch.nonzero(~masks[f.name]).flatten()
            if drop.numel() == 0:
                continue
            for p in f.writers + f.readers:
                t = params[p.param]
                if p.dim is None:
                    t.zero_()
                else:
                    t.index_fill_(p.dim, drop.to(t.device), 0)
        for blk in layout(model).blocks:
            if blk.shortcut == "pad":
                keep = mods[f"{blk.name}.downsample"].keep
                keep[~masks[blk.stream].to(keep.device)] = 0
    return model


def apply_masks(model: tnn.Module, masks: dict,
                families: list[Family] | None = None) -> tnn.Module:
    """The masked model: a deep copy of ``model`` with :func:`apply_masks_` applied."""
    return apply_masks_(copy.deepcopy(model), masks, families)


# ---- one handler per layer type: the kept slices of its state --------------------------------

def _take(t: torch.Tensor, *idx) -> torch.Tensor:
    """A copy of ``t`` keeping indices ``idx[d]`` along axis ``d`` (``None``: the whole axis)."""
    t = t.detach()
    for d, i in enumerate(idx):
        if i is not None:
            t = t.index_select(d, i.to(t.device))
    return t.clone() if all(i is None for i in idx) else t


def _conv(m: tnn.Conv2d, out_idx, in_idx) -> dict:
    return {"weight": _take(m.weight, out_idx, in_idx)}


def _bn(m: tnn.BatchNorm2d, idx) -> dict:
    return {"weight": _take(m.weight, idx), "bias": _take(m.bias, idx),
            "running_mean": _take(m.running_mean, idx), "running_var": _take(m.running_var, idx),
            "num_batches_tracked": m.num_batches_tracked.clone()}


def _linear(m: tnn.Linear, out_idx, in_idx) -> dict:
    return {"weight": _take(m.weight, out_idx, in_idx), "bias": _take(m.bias, out_idx)}


def _pad(m: PadShortcut, out_keep, in_keep) -> dict:
    """Option A: input channel i lands on output channel front + i; keep the kept pairs."""
    pos_out = torch.cumsum(out_keep.long(), 0) - 1
    pos_in = torch.cumsum(in_keep.long(), 0) - 1
    src, dst = [], []
    for i in torch.nonzero(in_keep).flatten().tolist():
        j = m.front + i
        if out_keep[j]:
            src.append(int(pos_in[i]))
            dst.append(int(pos_out[j]))
    return {"pad_src": src, "pad_dst": dst}


_HANDLERS = {tnn.Conv2d: _conv, tnn.BatchNorm2d: _bn, tnn.Linear: _linear, PadShortcut: _pad}


def _handle(sd: dict, prefix: str, module, *args):
    """Dispatch on the layer type; tensors go to ``sd`` under ``prefix``, anything else back."""
    entries = _HANDLERS[type(module)](module, *args)
    for k, v in list(entries.items()):
        if isinstance(v, torch.Tensor):
            sd[f"{prefix}.{k}"] = entries.pop(k)
    return entries


def _branch_at_zero(block, keeps) -> torch.Tensor:
    """Per-channel output of a cut branch: the *masked* branch run on a zero 1x1 input.

    ``keeps`` are the kept output channels of each conv of the branch.  Masking zeroes the BN
    ``gamma``/``beta`` of removed channels (their conv rows and reader columns only ever meet
    zeros here).  Exact when some inner conv kept no filter: from that conv on the branch sees
    zeros, and what follows (a 3x3 conv of zeros, 1x1 convs of constant maps, BN, ReLU) maps
    constant maps to constant maps.
    """
    convs = [getattr(block, f"conv{i + 1}") for i in range(len(keeps))]
    bns = [getattr(block, f"bn{i + 1}") for i in range(len(keeps))]
    p = convs[0].weight
    b = torch.zeros((1, convs[0].in_channels, 1, 1), dtype=p.dtype, device=p.device)
    with torch.no_grad():
        for i, (conv, bn, keep) in enumerate(zip(convs, bns, keeps)):
            k = keep.to(device=p.device, dtype=p.dtype)
            b = F.batch_norm(conv(b), bn.running_mean, bn.running_var, bn.weight * k,
                             bn.bias * k, False, 0.0, bn.eps)
            if i < len(keeps) - 1:
                b = torch.relu(b)
    return b[0, :, 0, 0]


def compress(model: tnn.Module, masks: dict) -> PrunedResNet:
    """The physically pruned network for ``masks`` (see the module docstring for semantics).

    ``model`` is not modified; the result has the model's dtype and device and its training
    flag is ``eval()``.  ``ValueError`` if a stream (or the ResNet-50 stem family) would lose
    every channel.
    """
    lay = layout(model)
    families = build_families(model)
    keep = check_masks(families, masks)
    for name in (lay.stem, *lay.streams):
        if not keep[name].any():
            raise ValueError(f"masks remove every channel of {name!r}; keep at least one")
    mods = dict(model.named_modules())
    sd: dict[str, torch.Tensor] = {}

    def nz(mask):
        return torch.nonzero(mask).flatten()

    stem_idx = nz(keep[lay.stem])
    _handle(sd, "conv1", model.conv1, stem_idx, None)
    _handle(sd, "bn1", model.bn1, stem_idx)
    c1 = model.conv1
    spec = {"format": SPEC_FORMAT, "in_channels": c1.in_channels,
            "num_classes": model.fc.out_features,
            "stem": {"out": len(stem_idx), "kernel": c1.kernel_size[0], "stride": c1.stride[0],
                     "padding": c1.padding[0], "maxpool": isinstance(model.maxpool,
                                                                     tnn.MaxPool2d)},
            "widths": [int(keep[s].sum()) for s in lay.streams],
            "stages": [[] for _ in lay.streams], "source": arch_of(model)}

    for blk in lay.blocks:
        if blk.removable and not keep[f"block.{blk.name}"][0]:
            continue
        s = lay.streams.index(blk.stream)
        prefix = f"layer{s + 1}.{len(spec['stages'][s])}"
        block = mods[blk.name]
        in_keep, out_keep = keep[blk.source], keep[blk.stream]
        inner = [keep[c] for c in blk.convs[:-1]]
        last = out_keep & keep[blk.convs[-1]]
        pos_out = torch.cumsum(out_keep.long(), 0) - 1
        strided = block.conv1 if len(blk.convs) == 2 else block.conv2  # torchvision v1.5
        b = {"source": blk.name, "kind": "bottleneck" if len(blk.convs) == 3 else "basic",
             "in": int(in_keep.sum()), "out": int(out_keep.sum()), "stride": strided.stride[0],
             "mid": [], "index": None if bool((last == out_keep).all()) else pos_out[last].tolist(),
             "shortcut": blk.shortcut, "pad_src": [], "pad_dst": []}
        if not last.any():
            b["branch"] = "none"
        elif not all(m.any() for m in inner):
            b["branch"] = "const"
            sd[f"{prefix}.bias"] = _branch_at_zero(block, inner + [last])[last].clone()
        else:
            b["branch"] = "convs"
            b["mid"] = [int(m.sum()) for m in inner]
            idx = [nz(in_keep)] + [nz(m) for m in inner] + [nz(last)]
            for i, (conv, bn) in enumerate(zip(blk.convs, blk.bns)):
                _handle(sd, f"{prefix}.conv{i + 1}", mods[conv], idx[i + 1], idx[i])
                _handle(sd, f"{prefix}.bn{i + 1}", mods[bn], idx[i + 1])
        if blk.shortcut == "conv":
            _handle(sd, f"{prefix}.downsample.0", block.downsample[0], nz(out_keep), nz(in_keep))
            _handle(sd, f"{prefix}.downsample.1", block.downsample[1], nz(out_keep))
        elif blk.shortcut == "pad":
            b.update(_handle(sd, f"{prefix}.downsample", block.downsample, out_keep, in_keep))
        spec["stages"][s].append(b)

    _handle(sd, "fc", model.fc, None, nz(keep[lay.streams[-1]]))
    return from_spec(spec, sd).eval()
