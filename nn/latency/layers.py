"""The timed units of a ResNet's inference form (:class:`Layer`, :func:`network_layers`) and
the widths that set their channel counts.

The *inference form* of a (pruned) ResNet is its compressed network with every BatchNorm
folded into the convolution before it (:func:`nn.latency.units.inference_form`), run by its
own eager forward (:mod:`nn.models.resnet.forward`).  Its forward pass is partitioned into
units, in execution order::

    conv   a convolution with its BN folded in (a bias) and the ReLU that follows it, if any:
           the stem, every inner conv of a block (+ReLU), a block's last conv (no ReLU: that
           one comes after the add)
    pool   the ImageNet stem's max-pool; the global average pool (+ flatten) before fc
    fc     the classifier
    add    everything else a block runs: its Python path (the block, branch and conv-BN
           wrappers, the folded BNs' identity calls), its shortcut (identity, option A's
           subsample-and-pad copy, option B's folded 1x1 conv), the residual add and the
           final ReLU

What the units leave out (the network's own call, the stem's folded-BN and identity
max-pool calls, the stage containers) is the same for every pruned form of a network: the
table's fitted constant (:mod:`nn.latency.table`).

A unit's channel counts are set by the widths of two structure families of
:func:`nn.models.prunable_structures` (``in_family`` -> input channels, ``out_family`` ->
output channels; None: fixed at the dense count).  Families that set channel counts are the
``filter`` families (a block's inner convs' outputs, named by their conv, and the ResNet-50 stem
``"conv1"``) and the ``stream.layerK`` families; ``block_out`` families (a subset of the stream
written by one block) are not modelled: their block is taken to write the whole stream.  A unit
of a removable block names it (``block``, the ``"block.layerK.b"`` family) and disappears
with it.  Widths are at least 1: a block whose inner conv keeps no filter (a cut branch, a
constant) is not modelled -- remove the block instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn as tnn

from nn.models.resnet.structures import layout

__all__ = ["KINDS", "OPS", "Layer", "network_layers", "layer_families", "candidate_widths",
           "width_masks"]

KINDS = ("conv", "add", "pool", "fc")
OPS = {"conv": ("conv", "conv+relu"), "add": ("identity", "pad", "conv"),
       "pool": ("max", "avg"), "fc": ("linear",)}
"""The operation of each kind: conv with or without its ReLU; add by shortcut type; pool max
(3x3, stride 2, padding 1) or global average; fc linear."""


def _pos_int(name: str, v, lo: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


@dataclass(frozen=True)
class Layer:
    """One timed unit of the inference form (module docstring).

    ``kernel``, ``stride``, ``padding``: of the conv or pool (``add``: the shortcut's stride,
    kernel 1, padding 0; ``fc``: 1, 1, 0); ``height``, ``width``: of the unit's input;
    ``in_channels``/``out_channels``: the dense counts; ``in_family``/``out_family``: the
    families whose widths set them (None: fixed); ``block``: the removable block the unit
    belongs to (None: always run); ``depth``: the number of convs on the block's branch
    (``add`` only, else 0)."""

    name: str
    kind: str
    op: str
    kernel: int
    stride: int
    padding: int
    height: int
    width: int
    in_channels: int
    out_channels: int
    in_family: str | None
    out_family: str | None
    block: str | None = None
    depth: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Layer kind must be one of {KINDS}, got {self.kind!r}")
        if self.op not in OPS[self.kind]:
            raise ValueError(f"Layer op of a {self.kind} must be one of {OPS[self.kind]}, "
                             f"got {self.op!r}")
        for name in ("kernel", "stride", "height", "width", "in_channels", "out_channels"):
            _pos_int(f"Layer {name}", getattr(self, name))
        _pos_int("Layer padding", self.padding, 0)
        for name in ("in_family", "out_family", "block"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"Layer {name} must be None or a family name, got {v!r}")
        if self.tied and self.in_channels != self.out_channels:
            raise ValueError(f"Layer {self.name!r} reads and writes family {self.in_family!r} "
                             f"but has {self.in_channels} != {self.out_channels} channels")
        if (self.kind == "add") != (self.depth > 0):
            raise ValueError(f"Layer depth must be > 0 exactly for an add, got {self.depth!r} "
                             f"for a {self.kind}")

    @property
    def tied(self) -> bool:
        """Input and output channels are one family's width (an identity add, a pool)."""
        return self.in_family is not None and self.in_family == self.out_family

    @property
    def axes(self) -> str:
        """Which widths the unit's latency depends on: ``"in,out"``, ``"in"``, ``"out"``,
        ``"tied"`` (one width for both) or ``""`` (none)."""
        if self.tied:
            return "tied"
        return ",".join(a for a, f in (("in", self.in_family), ("out", self.out_family)) if f)

    @property
    def key(self) -> str:
        """The table entry this unit reads: equal keys have equal geometry, dense channel
        counts and width axes, hence equal latency at equal widths."""
        extra = f" d{self.depth}" if self.kind == "add" else ""
        return (f"{self.kind}/{self.op} {self.in_channels}->{self.out_channels} k{self.kernel} "
                f"s{self.stride} p{self.padding} {self.height}x{self.width}{extra} "
                f"[{self.axes}]")


