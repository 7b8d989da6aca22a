"""A planted problem for the variational pruner (DESIGN §6): recover a teacher's units and blocks.

**The problem** (:mod:`nn.methods.variational.planted`, where it is built): a teacher ResNet
with 3 + 2 live units and one removed block, its structures made to matter by label-invariant
rescalings and confident inputs.  Every planted unit and block matters here: removing any one
flips >= 10% of the labels (checked).

**Student.**  The teacher's weights with *distractors* at the standard initialisation in the
unused units and in the removed block.  Distractors are ``SIGNAL`` times quieter
than the teacher's structures yet change 5-25% of the labels (checked), so the pruner has to
find and remove them; magnitudes are not what is tested -- the pruner's decision is (gradient
estimator, automatic per-structure cost, death at theta = 0, rounding, BN recalibration,
surgery).  Embedding the teacher (instead of training from scratch) makes the structure
identifiable: from scratch a student may spread the function over other units or blocks.

**Estimator.**  The default, ``batched`` (4 unit and 2 block gates flipped a step on a ghost batch
of 12 samples, averaged per gate, death only on evidence at theta = 0): 10 of 10 seeds
(``python -m benchmarks.planted_seeds``).  ``flip`` (exact conditional differences on the
step's batch) recovers it 10 of 10 times; straight-through 2 of 10 (at xi = 1 a confidently
wrong student lowers its CE by shrinking any branch, so dCE/dxi even has the wrong sign early
on), REINFORCE 0 of 3 (one needed gate sampled off moves every other gate's estimate by ~2
nats).  A per-sample variant of ``batched`` (one gate flipped per sample) kept distractors: BN
couples the samples, so it measures a removal without the renormalisation.

**Asserted** after ``train()`` with :func:`nn.methods.variational.hooks`, ``round_()`` and
``recalibrate_bn``: exactly the planted units are kept in each kept block, exactly the planted
blocks are kept, and the compressed network (:func:`nn.models.compress`) agrees with the
teacher on >= 97% of held-out inputs.

**Parameters.**  ``lam = 0.5``: a planted unit is worth 0.1-1.5 nats of cross-entropy and a
planted block 1.2-2.7 nats (exact flip differences on the initial student), against marginal
prices ``lam * dR/dtheta`` of 0.02 (unit) and 0.25 (block, with ``gamma = 0.5``); distractors
are worth +-0.05.  ``theta_lr = 0.02`` (preconditioned: every gate moves at ``lr * lam`` per step
under the cost alone, so a worthless distractor dies within ~100 of the 384 steps);
``warmup_epochs = 0`` and a small weight ``lr = 0.001``: the embedded teacher is already
trained, and a larger weight lr lets SGD co-opt the distractors before they are priced.
"""

import copy

import pytest
import torch

from nn.methods.variational.planted import (BLOCKS, CLASSES, N_TEST, REMOVED_BLOCKS, calibrate,
                                            labels, make_student, make_teacher, run, sample)
from nn.methods.variational import VariationalOptions
from nn.models import apply_masks_

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_planted_problem_is_well_posed():
    """Guard for the test below: every planted structure matters, distractors matter too."""
    for seed in (0, 1, 2):
        teacher, masks, threshold = make_teacher(seed)
        x, y = sample(teacher, threshold, N_TEST, torch.Generator().manual_seed(seed + 7))
        freq = torch.bincount(y, minlength=CLASSES).float() / len(y)
        assert freq.min() > 0.15, freq
        for name, keep in masks.items():
            if name.startswith("block."):
                continue
            for j in torch.nonzero(keep).flatten().tolist():
                drop = dict(masks, **{name: keep.clone()})
                drop[name][j] = False
                flips = (labels(apply_masks_(copy.deepcopy(teacher), drop), x) != y).float()
                assert flips.mean() >= 0.1, (seed, name, j, flips.mean())
        for b in BLOCKS:
            if b in REMOVED_BLOCKS:
                continue
            drop = dict(masks, **{f"block.{b}": torch.zeros(1, dtype=torch.bool)})
            flips = (labels(apply_masks_(copy.deepcopy(teacher), drop), x) != y).float()
            assert flips.mean() >= 0.1, (seed, b, flips.mean())
        student = calibrate(make_student(teacher, masks, seed), x)
        agree = (labels(student, x) == y).float().mean()
        assert 0.5 < agree < 0.97, (seed, agree)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruner_recovers_the_planted_units_and_blocks(seed):
    cfg = VariationalOptions()
    assert (cfg.estimator, cfg.flip_units, cfg.flip_blocks, cfg.flip_samples) == \
        ("batched", 4, 2, 8)  # the default
    res = run(seed)
    assert res["recovered"], res
    assert res["agreement"] >= 0.97 and res["wrong"] == []
