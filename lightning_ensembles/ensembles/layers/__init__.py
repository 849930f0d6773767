"""Ensemble layers, apart from the methods that convert a backbone to use them.

* :mod:`.packed`: Packed-Ensembles layers (members side by side on the channel axis).
* :mod:`.batch`: BatchEnsemble layers (shared weight, per-member rank-1 factors, per-member BatchNorm and heads).
* :mod:`.lora`: LoRA-Ensemble layers (frozen shared layer, per-member low-rank factors and heads).
"""

from .batch import BatchEnsembleLayer, PerMemberBatchNorm, PerMemberLinear
from .lora import BatchedLinear, BatchedLoRALinear, BatchedLoRAMultiheadAttention, LoRAFactors
from .packed import GroupedLinear, PackedAttention, PackedLayerNorm, PackedMultiheadAttention

__all__ = [
    "GroupedLinear",
    "PackedLayerNorm",
    "PackedMultiheadAttention",
    "PackedAttention",
    "BatchEnsembleLayer",
    "PerMemberBatchNorm",
    "PerMemberLinear",
    "LoRAFactors",
    "BatchedLoRALinear",
    "BatchedLinear",
    "BatchedLoRAMultiheadAttention",
]
