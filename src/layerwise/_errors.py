"""The library's single exception type."""

from __future__ import annotations


class LayerwiseError(ValueError):
    """Bad input to a layerwise function.

    The message names the offending argument or module and the measured figure, e.g.
    ``generators['flip'][0]: permutation of size 16 does not match the model's 64 input features``.
    """
