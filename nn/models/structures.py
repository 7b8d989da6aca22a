"""Prunable structures, the vocabulary every model family speaks: pieces, families, masks.

A :class:`Family` is a set of structures of one kind, numbered ``0..size-1`` along one axis of
every :class:`Piece` it touches.  Its *writers* are the slices the structure itself produces
(its SPR group); its *readers* are the slices of later layers that consume it.  Removing
structure ``j`` removes slice ``j`` of every writer and every reader, so ``params`` and
``macs`` of a structure count both: what physically removing that structure alone removes.

Kinds (:data:`KINDS`; a family's own module says which of its layers each one covers):

``filter``     (free) an output filter with its BN channel, read by one layer only;
``stream``     (coupled) a channel shared by several writers and readers (a residual stream);
``block_out``  a filter of one block's last layer: the block then writes a subset of a stream;
``block``      a whole residual block (size 1, every branch parameter with ``dim=None``).

Masks are ``{family name: bool tensor of shape (size,)}``, True = keep; a family left out keeps
everything (:func:`check_masks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KINDS", "Piece", "Family", "group_weights", "full_masks", "check_masks"]

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
    """Structures of one kind indexed ``0..size-1``; ``writers`` form the SPR group.
    ``params``/``macs``: what removing one structure saves (writer and reader slices);
    ``own_params``/``own_macs``: its writer slices alone (None where a family does not say)."""

    name: str
    kind: str
    size: int
    writers: tuple[Piece, ...]
    readers: tuple[Piece, ...]
    params: tuple[int, ...]
    macs: tuple[int, ...]
    conv: str | None
    own_params: tuple[int, ...] | None = None
    own_macs: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        for label in ("params", "macs", "own_params", "own_macs"):
            v = getattr(self, label)
            if (v is not None or label in ("params", "macs")) and len(v) != self.size:
                raise ValueError(f"{label} of {self.name!r} must have length size={self.size}")
        if not self.writers:
            raise ValueError(f"family {self.name!r} has no writers")


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


def check_masks(families: list[Family], masks: dict) -> dict[str, torch.Tensor]:
    """Masks for every family (missing ones all True), as CPU bool tensors; ``ValueError`` for an
    unknown family name or a mask of the wrong dtype or shape."""
    by_name = {f.name: f for f in families}
    unknown = sorted(set(masks) - set(by_name))
    if unknown:
        raise ValueError(f"unknown families in masks: {unknown}")
    out = {}
    for f in families:
        m = masks.get(f.name)
        if m is None:
            out[f.name] = torch.ones(f.size, dtype=torch.bool)
            continue
        m = torch.as_tensor(m).detach().cpu()
        if m.dtype != torch.bool or tuple(m.shape) != (f.size,):
            raise ValueError(f"mask {f.name!r} must be a bool tensor of shape ({f.size},), "
                             f"got {m.dtype} {tuple(m.shape)}")
        out[f.name] = m
    return out
