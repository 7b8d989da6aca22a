"""The ResNet family: the builder (:mod:`.model`), the one forward that the dense, masked, gated
and pruned networks share (:mod:`.forward`), the channel plumbing and prunable structures
(:mod:`.structures`), masking and physical removal (:mod:`.surgery`), and the compressed
network rebuilt from its saved spec (:mod:`.pruned`).  :data:`FAMILY` registers it."""

from nn.models.registry import ModelFamily
from nn.models.resnet import forward
from nn.models.resnet.model import (MODELS, BasicBlock, Bottleneck, PadShortcut, ResNet,
                                    build_model)
from nn.models.resnet.pruned import (SPEC_FORMAT, IndexShortcut, PrunedBlock, PrunedResNet,
                                     check_spec, from_spec)
from nn.models.resnet.structures import BlockInfo, Layout, arch_of, build_families, layout
from nn.models.resnet.surgery import apply_masks, apply_masks_, compress

__all__ = ["FAMILY", "forward", "MODELS", "BasicBlock", "Bottleneck", "PadShortcut", "ResNet",
           "build_model", "SPEC_FORMAT", "IndexShortcut", "PrunedBlock", "PrunedResNet",
           "check_spec", "from_spec", "BlockInfo", "Layout", "arch_of", "build_families", "layout",
           "apply_masks", "apply_masks_", "compress"]

FAMILY = ModelFamily(name="resnet", models=MODELS, build=build_model, check=layout,
                     build_families=build_families, apply_masks_=apply_masks_,
                     compress=compress, spec_format=SPEC_FORMAT, pruned_type=PrunedResNet,
                     from_spec=from_spec)
