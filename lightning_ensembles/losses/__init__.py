"""Training objectives for ensembles: diversity terms and repulsion, as plain functions and Regularizers.

Every term takes member outputs with the member axis first, ``(M, B, ...)``. ``Regularizer`` values
are added as ``loss += weight * value`` by ``EnsembleClassifier`` / ``EnsembleRegressor`` (YAML:
``regularizers: [{class_path: lightning_ensembles.losses.JensenShannon, init_args: {weight: 0.1}}]``).
Sign convention: for every term here a **positive weight increases diversity**, a negative one
decreases it; the default weight is 0.
"""

from . import diversity, evidential, forde, kernels, repulsion
from .base import Regularizer
from .diversity import (
    JensenGap,
    JensenGapLoss,
    JensenShannon,
    NegativeCorrelation,
    PairwiseKL,
    SoftDisagreement,
    ambiguity,
    jensen_gap,
    jensen_shannon,
    pairwise_kl,
    soft_disagreement,
)
from .evidential import (
    EvidentialClassificationLoss,
    EvidentialRegressionLoss,
    annealing_coefficient,
    dirichlet_kl_uniform,
    dirichlet_uncertainty,
    evidential_classification_loss,
    evidential_regression_loss,
    nig_constrain,
    nig_nll,
    nig_regularizer,
    nig_split,
    nig_uncertainty,
)
from .forde import InputGradientRepulsion, forde_repulsion, member_input_gradients
from .kernels import log_kde, median_heuristic, squared_distances
from .repulsion import FunctionSpaceRepulsion, WeightSpaceRepulsion, member_parameter_matrix

# The package exports every public name of its modules (their ``__all__``), and the Regularizer base.
__all__ = [
    "Regularizer",
    *diversity.__all__,
    *repulsion.__all__,
    *forde.__all__,
    *kernels.__all__,
    *evidential.__all__,
]
