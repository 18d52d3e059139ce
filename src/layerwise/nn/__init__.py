"""Modules that layerwise adds to ``torch.nn``: the polynomial activation and the self-attention pieces the
attention analysis understands."""

from ._attention import PositionalEncoding, SelfAttention
from ._power import Power

__all__ = ["PositionalEncoding", "Power", "SelfAttention"]
