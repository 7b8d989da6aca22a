"""The variational Bernoulli unit + block pruner: the gated network (:mod:`.gated`), its exact
expected cost (:mod:`.cost`), the gradient estimators (:mod:`.estimators`) and the method that
trains and selects with them (:mod:`.method`)."""

from nn.methods.variational.estimators import ESTIMATORS
from nn.methods.variational.gated import GatedResNet
from nn.methods.variational.method import Variational, VariationalOptions, hooks, recalibrate_bn

__all__ = ["ESTIMATORS", "GatedResNet", "Variational", "VariationalOptions", "hooks",
           "recalibrate_bn"]
