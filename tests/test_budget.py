"""Budgeted selection in the torch layer (nn.budget): budgets parse, candidate widths, and the
cost terms handed to the OR layer are exact -- at any widths, the sum of the MAC and parameter
terms equals what nn.count_macs / nn.count_params count on the compressed network."""

import random

import pytest
import torch

from nn import build_model, compress, count_macs, count_params, layer_macs, prunable_structures
from nn.budget import (Budget, candidate_widths, carriers, count_terms, tensor_costs, total,
                       widths_to_masks)

SIZE = (3, 8, 8)


@pytest.mark.parametrize("text,want", [
    ("macs=0.4", ("macs", 0.4, "fraction")), ("params=1", ("params", 1.0, "fraction")),
    ("latency=0.5", ("latency", 0.5, "fraction")), (" latency = 12ms ", ("latency", 12.0, "ms")),
])
def test_budget_parses(text, want):
    b = Budget.parse(text)
    assert (b.kind, b.value, b.unit) == want
    assert Budget.parse(str(b)) == b


@pytest.mark.parametrize("text,word", [
    ("flops=0.5", "kind"), ("macs=0", "macs"), ("macs=1.5", "macs"), ("macs=12ms", "latency"),
    ("latency", "KIND=VALUE"), ("macs=abc", "KIND=VALUE"), ("latency=-1ms", "budget"),
    ("macs=nan", "macs"),
])
def test_bad_budgets_name_the_problem(text, word):
    with pytest.raises(ValueError, match=word):
        Budget.parse(text)


def test_candidate_widths():
    assert candidate_widths(16, 1) == list(range(1, 17))
    assert candidate_widths(16, 8) == [8, 16]
    assert candidate_widths(20, 8, removable=True) == [0, 8, 16, 20]
    assert candidate_widths(5, 8) == [5]


def _masks_with_widths(fams, widths, rng):
    masks = {}
    for f in fams:
        keep = torch.zeros(f.size, dtype=torch.bool)
        keep[torch.tensor(rng.sample(range(f.size), widths[f.name]), dtype=torch.long)] = True
        masks[f.name] = keep
    return masks


@pytest.mark.parametrize("name,kinds,blocks", [
    ("resnet20", ("filter",), False), ("resnet20", ("filter",), True),
    ("resnet20", ("filter", "stream"), False), ("resnet20", ("filter", "stream"), True),
    ("resnet18", ("filter", "stream"), True), ("resnet50", ("filter",), True),
])
def test_cost_terms_are_exact_at_any_widths(name, kinds, blocks):
    torch.manual_seed(0)
    model = build_model(name, 10, 3, 0.25, "B").eval()
    structures = prunable_structures(model, SIZE)
    fams = [f for f in structures if f.kind in kinds]
    sizes = {f.name: f.size for f in fams}
    bc = carriers(structures, set(sizes)) if blocks else {}
    tensors = tensor_costs(model, structures, layer_macs(model, SIZE))
    terms = {k: count_terms(tensors, k, sizes, bc) for k in ("macs", "params")}
    assert total(terms["macs"], sizes) == count_macs(model, SIZE)
    assert total(terms["params"], sizes) == count_params(model)
    rng = random.Random(1)
    for _ in range(6):
        widths = {n: rng.randint(1, s) for n, s in sizes.items()}
        for c in bc.values():
            if rng.random() < 0.4:
                widths[c] = 0
        keep = {n: max(w, 1) for n, w in widths.items()}
        masks = _masks_with_widths(fams, keep, rng)
        masks.update({b: torch.tensor([widths[c] > 0]) for b, c in bc.items()})
        small = compress(model, masks)
        assert total(terms["macs"], sizes, widths) == pytest.approx(count_macs(small, SIZE),
                                                                     rel=1e-12)
        assert total(terms["params"], sizes, widths) == pytest.approx(count_params(small),
                                                                      rel=1e-12)


def test_three_way_coupling_is_refused():
    """A Bottleneck's conv2 sits between two pruned families; with its block removable (carried
    by conv1) and streams pruned, conv3 would couple conv2's family, the stream and the block."""
    model = build_model("resnet50", 10, 3, 0.25)
    structures = prunable_structures(model, SIZE)
    fams = [f for f in structures if f.kind in ("filter", "stream")]
    sizes = {f.name: f.size for f in fams}
    tensors = tensor_costs(model, structures, layer_macs(model, SIZE))
    with pytest.raises(ValueError, match="three pruned families"):
        count_terms(tensors, "macs", sizes, carriers(structures, set(sizes)))


def test_widths_to_masks_keeps_the_best_scored():
    model = build_model("resnet20", 10, 3, 0.25)
    structures = prunable_structures(model, SIZE)
    fams = [f for f in structures if f.kind == "filter"]
    bc = carriers(structures, {f.name for f in fams})
    scores = {f.name: torch.arange(f.size, dtype=torch.float64) for f in fams}
    widths = {f.name: 2 for f in fams}
    widths[bc["block.layer1.1"]] = 0
    masks = widths_to_masks(fams, scores, widths, bc)
    f = fams[0]
    assert masks[f.name].tolist() == [False] * (f.size - 2) + [True, True]
    assert not masks["block.layer1.1"][0] and masks["block.layer1.2"][0]
