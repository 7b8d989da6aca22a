"""Model families (DESIGN §9): the registry and the family-generic entry points.

A family owns its builder, its prunable structures, its physical removal and saved spec, and
one forward shared by its dense, masked, gated and pruned forms.  The next family is one new
subpackage (like :mod:`nn.models.resnet`) plus one :func:`register_family` line below; the
functions re-exported here (:func:`build_model`, :func:`prunable_structures`,
:func:`compress`, :func:`load_pruned`, ...) find a module's family with :func:`family_of` and
hand the call over.
"""

from nn.models.structures import KINDS, Family, Piece, check_masks, full_masks, group_weights
from nn.models.registry import (FAMILIES, MODELS, ModelFamily, apply_masks, apply_masks_,
                                build_families, build_model, compress, family_of, load_pruned,
                                prunable_structures, register_family, save_pruned)
from nn.models import resnet
from nn.models.resnet import (SPEC_FORMAT, BasicBlock, Bottleneck, PadShortcut, PrunedResNet,
                              ResNet)

register_family(resnet.FAMILY)

__all__ = [
    "FAMILIES", "MODELS", "ModelFamily", "register_family", "family_of", "build_model",
    "KINDS", "Piece", "Family", "group_weights", "full_masks", "check_masks",
    "build_families", "prunable_structures", "apply_masks", "apply_masks_", "compress",
    "save_pruned", "load_pruned",
    "ResNet", "BasicBlock", "Bottleneck", "PadShortcut", "PrunedResNet", "SPEC_FORMAT",
]
