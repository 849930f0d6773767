"""LightningModules that train and evaluate ensembles."""

from .base import EnsembleModule
from .classifier import EnsembleClassifier, format_report
from .regressor import EnsembleRegressor

__all__ = ["EnsembleModule", "EnsembleClassifier", "EnsembleRegressor", "format_report"]
