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

:func:`check_spec` validates a spec whole before anything is built (every field's type and
range, distinct in-range indices, each block reading the width the previous one writes), and
:func:`from_spec` the state_dict's names, shapes and dtypes against it: a damaged file is a
``ValueError`` naming the first bad entry at load time, never a failure at the first forward
(or, for a duplicated index, silently different logits).

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
from nn.weights import check_names

__all__ = ["SPEC_FORMAT", "PrunedResNet", "PrunedBlock", "IndexShortcut", "check_spec",
           "from_spec"]

SPEC_FORMAT = "mipprune.nn.pruned-resnet/1"

_BLOCK_KEYS = ("source", "kind", "in", "out", "stride", "mid", "branch", "index", "shortcut",
               "pad_src", "pad_dst")
_MIDS = {"basic": 1, "bottleneck": 2}  # inner widths of a block's conv branch


def _int(where: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"spec {where} must be an int >= {lo}, got {v!r}")
    return v


def _pick(where: str, v, choices):
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"spec {where} must be one of {choices}, got {v!r}")
    return v


def _indices(where: str, v, size: int, empty: bool = True) -> list:
    """``v`` if it is a list of distinct ints in ``[0, size)`` (non-empty unless ``empty``)."""
    if not isinstance(v, list) or (not v and not empty):
        raise ValueError(f"spec {where} must be a {'' if empty else 'non-empty '}list of "
                         f"channel indices, got {v!r}")
    seen = set()
    for i, j in enumerate(v):
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < size:
            raise ValueError(f"spec {where}[{i}] must be a channel index in [0, {size}), "
                             f"got {j!r}")
        if j in seen:
            raise ValueError(f"spec {where}[{i}] repeats channel {j}: indices must be distinct")
        seen.add(j)
    return v


def _check_block(where: str, b, width_in: int, width_out: int) -> None:
    if not isinstance(b, dict):
        raise ValueError(f"spec {where} must be a dict, got {type(b).__name__}")
    missing = [k for k in _BLOCK_KEYS if k not in b]
    if missing:
        raise ValueError(f"spec {where} lacks {missing[0]!r}")
    if not isinstance(b["source"], str):
        raise ValueError(f"spec {where}.source must be a string, got {b['source']!r}")
    kind = _pick(f"{where}.kind", b["kind"], tuple(_MIDS))
    c_in, c_out = _int(f"{where}.in", b["in"], 1), _int(f"{where}.out", b["out"], 1)
    stride = _int(f"{where}.stride", b["stride"], 1)
    if c_in != width_in:
        raise ValueError(f"spec {where}.in is {c_in}, but the stream it reads has {width_in} "
                         f"channels")
    if c_out != width_out:
        raise ValueError(f"spec {where}.out is {c_out}, but its stage's width is {width_out}")
    branch = _pick(f"{where}.branch", b["branch"], ("convs", "const", "none"))
    if b["index"] is not None:
        _indices(f"{where}.index", b["index"], c_out, empty=branch == "none")
    if not isinstance(b["mid"], list):
        raise ValueError(f"spec {where}.mid must be a list of widths, got {b['mid']!r}")
    if branch == "convs":
        if len(b["mid"]) != _MIDS[kind]:
            raise ValueError(f"spec {where}.mid must hold {_MIDS[kind]} width(s) for a {kind} "
                             f"block, got {b['mid']!r}")
        for i, w in enumerate(b["mid"]):
            _int(f"{where}.mid[{i}]", w, 1)
    shortcut = _pick(f"{where}.shortcut", b["shortcut"], ("identity", "conv", "pad"))
    if shortcut == "identity" and (c_in != c_out or stride != 1):
        raise ValueError(f"spec {where}: an identity shortcut needs in == out and stride 1, got "
                         f"in {c_in}, out {c_out}, stride {stride}")
    src = _indices(f"{where}.pad_src", b["pad_src"], c_in)
    dst = _indices(f"{where}.pad_dst", b["pad_dst"], c_out)
    if len(src) != len(dst):
        raise ValueError(f"spec {where}: pad_src and pad_dst differ in length: {len(src)} != "
                         f"{len(dst)}")


