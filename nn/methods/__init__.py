"""Pruning methods: one module each, one registry.

Adding a method is one module defining a :class:`~nn.methods.base.Method` subclass (its hooks,
scores or selection, report section) plus one line in :data:`_REGISTRY`; the pipeline, the
command line and the report pick it up from here.  Modules load on first use, so a method's
dependencies cost nothing to runs that do not use it.
"""

from __future__ import annotations

from importlib import import_module

from nn.methods.base import Method, Run, Training

__all__ = ["METHODS", "Method", "Run", "Training", "get_method"]

_REGISTRY = {
    "spr": "nn.methods.spr:SPR",
    "bigm": "nn.methods.bigm:BigM",
    "dense": "nn.methods.dense:Dense",
    "l1-filter": "nn.methods.l1_filter:L1Filter",
    "slimming": "nn.methods.slimming:Slimming",
    "variational": "nn.methods.variational:Variational",
    "random": "nn.methods.random:RandomFilters",
    "tp-groupnorm": "nn.methods.torch_pruning:TPGroupNorm",
    "tp-magnitude": "nn.methods.torch_pruning:TPMagnitude",
}

METHODS = tuple(_REGISTRY)
"""Every method name, in the order ``--help`` lists them."""

_loaded: dict[str, Method] = {}


def get_method(name: str) -> Method:
    """The registered method ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of {METHODS}, got {name!r}")
    if name not in _loaded:
        module, cls = _REGISTRY[name].split(":")
        _loaded[name] = getattr(import_module(module), cls)()
    return _loaded[name]
