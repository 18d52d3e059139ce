"""Maths core: finite groups from generators and their actions on feature axes (numpy only)."""

from ._actions import action_matrix, is_permutation_matrix
from ._finite import MAX_GROUP_ORDER, FiniteGroup, generator_pairs
from ._tokens import TokenAction, token_group

__all__ = ["MAX_GROUP_ORDER", "FiniteGroup", "action_matrix", "generator_pairs", "is_permutation_matrix",
           "TokenAction", "token_group"]
