"""The polynomial activation ``t -> t**m``."""

from __future__ import annotations

import torch
from torch import nn

from .._errors import LayerwiseError


class Power(nn.Module):
    """Polynomial activation ``t -> t**m`` (the activation of polynomial networks).

    Its hidden symmetry group is the monomial matrices: scaling a unit's incoming weights by
    any ``c != 0`` scales its output by ``c**m``.

    >>> import torch, layerwise
    >>> layerwise.nn.Power(3)(torch.tensor([2.0, -1.0]))
    tensor([ 8., -1.])
    """

    def __init__(self, m: int) -> None:
        super().__init__()
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise LayerwiseError(f"Power(m): m must be an integer >= 1, got {m!r}")
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x**self.m

    def extra_repr(self) -> str:
        return f"m={self.m}"
