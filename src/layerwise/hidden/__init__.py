"""Hidden symmetry groups of layers and the monomial actions they contain."""

from ._families import SCALE_GROUPS, ActivationFamily, family_of
from ._monomial import LatentAction

__all__ = ["SCALE_GROUPS", "ActivationFamily", "LatentAction", "family_of"]
