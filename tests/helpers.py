"""Helpers shared by several test modules (plain functions; fixtures live in conftest)."""

import json

import torch
from torch import nn as tnn


def random_bn_(model, seed=0):
    """Random BN affine terms and running statistics: every constant is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, tnn.BatchNorm2d):
            c = mod.num_features
            mod.weight.data.copy_(0.3 + 0.7 * torch.rand(c, generator=g))
            mod.bias.data.copy_(0.3 * torch.randn(c, generator=g))
            mod.running_mean.copy_(0.3 * torch.randn(c, generator=g))
            mod.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
    return model


def run_cli(main, capsys, *argv):
    """``(exit code, stdout, stderr)`` of a command-line ``main(argv)`` (argparse's exits
    included)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def strict_json(text):
    """``json.loads`` that fails on the non-standard constants NaN and Infinity."""
    def no_constant(name):
        raise AssertionError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=no_constant)
