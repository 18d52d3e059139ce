"""Thin adapters from PyTorch modules to the blocks the algorithms work on."""

from ._dense import PASSTHROUGH, DenseBlock, DenseNet, parse_dense

__all__ = ["PASSTHROUGH", "DenseBlock", "DenseNet", "parse_dense"]
