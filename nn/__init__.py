"""mipprune's torch layer: the SPR regularizer, the variational Bernoulli gates, ResNets, prunable
structures, surgery, complexity, data loading and the training loop.

The training function is ``nn.train.train``: it is not re-exported here because a package
attribute named ``train`` would shadow the submodule (``import nn.train as t`` would then give
the function).  Imports torch and :mod:`mipprune.spr` (the one closed-form formula) only -- never pyomo or a
solver, so it works on machines without them.
"""

from nn.data import DATASETS, DataBundle, TensorLoader, load_dataset, make_loader
from nn.train import TrainConfig, TrainResult, distributed_env, lr_at, unwrap
from nn.pipeline import PipelineConfig, run_pipeline
from nn.complexity import analytic_macs, count_macs, count_params, layer_macs, measure_latency
from nn.models import MODELS, ResNet, build_model
from nn.pruned import PrunedResNet, load_pruned, save_pruned
from nn.regularizer import SPRConfig, SPRRegularizer, bigm_penalty, spr_penalty
from nn.structures import Family, Piece, full_masks, group_weights, prunable_structures
from nn.surgery import apply_masks, apply_masks_, check_masks, compress
from nn.gates import GatedResNet
from nn.variational import VariationalConfig

__all__ = [
    "MODELS", "ResNet", "build_model",
    "Piece", "Family", "prunable_structures", "group_weights", "full_masks",
    "check_masks", "apply_masks", "apply_masks_", "compress",
    "PrunedResNet", "save_pruned", "load_pruned",
    "count_params", "count_macs", "analytic_macs", "layer_macs", "measure_latency",
    "spr_penalty", "bigm_penalty", "SPRConfig", "SPRRegularizer",
    "DATASETS", "DataBundle", "TensorLoader", "load_dataset", "make_loader",
    "TrainConfig", "TrainResult", "lr_at", "distributed_env", "unwrap",
    "PipelineConfig", "run_pipeline", "GatedResNet", "VariationalConfig",
]
