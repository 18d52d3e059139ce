"""Algorithms on top of the maths core and the layer adapters: reduction, row matching, extraction."""

from ._align import LayerAlignment, consistent_actions, involution_matching
from ._extract import DEFAULT_TOL, REDUCE_TOL, ExtractionResult, extend_to_group, extract, transformed_rows
from ._match import RowMatch, match_rows
from ._metrics import LayerMetric, layerwise_metrics
from ._metrics_attention import HeadMetric, head_metrics
from ._reduce import LayerReduction, reduce_to_submodel
from ._symmetrize import align, naive_average, symmetrize

__all__ = [
    "HeadMetric", "head_metrics",
    "LayerAlignment", "LayerMetric", "align", "consistent_actions", "involution_matching", "layerwise_metrics",
    "naive_average", "symmetrize",
    "DEFAULT_TOL", "REDUCE_TOL", "ExtractionResult", "LayerReduction", "RowMatch", "extend_to_group", "extract",
    "match_rows", "reduce_to_submodel", "transformed_rows",
]
