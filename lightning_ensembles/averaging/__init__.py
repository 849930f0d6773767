"""Weight averaging per member: SWA, EMA, SWAG, model soups, combinatorial aggregation, snapshots."""

from .base import WeightAverager
from .bn import has_batchnorm, update_bn
from .combinatorial import CombinatorialEnsemble, DCAConsistency, split_by_depth
from .ema import EMA
from .soups import GreedySoup, accuracy_score, greedy_soup, load_ingredient, member_ingredients, uniform_soup
from .swa import SWA
from .swag import SWAG, SWAGEnsemble

__all__ = [
    "EMA",
    "SWA",
    "SWAG",
    "CombinatorialEnsemble",
    "DCAConsistency",
    "GreedySoup",
    "SWAGEnsemble",
    "WeightAverager",
    "accuracy_score",
    "greedy_soup",
    "has_batchnorm",
    "load_ingredient",
    "member_ingredients",
    "split_by_depth",
    "uniform_soup",
    "update_bn",
]
