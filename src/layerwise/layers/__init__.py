"""Thin adapters from PyTorch modules to the blocks the algorithms work on."""

from ._attention import AttentionBlock, TokenNet, is_token_model, parse_tokens
from ._dense import PASSTHROUGH, DenseBlock, DenseNet, parse_dense

__all__ = [
    "PASSTHROUGH", "AttentionBlock", "DenseBlock", "DenseNet", "TokenNet", "is_token_model", "parse_dense",
    "parse_tokens",
]
