"""Model families (DESIGN §9): the registry, the lookup from a module to its family, and the
family-generic entry points that the pipeline and the pruning methods call.

A family is one subpackage (``nn/models/resnet/``) that builds its named architectures, accepts
or rejects a module (duck-typed, a ``ValueError`` saying why), lists its prunable structures
(:mod:`nn.models.structures`), masks and physically compresses them, and rebuilds a compressed
network from its saved spec.  It registers one :class:`ModelFamily` (``nn/models/__init__.py``);
every function below finds the family of its argument and hands the call over, so no caller
tests a model's class or name.

File format of :func:`save_pruned`: ``{"spec": spec, "state_dict": state_dict}`` with ``spec``
plain data (dicts, lists, ints, strings, bools, None) whose ``"format"`` names the family's
:attr:`ModelFamily.spec_format`, so :func:`load_pruned` reads it with ``weights_only=True``
(no class is unpickled) and knows which family rebuilds it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn as tnn

from nn.complexity import layer_macs
from nn.io import read_torch, save_torch
from nn.models.structures import Family

__all__ = ["ModelFamily", "FAMILIES", "MODELS", "register_family", "family_of", "build_model",
           "build_families", "prunable_structures", "apply_masks_", "apply_masks", "compress",
           "save_pruned", "load_pruned"]


@dataclass(frozen=True)
class ModelFamily:
    """What a model family provides.

    ``models``: its named architectures (name -> description); ``build(name, num_classes,
    in_channels, width, shortcut)``: a dense network; ``check(module)``: returns normally for a
    dense network of the family, else raises ``ValueError`` saying what does not fit;
    ``build_families(model, layer_macs | None)``: its prunable structures;
    ``apply_masks_(model, masks, families | None)``: zero removed structures in place;
    ``compress(model, masks)``: the physically pruned network (an instance of ``pruned_type``,
    carrying its plain-data ``spec``); ``from_spec(spec, state_dict)``: that network rebuilt;
    ``spec_format``: the ``"format"`` entry of its specs."""

    name: str
    models: Mapping[str, object]
    build: Callable[..., tnn.Module]
    check: Callable[[tnn.Module], object]
    build_families: Callable[..., list[Family]]
    apply_masks_: Callable[..., tnn.Module]
    compress: Callable[[tnn.Module, dict], tnn.Module]
    spec_format: str
    pruned_type: type
    from_spec: Callable[[dict, dict], tnn.Module]


FAMILIES: dict[str, ModelFamily] = {}
MODELS: dict[str, object] = {}  # every family's named architectures
_OWNER: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family``; ``ValueError`` if its name, a model name or its spec format is taken."""
    if not isinstance(family, ModelFamily):
        raise ValueError(f"expected a ModelFamily, got {type(family).__name__}")
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    taken = sorted(set(family.models) & set(MODELS))
    if taken:
        raise ValueError(f"model names {taken} are already registered")
    if any(f.spec_format == family.spec_format for f in FAMILIES.values()):
        raise ValueError(f"spec format {family.spec_format!r} is already registered")
    FAMILIES[family.name] = family
    MODELS.update(family.models)
    _OWNER.update({name: family for name in family.models})
    return family


def family_of(model: tnn.Module) -> ModelFamily:
    """The first registered family whose ``check`` accepts ``model``; ``ValueError`` with every
    family's reason otherwise."""
    reasons = []
    for family in FAMILIES.values():
        try:
            family.check(model)
        except ValueError as e:
            reasons.append(f"{family.name}: {e}")
            continue
        return family
    raise ValueError(f"no model family accepts this {type(model).__name__} "
                     f"({'; '.join(reasons)})")


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                shortcut: str | None = None) -> tnn.Module:
    """The dense network ``name`` of :data:`MODELS`, built by its family.  ``width`` multiplies
    every channel count; ``shortcut`` is a family option (ResNet: ``"A"``/``"B"``; None: the
    family's default for that model)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return _OWNER[name].build(name, num_classes, in_channels, width, shortcut)


def build_families(model: tnn.Module, lmacs: dict[str, int] | None = None) -> list[Family]:
    """The prunable structures of ``model`` with MACs from the per-layer counts ``lmacs``
    (None: MACs left at 0, no probe pass; masking and surgery need only the pieces)."""
    return family_of(model).build_families(model, lmacs)


def prunable_structures(model: tnn.Module, input_size=(3, 32, 32)) -> list[Family]:
    """Every prunable structure of a dense ``model``, with parameter and MAC counts at
    ``input_size`` (channels, height, width)."""
    family = family_of(model)  # ValueError for a module no family takes, before the probe pass
    return family.build_families(model, layer_macs(model, input_size))


def apply_masks_(model: tnn.Module, masks: dict, families: list[Family] | None = None):
    """Zero, in place, every writer and reader slice of the structures ``masks`` removes
    (see the family's surgery module).  Returns ``model``."""
    return family_of(model).apply_masks_(model, masks, families)


def apply_masks(model: tnn.Module, masks: dict, families: list[Family] | None = None):
    """The masked model: a deep copy of ``model`` with :func:`apply_masks_` applied."""
    return family_of(model).apply_masks_(copy.deepcopy(model), masks, families)


def compress(model: tnn.Module, masks: dict) -> tnn.Module:
    """The physically pruned network for ``masks`` (``model`` untouched; result in ``eval()``,
    with the model's dtype and device).  In ``eval()`` its logits equal the masked model's."""
    return family_of(model).compress(model, masks)


def save_pruned(model: tnn.Module, path) -> Path:
    """Write ``{"spec", "state_dict"}`` of a compressed network atomically."""
    if not any(isinstance(model, f.pruned_type) for f in FAMILIES.values()):
        names = ", ".join(f.pruned_type.__name__ for f in FAMILIES.values())
        raise ValueError(f"save_pruned expects a compressed network ({names}), got "
                         f"{type(model).__name__}")
    path = Path(path)
    save_torch(path, {"spec": model.spec, "state_dict": model.state_dict()})
    return path


def load_pruned(path, map_location="cpu") -> tnn.Module:
    """Read a file written by :func:`save_pruned`: every record's CRC-32 checked, then loaded
    with ``weights_only=True`` (:func:`nn.io.read_torch`); returns the model in ``eval()``
    mode, ready for inference.  The family's ``from_spec`` validates the spec and the
    state_dict against it; anything wrong (a damaged file, one torch cannot read, an unknown
    format, a bad spec entry, a tensor of the wrong shape) is a one-line ``ValueError`` naming
    ``path`` (a missing file is a ``FileNotFoundError``)."""
    if not Path(path).exists() or Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such pruned model file")
    blob = read_torch(path, map_location)  # CRC-32 of every record, then weights_only=True
    if not isinstance(blob, dict) or "spec" not in blob or "state_dict" not in blob:
        raise ValueError(f"{path}: not a pruned model file (keys 'spec', 'state_dict' expected)")
    fmt = blob["spec"].get("format") if isinstance(blob["spec"], dict) else None
    family = next((f for f in FAMILIES.values() if f.spec_format == fmt), None)
    if family is None:
        raise ValueError(f"{path}: unknown pruned-model format {fmt!r}; known: "
                         f"{sorted(f.spec_format for f in FAMILIES.values())}")
    try:
        return family.from_spec(blob["spec"], blob["state_dict"]).eval()
    except ValueError as e:
        raise ValueError(f"{path}: {' '.join(str(e).split())}") from None