def _out_hw(h: int, w: int, k: int, s: int, p: int) -> tuple[int, int]:
    return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1


def _conv_layer(name, conv: tnn.Conv2d, h, w, in_f, out_f, relu, block) -> Layer:
    return Layer(name, "conv", "conv+relu" if relu else "conv", conv.kernel_size[0],
                 conv.stride[0], conv.padding[0], h, w, conv.in_channels, conv.out_channels,
                 in_f, out_f, block)


def network_layers(model: tnn.Module, input_size=(3, 32, 32)) -> list[Layer]:
    """Every timed unit of the inference form of the dense ResNet ``model`` (any module
    :func:`nn.models.resnet.layout` accepts) for one input of shape ``input_size``
    (channels, height, width), in execution order.  Each conv of the model appears exactly once
    (option-B shortcut convs inside their block's ``add``)."""
    lay = layout(model)
    if len(input_size) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                   for v in input_size):
        raise ValueError(f"input_size must be (channels, height, width) of positive ints, "
                         f"got {tuple(input_size)!r}")
    if input_size[0] != model.conv1.in_channels:
        raise ValueError(f"input_size has {input_size[0]} channels; the model reads "
                         f"{model.conv1.in_channels}")
    mods = dict(model.named_modules())
    h, w = input_size[1:]
    out = [_conv_layer("conv1", model.conv1, h, w, None, lay.stem, True, None)]
    c = model.conv1
    h, w = _out_hw(h, w, c.kernel_size[0], c.stride[0], c.padding[0])
    if isinstance(model.maxpool, tnn.MaxPool2d):
        out.append(Layer("maxpool", "pool", "max", 3, 2, 1, h, w, c.out_channels,
                         c.out_channels, lay.stem, lay.stem))
        h, w = _out_hw(h, w, 3, 2, 1)
    for blk in lay.blocks:
        block = f"block.{blk.name}" if blk.removable else None
        h0, w0, in_f, stride = h, w, blk.source, 1
        for i, name in enumerate(blk.convs):
            conv = mods[name]
            last = i == len(blk.convs) - 1
            out.append(_conv_layer(name, conv, h, w, in_f, blk.stream if last else name,
                                   not last, block))
            h, w = _out_hw(h, w, conv.kernel_size[0], conv.stride[0], conv.padding[0])
            stride *= conv.stride[0]
            in_f = name
        out.append(Layer(f"{blk.name}.add", "add", blk.shortcut, 1, stride, 0, h0, w0,
                         mods[blk.convs[0]].in_channels, mods[blk.convs[-1]].out_channels,
                         blk.source, blk.stream, block, len(blk.convs)))
    last = lay.streams[-1]
    out.append(Layer("avgpool", "pool", "avg", 1, 1, 0, h, w, model.fc.in_features,
                     model.fc.in_features, last, last))
    out.append(Layer("fc", "fc", "linear", 1, 1, 0, 1, 1, model.fc.in_features,
                     model.fc.out_features, last, None))
    return out


def layer_families(layers) -> dict[str, int]:
    """The families that set channel counts in ``layers``, with their dense widths."""
    out: dict[str, int] = {}
    for ly in layers:
        for fam, c in ((ly.in_family, ly.in_channels), (ly.out_family, ly.out_channels)):
            if fam is not None:
                assert out.setdefault(fam, c) == c, (fam, c, out[fam])
    return out


def candidate_widths(dense: int, granularity: int) -> tuple[int, ...]:
    """Every multiple of ``granularity`` up to ``dense``, and ``dense`` itself, increasing."""
    _pos_int("granularity", granularity)
    _pos_int("dense width", dense)
    return tuple(sorted({*range(granularity, dense + 1, granularity), dense}))


def width_masks(layers, widths: dict[str, int] | None = None,
                blocks_kept: dict[str, bool] | None = None) -> dict[str, torch.Tensor]:
    """Masks (:mod:`nn.models.structures`) keeping the *first* ``widths[f]`` structures of each
    family ``f`` (families left out: all) and removing the blocks with ``blocks_kept[b]``
    False: the pruned network :func:`nn.compress` builds from them has exactly those widths.
    ``ValueError`` for a family or block the layers do not name, or a width outside
    ``1..dense``."""
    dense = layer_families(layers)
    blocks = {ly.block for ly in layers if ly.block is not None}
    masks: dict[str, torch.Tensor] = {}
    for fam, wd in (widths or {}).items():
        if fam not in dense:
            raise ValueError(f"unknown family {fam!r}; the layers' families are {sorted(dense)}")
        if isinstance(wd, bool) or not isinstance(wd, int) or not 1 <= wd <= dense[fam]:
            raise ValueError(f"width of {fam!r} must be an int in 1..{dense[fam]}, got {wd!r}")
        masks[fam] = torch.arange(dense[fam]) < wd
    for blk, kept in (blocks_kept or {}).items():
        if blk not in blocks:
            raise ValueError(f"unknown block {blk!r}; removable blocks are {sorted(blocks)}")
        masks[blk] = torch.tensor([bool(kept)])
    return masks
