"""Offline datamodules: nothing here downloads."""

from .digits import DigitsDataModule, load_digits_tensors
from .mnist1d import MNIST1DDataModule, generate_mnist1d
from .toy_regression import ToyRegressionDataModule

__all__ = [
    "DigitsDataModule",
    "MNIST1DDataModule",
    "ToyRegressionDataModule",
    "load_digits_tensors",
    "generate_mnist1d",
]
