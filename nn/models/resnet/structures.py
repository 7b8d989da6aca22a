"""A ResNet's channel plumbing (:func:`layout`) and prunable structures (:func:`build_families`).

Any module tree with torchvision's ResNet names is accepted as it is (duck-typed, not by
class): ``conv1``, ``bn1``, ``maxpool`` (``Identity`` or ``MaxPool2d(3, 2, 1)``), stages
``layer1..layerK`` (``nn.Sequential`` of blocks), ``avgpool`` (to 1x1), ``fc``; a block has
``conv1..convk`` and ``bn1..bnk`` (k = 2: BasicBlock, two 3x3 convs, the first strided; k = 3:
Bottleneck, 1x1 / 3x3 strided / 1x1) and ``downsample``: None (identity), a
:class:`~nn.models.resnet.model.PadShortcut` (option A) or ``Sequential(Conv2d 1x1, BatchNorm2d)``
(option B).  :func:`layout` checks every shape the surgery relies on and names the first
mismatch in a ``ValueError``.

Structure families (kinds in :mod:`nn.models.structures`):

``filter``     an output filter of a conv with its BN channel, whose channel feeds only the next
               conv inside a block: ``conv1`` of a BasicBlock, ``conv1``/``conv2`` of a
               Bottleneck; also the stem when it feeds a block with a non-identity shortcut
               (ResNet-50: family ``"conv1"``, read by ``layer1.0.conv1`` and its downsample).
``stream``     a residual-stream channel of a stage (``"stream.layerK"``): written by the stem or
               the stage's first-block downsample and by every block's last conv+BN, read by
               every block's first conv, the next stage's first block (conv1 and an option-B
               downsample) or ``fc``.
``block_out``  a filter of one block's last conv (+BN) only (``"layerK.b.conv2"``, ``conv3`` for
               Bottlenecks): the block then adds into a subset of the stream channels.
``block``      a whole residual block (``"block.layerK.b"``).  Only blocks whose shortcut is the
               identity are removable; the first block of a stage with a downsample is not.

Ownership: the *writers* of the ``filter`` and ``stream`` families partition every parameter
element of the model except ``fc.weight``/``fc.bias`` (each element written by exactly one
structure); ``block_out`` writers are a subset of the ``stream`` writers and ``block`` writers
cover exactly the branch parameters of removable blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn as tnn

from nn.cost import piece_cost
from nn.models.resnet.forward import stages
from nn.models.resnet.model import PadShortcut
from nn.models.resnet.pruned import PrunedResNet
from nn.models.structures import Family, Piece

__all__ = ["BlockInfo", "Layout", "layout", "arch_of", "build_families"]


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
    """The channel plumbing of a dense ResNet: the family the stem writes (``"conv1"`` or
    ``"stream.layer1"``), every block in order, and the streams."""

    stem: str
    blocks: tuple[BlockInfo, ...]
    streams: tuple[str, ...]


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _conv(m, name: str, k: int | None, stride: int | None, in_c: int) -> tnn.Conv2d:
    """``m`` as a plain conv reading ``in_c`` channels: ``k x k`` with padding ``k // 2`` and
    ``stride`` (None: any square one), no bias, groups or dilation."""
    if not isinstance(m, tnn.Conv2d):
        raise ValueError(f"{name} must be a Conv2d, got {type(m).__name__}")
    ks, st, pad = _pair(m.kernel_size), _pair(m.stride), _pair(m.padding)
    ok = (m.bias is None and m.groups == 1 and _pair(m.dilation) == (1, 1)
          and m.padding_mode == "zeros" and ks[0] == ks[1] and st[0] == st[1]
          and pad[0] == pad[1] and m.in_channels == in_c)
    if k is not None:
        ok = ok and ks[0] == k and pad[0] == k // 2
    if not ok or (stride is not None and st[0] != stride):
        raise ValueError(f"{name}: expected a conv reading {in_c} channels"
                         + (f", {k}x{k}, padding {k // 2}" if k is not None else "")
                         + (f", stride {stride}" if stride is not None else "")
                         + f", no bias, groups or dilation; got {m}")
    return m


def _bn(m, name: str, channels: int) -> None:
    if not (isinstance(m, tnn.BatchNorm2d) and m.num_features == channels and m.affine
            and m.track_running_stats):
        raise ValueError(f"{name}: expected BatchNorm2d({channels}) with affine terms and running "
                         f"statistics, got {m}")


def _shortcut(ds, name: str, in_c: int, out_c: int, stride: int) -> str:
    """The type of a block's shortcut, checked against the block's channels and stride."""
    if ds is None:
        if stride != 1 or in_c != out_c:
            raise ValueError(f"{name} has an identity shortcut but maps {in_c} to {out_c} "
                             f"channels with stride {stride}")
        return "identity"
    if isinstance(ds, PadShortcut):
        if (ds.in_channels, ds.out_channels, ds.stride) != (in_c, out_c, stride):
            raise ValueError(f"{name}.downsample: expected PadShortcut({in_c}, {out_c}, "
                             f"{stride}), got ({ds.in_channels}, {ds.out_channels}, {ds.stride})")
        return "pad"
    if not (isinstance(ds, tnn.Sequential) and len(ds) == 2):
        raise ValueError(f"{name}.downsample must be None, a PadShortcut or Sequential(Conv2d, "
                         f"BatchNorm2d), got {type(ds).__name__}")
    conv = _conv(ds[0], f"{name}.downsample.0", 1, stride, in_c)
    if conv.out_channels != out_c:
        raise ValueError(f"{name}.downsample.0 writes {conv.out_channels} channels, not {out_c}")
    _bn(ds[1], f"{name}.downsample.1", out_c)
    return "conv"


def _block(blk, name: str, in_c: int) -> tuple[int, int, str]:
    """``(number of convs, output channels, shortcut type)`` of a block, its shapes checked."""
    k = 0
    while isinstance(getattr(blk, f"conv{k + 1}", None), tnn.Module):
        k += 1
    if k not in (2, 3):
        raise ValueError(f"{name} must have conv1, conv2 (BasicBlock) or conv1..conv3 "
                         f"(Bottleneck), found {k} convs")
    kernels, strided = ((3, 3), 0) if k == 2 else ((1, 3, 1), 1)
    c, stride = in_c, 1
    for i in range(k):
        conv = getattr(blk, f"conv{i + 1}")
        _conv(conv, f"{name}.conv{i + 1}", kernels[i], None if i == strided else 1, c)
        c = conv.out_channels
        _bn(getattr(blk, f"bn{i + 1}", None), f"{name}.bn{i + 1}", c)
        if i == strided:
            stride = _pair(conv.stride)[0]
    return k, c, _shortcut(getattr(blk, "downsample", None), name, in_c, c, stride)


def _check_stem(model) -> int:
    if isinstance(model, PrunedResNet):
        raise ValueError("a PrunedResNet is already compressed, not a dense ResNet")
    for attr in ("conv1", "bn1", "maxpool", "avgpool", "fc", "layer1"):
        if not isinstance(getattr(model, attr, None), tnn.Module):
            raise ValueError(f"expected a dense ResNet (conv1, bn1, maxpool, layer1..K, avgpool, "
                             f"fc), got {type(model).__name__} without {attr!r}")
    conv = model.conv1
    _conv(conv, "conv1", None, None, conv.in_channels if isinstance(conv, tnn.Conv2d) else -1)
    _bn(model.bn1, "bn1", conv.out_channels)
    mp = model.maxpool
    if not (isinstance(mp, tnn.Identity) or (
            isinstance(mp, tnn.MaxPool2d) and _pair(mp.kernel_size) == (3, 3)
            and _pair(mp.stride) == (2, 2) and _pair(mp.padding) == (1, 1)
            and _pair(mp.dilation) == (1, 1) and not mp.ceil_mode)):
        raise ValueError(f"maxpool must be Identity or MaxPool2d(3, 2, 1), got {mp}")
    ap = model.avgpool
    if not (isinstance(ap, tnn.AdaptiveAvgPool2d) and _pair(ap.output_size) == (1, 1)):
        raise ValueError(f"avgpool must be AdaptiveAvgPool2d(1), got {ap}")
    return conv.out_channels


def layout(model: tnn.Module) -> Layout:
    """The :class:`Layout` of a dense ResNet-like module (module docstring); ``ValueError``
    naming the first part that does not fit."""
    width = _check_stem(model)
    stage_list = stages(model)
    blocks, streams, infos = [], [], []
    for s, stage in enumerate(stage_list):
        if not isinstance(stage, tnn.Sequential) or len(stage) == 0:
            raise ValueError(f"layer{s + 1} must be a non-empty nn.Sequential of blocks")
        for b, blk in enumerate(stage):
            name = f"layer{s + 1}.{b}"
            k, out_c, shortcut = _block(blk, name, width)
            if b > 0 and out_c != width:
                raise ValueError(f"{name} writes {out_c} channels into a stream of {width}")
            if b == 0 and s > 0 and shortcut == "identity":
                raise ValueError(f"{name} has an identity shortcut: every stage after the first "
                                 "must start with a downsample (its own stream)")
            infos.append((s, b, name, k, shortcut))
            width = out_c
    fc = model.fc
    if not (isinstance(fc, tnn.Linear) and fc.bias is not None and fc.in_features == width):
        raise ValueError(f"fc must be a Linear with bias reading {width} channels, got {fc}")
    stem = "stream.layer1" if infos[0][4] == "identity" else "conv1"
    src = stem
    for s in range(len(stage_list)):
        streams.append(f"stream.layer{s + 1}")
    for s, b, name, k, shortcut in infos:
        blocks.append(BlockInfo(name, tuple(f"{name}.conv{i + 1}" for i in range(k)),
                                tuple(f"{name}.bn{i + 1}" for i in range(k)),
                                shortcut, src, streams[s]))
        src = streams[s]
    return Layout(stem, tuple(blocks), tuple(streams))


def arch_of(model: tnn.Module) -> dict:
    """The dense model's ``arch`` dict (:class:`~nn.models.resnet.model.ResNet`), or for a module
    without one the same keys read from its layout (``name``: the class name; ``width``: None,
    since no base architecture is known)."""
    arch = getattr(model, "arch", None)
    if isinstance(arch, dict):
        return dict(arch)
    lay = layout(model)
    mods = dict(model.named_modules())
    first = [next(b for b in lay.blocks if b.stream == s) for s in lay.streams]
    conv, pads = model.conv1, {b.shortcut for b in lay.blocks}
    stem = ("imagenet" if _pair(conv.kernel_size) == (7, 7) and _pair(conv.stride) == (2, 2)
            and isinstance(model.maxpool, tnn.MaxPool2d) else
            "cifar" if _pair(conv.kernel_size) == (3, 3) and _pair(conv.stride) == (1, 1)
            and isinstance(model.maxpool, tnn.Identity) else "custom")
    return {"name": type(model).__name__, "stem": stem,
            "block": "Bottleneck" if len(lay.blocks[0].convs) == 3 else "BasicBlock",
            "layers": [sum(b.stream == s for b in lay.blocks) for s in lay.streams],
            "widths": [mods[b.convs[0]].out_channels for b in first],
            "shortcut": "A" if "pad" in pads else "B" if "conv" in pads else None,
            "in_channels": conv.in_channels, "num_classes": model.fc.out_features, "width": None}


def _conv_bn(conv: str, bn: str) -> tuple[Piece, ...]:
    return (Piece(f"{conv}.weight", 0), Piece(f"{bn}.weight", 0), Piece(f"{bn}.bias", 0))


def _readers(blk: BlockInfo) -> tuple[Piece, ...]:
    pieces = (Piece(f"{blk.convs[0]}.weight", 1),)
    if blk.shortcut == "conv":
        pieces += (Piece(f"{blk.name}.downsample.0.weight", 1),)
    return pieces


def build_families(model: tnn.Module, lmacs: dict[str, int] | None = None) -> list[Family]:
    """Every prunable structure of a dense ResNet, with parameter counts and MACs from the
    per-layer MACs ``lmacs`` (``None``: MACs left at 0; surgery and masking need only the
    pieces).  Order: stem filters (if free), then per stage its stream, then per block its
    free filters, block_out and (if removable) block."""
    lay = layout(model)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    lmacs = lmacs or {}

    def cost(p: Piece) -> tuple[int, int]:
        layer = p.param.rsplit(".", 1)[0]
        macs = lmacs.get(layer, 0) if p.param.endswith(".weight") and \
            isinstance(modules[layer], (tnn.Conv2d, tnn.Linear)) else 0
        return piece_cost(params[p.param].shape, p.dim, macs)

    def family(name, kind, writers, readers, conv, size=None):
        if size is None:
            p = writers[0]
            size = params[p.param].shape[p.dim]
        for p in writers + readers:
            assert p.dim is None or params[p.param].shape[p.dim] == size, (name, p)
        own = [cost(p) for p in writers]
        saved = own + [cost(p) for p in readers]
        n, m = (sum(c[i] for c in saved) for i in (0, 1))
        on, om = (sum(c[i] for c in own) for i in (0, 1))
        return Family(name, kind, size, tuple(writers), tuple(readers), (n,) * size, (m,) * size,
                      conv, (on,) * size, (om,) * size)

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
