"""The model-family registry (DESIGN §9): a second family is one registration away.

A toy family (a two-layer perceptron whose hidden units are one ``filter`` family) is
registered on a copy of the registry; the family-generic entry points (``build_model``,
``prunable_structures``, ``apply_masks``, ``compress``, ``save_pruned``/``load_pruned``) then
route to it without any change, while ResNets keep going to the ResNet family.
"""

import copy

import pytest
import torch
from torch import nn as tnn

from nn import (apply_masks, build_model, compress, count_params, load_pruned,
                prunable_structures, save_pruned)
from nn.models import (FAMILIES, MODELS, Family, ModelFamily, Piece, PrunedResNet, check_masks,
                       family_of, register_family, registry, resnet)

FORMAT = "test.tiny-mlp/1"


class TinyMLP(tnn.Module):
    """``fc2(relu(fc1(flatten(x))))``."""

    def __init__(self, n_in, hidden, n_out, spec=None):
        super().__init__()
        self.fc1, self.fc2 = tnn.Linear(n_in, hidden), tnn.Linear(hidden, n_out)
        self.spec = spec

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class TinyPruned(TinyMLP):
    pass


def _check(m):
    if type(m) is not TinyMLP:
        raise ValueError(f"not a TinyMLP: {type(m).__name__}")


def _families(m, lmacs):
    h = m.fc1.out_features
    lmacs = lmacs or {}
    params = m.fc1.in_features + 1 + m.fc2.out_features
    macs = lmacs.get("fc1", 0) // h + lmacs.get("fc2", 0) // h
    return [Family("fc1", "filter", h, (Piece("fc1.weight", 0), Piece("fc1.bias", 0)),
                   (Piece("fc2.weight", 1),), (params,) * h, (macs,) * h, None)]


def _apply_masks_(m, masks, families=None):
    keep = check_masks(_families(m, None), masks)["fc1"]
    with torch.no_grad():
        for t, dim in ((m.fc1.weight, 0), (m.fc1.bias, 0), (m.fc2.weight, 1)):
            t.index_fill_(dim, torch.nonzero(~keep).flatten(), 0)
    return m


def _from_spec(spec, sd):
    m = TinyPruned(spec["in"], spec["hidden"], spec["out"], spec)
    m.load_state_dict(sd)
    return m


def _compress(m, masks):
    idx = torch.nonzero(check_masks(_families(m, None), masks)["fc1"]).flatten()
    spec = {"format": FORMAT, "in": m.fc1.in_features, "hidden": len(idx),
            "out": m.fc2.out_features}
    sd = {"fc1.weight": m.fc1.weight[idx], "fc1.bias": m.fc1.bias[idx],
          "fc2.weight": m.fc2.weight[:, idx], "fc2.bias": m.fc2.bias}
    return _from_spec(spec, {k: v.detach().clone() for k, v in sd.items()}).eval()


def _build(name, num_classes, in_channels, width, shortcut):
    if shortcut is not None:
        raise ValueError("tiny-mlp has no shortcut option")
    return TinyMLP(in_channels * 16, max(1, round(8 * width)), num_classes)


TINY = ModelFamily(name="tiny", models={"tiny-mlp": None}, build=_build, check=_check,
                   build_families=_families, apply_masks_=_apply_masks_, compress=_compress,
                   spec_format=FORMAT, pruned_type=TinyPruned, from_spec=_from_spec)


@pytest.fixture
def with_tiny(monkeypatch):
    """The registry with the toy family added, restored afterwards."""
    for name in ("FAMILIES", "MODELS", "_OWNER"):
        monkeypatch.setattr(registry, name, copy.copy(getattr(registry, name)))
    register_family(TINY)
    return TINY


def test_resnet_is_registered():
    assert FAMILIES["resnet"] is resnet.FAMILY and set(resnet.MODELS) <= set(MODELS)
    m = build_model("resnet20", width=0.25)
    assert family_of(m) is resnet.FAMILY
    assert resnet.FAMILY.pruned_type is PrunedResNet


def test_a_new_family_is_one_registration(with_tiny, tmp_path):
    m = build_model("tiny-mlp", 3, 1, 1.0)
    assert isinstance(m, TinyMLP) and family_of(m) is TINY
    fams = prunable_structures(m, (1, 4, 4))  # MACs from the probe pass, as for ResNets
    assert fams[0].macs == (16 + 3,) * 8 and fams[0].params == (16 + 1 + 3,) * 8
    masks = {"fc1": torch.tensor([True, False] * 4)}
    x = torch.randn(5, 1, 4, 4)
    small = compress(m, masks)
    with torch.no_grad():
        torch.testing.assert_close(small(x), apply_masks(m, masks)(x))
    assert count_params(m) - count_params(small) == 4 * fams[0].params[0]
    loaded = load_pruned(save_pruned(small, tmp_path / "tiny.pt"))
    assert isinstance(loaded, TinyPruned) and loaded.spec == small.spec
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    r20 = build_model("resnet20", width=0.25)  # ResNets still go to their family
    assert family_of(r20) is resnet.FAMILY and isinstance(compress(r20, {}), PrunedResNet)


def test_registration_and_lookup_errors(with_tiny, tmp_path):
    with pytest.raises(ValueError, match="already registered"):
        register_family(TINY)
    clash = ModelFamily(**{**TINY.__dict__, "name": "other"})
    with pytest.raises(ValueError, match=r"model names \['tiny-mlp'\]"):
        register_family(clash)
    with pytest.raises(ValueError, match="spec format"):
        register_family(ModelFamily(**{**TINY.__dict__, "name": "other", "models": {}}))
    with pytest.raises(ValueError, match="ModelFamily"):
        register_family("tiny")
    with pytest.raises(ValueError, match=r"no model family accepts this Linear \(resnet: .*"
                                         r"; tiny: not a TinyMLP"):
        family_of(tnn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown model 'tiny-cnn'"):
        build_model("tiny-cnn")
    with pytest.raises(ValueError, match="save_pruned expects a compressed network"):
        save_pruned(build_model("tiny-mlp"), tmp_path / "x.pt")
    torch.save({"spec": {"format": "nope/1"}, "state_dict": {}}, tmp_path / "y.pt")
    with pytest.raises(ValueError, match="unknown pruned-model format 'nope/1'"):
        load_pruned(tmp_path / "y.pt")
