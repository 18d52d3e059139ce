"""layerwise: the hidden symmetry structure of equivariant neural networks, made computable.

Public API: :func:`extract`, :func:`equivariance_error`, :class:`LayerwiseError`, :mod:`layerwise.nn`, the oracle
functions (:func:`layer_equivariance_errors`, :func:`assert_layerwise_equivariant`, :func:`homomorphism_residual`,
:func:`character`) and :mod:`layerwise.testing` (planted networks).
"""

from . import nn
from ._errors import LayerwiseError
from ._oracle import (
    assert_layerwise_equivariant,
    character,
    equivariance_error,
    hidden_outputs,
    homomorphism_residual,
    layer_equivariance_errors,
)
from .algorithms import (
    DEFAULT_TOL,
    ExtractionResult,
    HeadMetric,
    LayerAlignment,
    LayerMetric,
    align,
    extract,
    head_metrics,
    layerwise_metrics,
    naive_average,
    symmetrize,
)
from .group import FiniteGroup, TokenAction
from .hidden import HeadAction, LatentAction

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TOL", "ExtractionResult", "FiniteGroup", "HeadAction", "LatentAction", "LayerAlignment", "LayerMetric",
    "LayerwiseError",
    "align", "assert_layerwise_equivariant", "character", "equivariance_error", "extract", "hidden_outputs",
    "homomorphism_residual", "layer_equivariance_errors", "layerwise_metrics", "naive_average", "nn",
    "symmetrize", "TokenAction", "HeadMetric", "head_metrics",
]
