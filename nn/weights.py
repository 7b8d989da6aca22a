"""Weights from a file: a ``state_dict`` (e.g. a torchvision ResNet checkpoint) or a training
checkpoint holding one under ``"state_dict"`` or ``"model"``, read with ``weights_only=True``
and loaded only when every name and shape matches the model and every value is finite
(:func:`check_shapes` also serves readers of a few tensors, e.g. SPR's reference for M)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn as tnn

__all__ = ["read_state_dict", "check_names", "check_shapes", "load_weights"]


def read_state_dict(source) -> Mapping:
    """The tensors of ``source``: a path (a state_dict or a checkpoint that holds one under
    ``state_dict`` or ``model``), a module or a mapping.  ``ValueError`` naming the file and
    what it holds when it is none of these."""
    if isinstance(source, tnn.Module):
        return source.state_dict()
    if isinstance(source, (str, os.PathLike)):
        try:
            source = torch.load(source, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # not a torch file, or one that needs unpickling classes
            raise ValueError(f"{os.fspath(source)}: not a weights file torch.load can read "
                             f"with weights_only=True ({type(e).__name__})") from None
        for key in ("state_dict", "model"):
            if isinstance(source, Mapping) and key in source:
                source = source[key]
    if not isinstance(source, Mapping) or not all(isinstance(v, torch.Tensor)
                                                  for v in source.values()):
        raise ValueError(f"weights must be a state_dict (names -> tensors), a checkpoint "
                         f"holding one, a module or a path, got {type(source).__name__}")
    return source


def check_names(state: Mapping, own: Mapping, prefix: str = "weights do not fit the model") -> None:
    """``ValueError`` (``prefix: ...``) naming the first name ``state`` lacks or has beyond
    ``own``'s, with how many of each."""
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"{prefix}: "
                         + (f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}")
                         + f" ({len(missing)} missing, {len(extra)} unexpected names)")


def check_shapes(state: Mapping, own: Mapping, names=None, what: str = "weights") -> None:
    """``ValueError`` naming the first of ``names`` (default: every name of ``own``, the
    model's state) that ``state`` lacks or holds with another shape than ``own``'s (a file of
    another width or a pruned model), with both shapes."""
    for name in own if names is None else names:
        if name not in state:
            raise ValueError(f"{what} do not fit the model: missing {name!r}")
        have, want = tuple(state[name].shape), tuple(own[name].shape)
        if have != want:
            raise ValueError(f"{what} do not fit the model: {name} has shape {have} in the "
                             f"file, {want} in the model")


def load_weights(model: tnn.Module, source) -> tnn.Module:
    """Copy ``source``'s tensors (:func:`read_state_dict`) into ``model`` in place, after
    checking that the names are exactly the model's, every shape matches (a checkpoint of
    another width or a pruned model is refused, naming the first difference) and every
    floating value is finite."""
    state = read_state_dict(source)
    own = model.state_dict()
    check_names(state, own)
    check_shapes(state, own)
    broken = next((n for n, t in state.items()
                   if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if broken is not None:
        raise ValueError(f"weights hold values that are not finite (NaN or inf) in {broken}")
    model.load_state_dict(state, strict=True)
    return model
