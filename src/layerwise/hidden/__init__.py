"""Hidden symmetry groups of layers and the monomial actions they contain."""

from ._families import SCALE_GROUPS, ActivationFamily, family_of
from ._heads import HeadAction
from ._monomial import LatentAction

__all__ = ["SCALE_GROUPS", "ActivationFamily", "HeadAction", "LatentAction", "family_of"]
