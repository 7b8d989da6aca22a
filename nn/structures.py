"""Prunable structures of a ResNet: which parameter slices each structure writes and reads.

A :class:`Family` is a set of structures of one kind, numbered ``0..size-1`` along one axis of
every :class:`Piece` it touches.  Four kinds:

``filter``     (free) an output filter of a conv with its BN channel, whose channel feeds only
               the next conv inside a block: ``conv1`` of a BasicBlock, ``conv1``/``conv2`` of a
               Bottleneck; also the stem when it feeds a block with a non-identity shortcut
               (ResNet-50: family ``"conv1"``, read by ``layer1.0.conv1`` and its downsample).
``stream``     (coupled) a residual-stream channel of a stage (``"stream.layerK"``): written by
               the stem or the stage's first-block downsample and by every block's last conv+BN,
               read by every block's first conv, the next stage's first block (conv1 and an
               option-B downsample) or ``fc``.
``block_out``  a filter of one block's last conv (+BN) only (``"layerK.b.conv2"``, ``conv3`` for
               Bottlenecks): the block then adds into a subset of the stream channels.
``block``      a whole residual block (``"block.layerK.b"``, size 1, every branch parameter with
               ``dim=None``).  Only blocks whose shortcut is the identity are removable; the
               first block of a stage with a downsample shortcut is not.

Ownership: the *writers* of the ``filter`` and ``stream`` families partition every parameter
element of the model except ``fc.weight``/``fc.bias`` (each element written by exactly one
structure); ``block_out`` writers are a subset of the ``stream`` writers and ``block`` writers
cover exactly the branch parameters of removable blocks.  ``params`` and ``macs`` of a structure
count its writer *and* reader slices: what physically removing that structure alone removes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn as tnn

from nn.complexity import layer_macs
from nn.models import Bottleneck, PadShortcut, ResNet

__all__ = ["KINDS", "Piece", "Family", "prunable_structures", "group_weights", "full_masks"]

KINDS = ("filter", "stream", "block_out", "block")


@dataclass(frozen=True)
class Piece:
    """One parameter tensor touched by a family: ``param`` as in ``named_parameters()``, ``dim``
    the axis indexed by the structure number (``None``: the whole tensor, single structure)."""

    param: str
    dim: int | None

    def __post_init__(self):
        if not isinstance(self.param, str) or not self.param:
            raise ValueError(f"param must be a parameter name, got {self.param!r}")
        if self.dim is not None and (not isinstance(self.dim, int) or self.dim < 0):
            raise ValueError(f"dim must be None or an axis >= 0, got {self.dim!r}")


@dataclass(frozen=True)
class Family:
    """Structures of one kind indexed ``0..size-1``; ``writers`` form the SPR group."""

    name: str
    kind: str
    size: int
    writers: tuple[Piece, ...]
    readers: tuple[Piece, ...]
    params: tuple[int, ...]
    macs: tuple[int, ...]
    conv: str | None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if len(self.params) != self.size or len(self.macs) != self.size:
            raise ValueError(f"params/macs of {self.name!r} must have length size={self.size}")
        if not self.writers:
            raise ValueError(f"family {self.name!r} has no writers")


@dataclass(frozen=True)
class BlockInfo:
    """Where one residual block sits: its convs/BNs (last one last), shortcut type
    (``identity``/``pad``/``conv``), the family feeding it and the stream it writes."""

    name: str
    convs: tuple[str, ...]
    bns: tuple[str, ...]
    shortcut: str
    source: str
    stream: str

    @property
    def removable(self) -> bool:
        return self.shortcut == "identity"


@dataclass(frozen=True)
class Layout:
    """The channel plumbing of a dense :class:`~nn.models.ResNet`: the family the stem writes
    (``"conv1"`` or ``"stream.layer1"``), every block in order, and the streams."""

    stem: str
    blocks: tuple[BlockInfo, ...]
    streams: tuple[str, ...]


def layout(model: ResNet) -> Layout:
    if not isinstance(model, ResNet):
        raise ValueError(f"expected a dense nn.models.ResNet, got {type(model).__name__}")
    stages = model.stages()
    stem = "stream.layer1" if stages[0][0].downsample is None else "conv1"
    src, blocks, streams = stem, [], []
    for s, stage in enumerate(stages):
        stream = f"stream.layer{s + 1}"
        streams.append(stream)
        for b, blk in enumerate(stage):
            name = f"layer{s + 1}.{b}"
            k = 3 if isinstance(blk, Bottleneck) else 2
            ds = blk.downsample
            shortcut = ("identity" if ds is None else
                        "pad" if isinstance(ds, PadShortcut) else "conv")
            assert not (b == 0 and s > 0 and shortcut == "identity"), "stage must change width"
            blocks.append(BlockInfo(name, tuple(f"{name}.conv{i + 1}" for i in range(k)),
                                    tuple(f"{name}.bn{i + 1}" for i in range(k)),
                                    shortcut, src, stream))
            src = stream
    return Layout(stem, tuple(blocks), tuple(streams))


def _conv_bn(conv: str, bn: str) -> tuple[Piece, ...]:
    return (Piece(f"{conv}.weight", 0), Piece(f"{bn}.weight", 0), Piece(f"{bn}.bias", 0))


def _readers(blk: BlockInfo) -> tuple[Piece, ...]:
    pieces = (Piece(f"{blk.convs[0]}.weight", 1),)
    if blk.shortcut == "conv":
        pieces += (Piece(f"{blk.name}.downsample.0.weight", 1),)
    return pieces


def prunable_structures(model: ResNet, input_size=(3, 32, 32)) -> list[Family]:
    """Every prunable structure of a dense ResNet, with parameter and MAC counts at
    ``input_size`` (channels, height, width).  Order: stem filters (if free), then per stage
    its stream, then per block its free filters, block_out and (if removable) block."""
    layout(model)  # ValueError for anything but a dense ResNet, before the probe pass
    return build_families(model, layer_macs(model, input_size))


def build_families(model: ResNet, lmacs: dict[str, int] | None = None) -> list[Family]:
    """:func:`prunable_structures` from per-layer MACs ``lmacs`` (``None``: MACs left at 0;
    surgery and masking need only the pieces, and skip the probe forward pass)."""
    lay = layout(model)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    lmacs = lmacs or {}

    def piece_cost(p: Piece) -> tuple[int, int]:
        t = params[p.param]
        mod = modules[p.param.rsplit(".", 1)[0]]
        full = lmacs.get(p.param.rsplit(".", 1)[0], 0) if p.param.endswith(".weight") and \
            isinstance(mod, (tnn.Conv2d, tnn.Linear)) else 0
        if p.dim is None:
            return t.numel(), full
        return t.numel() // t.shape[p.dim], full // t.shape[p.dim]

    def family(name, kind, writers, readers, conv, size=None):
        if size is None:
            p = writers[0]
            size = params[p.param].shape[p.dim]
        for p in writers + readers:
            assert p.dim is None or params[p.param].shape[p.dim] == size, (name, p)
        costs = [piece_cost(p) for p in writers + readers]
        n = sum(c[0] for c in costs)
        m = sum(c[1] for c in costs)
        return Family(name, kind, size, tuple(writers), tuple(readers), (n,) * size, (m,) * size,
                      conv)

    fams: list[Family] = []
    stem_w = _conv_bn("conv1", "bn1")
    if lay.stem == "conv1":
        readers = tuple(r for blk in lay.blocks if blk.source == "conv1" for r in _readers(blk))
        fams.append(family("conv1", "filter", stem_w, readers, "conv1"))
    for s, stream in enumerate(lay.streams):
        blocks = [blk for blk in lay.blocks if blk.stream == stream]
        writers = stem_w if lay.stem == stream else ()
        for blk in blocks:
            if blk.shortcut == "conv":
                writers += (Piece(f"{blk.name}.downsample.0.weight", 0),
                            Piece(f"{blk.name}.downsample.1.weight", 0),
                            Piece(f"{blk.name}.downsample.1.bias", 0))
            writers += _conv_bn(blk.convs[-1], blk.bns[-1])
        readers = tuple(r for blk in lay.blocks if blk.source == stream for r in _readers(blk))
        if s == len(lay.streams) - 1:
            readers += (Piece("fc.weight", 1),)
        fams.append(family(stream, "stream", writers, readers, None))
        for blk in blocks:
            for i in range(len(blk.convs) - 1):
                fams.append(family(blk.convs[i], "filter", _conv_bn(blk.convs[i], blk.bns[i]),
                                   (Piece(f"{blk.convs[i + 1]}.weight", 1),), blk.convs[i]))
            fams.append(family(blk.convs[-1], "block_out", _conv_bn(blk.convs[-1], blk.bns[-1]),
                               (), blk.convs[-1]))
            if blk.removable:
                whole = tuple(Piece(n, None) for n in params
                              if n.startswith(blk.name + ".") and ".downsample." not in n)
                fams.append(family(f"block.{blk.name}", "block", whole, (), None, size=1))
    return fams


def group_weights(params: dict, family: Family) -> torch.Tensor:
    """The SPR groups of ``family``: a ``(size, k)`` tensor whose row ``j`` concatenates the
    writer slices of structure ``j`` (``params`` maps names to tensors, e.g.
    ``dict(model.named_parameters())``; differentiable, no copy of the formula's input)."""
    rows = []
    for p in family.writers:
        t = params[p.param]
        rows.append(t.reshape(1, -1) if p.dim is None
                    else t.movedim(p.dim, 0).reshape(family.size, -1))
    return torch.cat(rows, dim=1)


def full_masks(families, device=None) -> dict[str, torch.Tensor]:
    """All-True masks (keep everything) for ``families``."""
    return {f.name: torch.ones(f.size, dtype=torch.bool, device=device) for f in families}
