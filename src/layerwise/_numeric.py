"""Small numerical guards shared by the algorithms."""

from __future__ import annotations

import torch


def at_least_tiny(x: torch.Tensor) -> torch.Tensor:
    """``x`` with entries below the dtype's smallest normal number raised to it: a divisor that is never zero.
    (``clamp_min(1e-300)`` is no guard in float32, where 1e-300 rounds to 0.)"""
    return x.clamp_min(torch.finfo(x.dtype).tiny)