def check_spec(spec) -> dict:
    """``spec`` if it is a whole, consistent pruned-ResNet spec (module docstring); else a
    ``ValueError`` naming the first bad entry (e.g. ``stages[1][0].index[2]``) and what is
    allowed.  Widths chain: the stem writes ``stem.out`` channels, each block reads what the
    previous one wrote and writes its stage's width, the classifier reads the last."""
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"not a pruned-ResNet spec (format {SPEC_FORMAT!r} expected)")
    for key in ("in_channels", "num_classes", "stem", "widths", "stages"):
        if key not in spec:
            raise ValueError(f"spec lacks {key!r}")
    _int("in_channels", spec["in_channels"], 1)
    _int("num_classes", spec["num_classes"], 1)
    st = spec["stem"]
    if not isinstance(st, dict):
        raise ValueError(f"spec stem must be a dict, got {type(st).__name__}")
    for key, lo in (("out", 1), ("kernel", 1), ("stride", 1), ("padding", 0)):
        _int(f"stem.{key}", st.get(key), lo)
    if not isinstance(st.get("maxpool"), bool):
        raise ValueError(f"spec stem.maxpool must be a bool, got {st.get('maxpool')!r}")
    widths, stages = spec["widths"], spec["stages"]
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"spec stages must be a non-empty list of lists of blocks, "
                         f"got {stages!r}")
    if not isinstance(widths, list) or len(widths) != len(stages):
        raise ValueError(f"spec widths must be a list of {len(stages)} ints (one per stage), "
                         f"got {widths!r}")
    for s, w in enumerate(widths):
        _int(f"widths[{s}]", w, 1)
    running = st["out"]
    for s, blocks in enumerate(stages):
        if not isinstance(blocks, list):
            raise ValueError(f"spec stages[{s}] must be a list of blocks, got {blocks!r}")
        for k, b in enumerate(blocks):
            _check_block(f"stages[{s}][{k}]", b, running, widths[s])
            running = b["out"]
    if running != widths[-1]:
        raise ValueError(f"spec widths[-1] is {widths[-1]}, but the last block writes "
                         f"{running} channels (the classifier reads widths[-1])")
    return spec


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
        self.spec = check_spec(spec)
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


def _check_state(state_dict, model: PrunedResNet) -> None:
    """``ValueError`` naming the first tensor of ``state_dict`` that the spec's network does not
    have, lacks, or holds with another shape; floating tensors must share one dtype."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor)
                                                   for v in state_dict.values()):
        raise ValueError("state_dict must map names to tensors")
    own = model.state_dict()
    check_names(state_dict, own, "state_dict does not fit the spec")
    dtypes = set()
    for name, t in own.items():
        have = state_dict[name]
        if tuple(have.shape) != tuple(t.shape):
            raise ValueError(f"state_dict does not fit the spec: {name} has shape "
                             f"{tuple(have.shape)}, the spec's network {tuple(t.shape)}")
        if have.is_floating_point() != t.is_floating_point():
            raise ValueError(f"state_dict entry {name} is {have.dtype}, expected a "
                             f"{'floating' if t.is_floating_point() else 'integer'} tensor")
        if have.is_floating_point():
            dtypes.add(have.dtype)
    if len(dtypes) > 1:
        raise ValueError(f"state_dict mixes dtypes {sorted(map(str, dtypes))}: expected one")


def from_spec(spec: dict, state_dict: dict) -> PrunedResNet:
    """Build the module and take ``state_dict``'s tensors as they are (dtype and device kept;
    built on the meta device first, so no random initialisation is spent).  The spec
    (:func:`check_spec`) and the state_dict's names, shapes and dtypes are checked first."""
    with torch.device("meta"):
        model = PrunedResNet(spec)
    _check_state(state_dict, model)
    model.load_state_dict(state_dict, strict=True, assign=True)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    p = next(iter(state_dict.values()), None)
    return model.to(p.device) if p is not None else model
