"""Algorithms on top of the maths core and the layer adapters: reduction, row matching, extraction."""

from ._extract import DEFAULT_TOL, REDUCE_TOL, ExtractionResult, extend_to_group, extract, transformed_rows
from ._match import RowMatch, match_rows
from ._reduce import LayerReduction, reduce_to_submodel

__all__ = [
    "DEFAULT_TOL", "REDUCE_TOL", "ExtractionResult", "LayerReduction", "RowMatch", "extend_to_group", "extract",
    "match_rows", "reduce_to_submodel", "transformed_rows",
]
