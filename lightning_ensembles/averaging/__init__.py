"""Weight averaging per member: SWA, EMA, SWAG, model soups, combinatorial aggregation, snapshots."""

from .base import WeightAverager
from .bn import has_batchnorm, update_bn
from .ema import EMA
from .swa import SWA
from .swag import SWAG, SWAGEnsemble

__all__ = ["EMA", "SWA", "SWAG", "SWAGEnsemble", "WeightAverager", "has_batchnorm", "update_bn"]
