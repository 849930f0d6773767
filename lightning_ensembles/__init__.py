"""lightning-ensembles: uncertainty-aware ensembles for PyTorch Lightning."""
from .ensembles.base import Ensemble
from .ensembles.deep import DeepEnsemble
