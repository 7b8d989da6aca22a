"""mipprune's torch layer: ResNets and their prunable structures, surgery, the SPR
regularizer, the pruning methods and the pipeline that runs them, data loading and the
training loop.

The package is named ``nn`` (the repository's layout); beside PyTorch import it under another
name, ``import nn as mp`` with ``from torch import nn as tnn``.  It imports torch and
:mod:`mipprune.penalty` (the one closed-form formula) only -- never pyomo or a solver, so it
works on machines without them.  Extension points: :mod:`nn.methods` (pruning methods),
:mod:`nn.models` (model families), :mod:`nn.cost` (what a structure costs).
"""

from nn.data import DATASETS, DataBundle, TensorLoader, load_dataset, make_loader
from nn.training import TrainConfig, TrainResult, distributed_env, lr_at, train, unwrap
from nn.complexity import analytic_macs, count_macs, count_params, layer_macs, measure_latency
from nn.cost import CostConfig
from nn.models import (MODELS, Family, Piece, PrunedResNet, ResNet, apply_masks, apply_masks_,
                       build_model, check_masks, compress, full_masks, group_weights,
                       load_pruned, prunable_structures, save_pruned)
from nn.regularizer import SPRConfig, SPRRegularizer, bigm_penalty, spr_penalty
from nn.methods import METHODS, get_method
from nn.methods.variational import GatedResNet, VariationalOptions
from nn.config import RunConfig
from nn.pipeline import run_pipeline

__all__ = [
    "MODELS", "ResNet", "build_model",
    "Piece", "Family", "prunable_structures", "group_weights", "full_masks",
    "check_masks", "apply_masks", "apply_masks_", "compress",
    "PrunedResNet", "save_pruned", "load_pruned",
    "count_params", "count_macs", "analytic_macs", "layer_macs", "measure_latency",
    "CostConfig", "spr_penalty", "bigm_penalty", "SPRConfig", "SPRRegularizer",
    "DATASETS", "DataBundle", "TensorLoader", "load_dataset", "make_loader",
    "TrainConfig", "TrainResult", "train", "lr_at", "distributed_env", "unwrap",
    "METHODS", "get_method", "RunConfig", "run_pipeline", "GatedResNet", "VariationalOptions",
]
