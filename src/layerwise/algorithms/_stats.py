"""Streaming activation statistics: correlation matrices accumulated batch by batch, sums in float64 (a batch of
float32 activations is centred and multiplied in float32).

Alignment by activations needs, per hidden layer and group element, the correlation of every unit of
``f(h x)`` with every unit of ``f(x)``. Holding all activations of a large data set costs ``N x width`` per layer
and element; accumulating sums and cross-products over batches costs ``width^2`` and one pass over the data.
"""

from __future__ import annotations

import numpy as np
import torch


class CorrelationStats:
    """Running sums for ``corr(y_j, x_i)`` over samples (rows of ``x`` and ``y`` are the same samples).

    Sums are taken of values shifted by the first batch's means, which keeps the variance formula
    ``E[v^2] - E[v]^2`` free of cancellation for units with a large mean; a unit whose variance is below ``1e-20``
    of its mean square is constant and gets correlation 0.
    """

    def __init__(self) -> None:
        self.n = 0
        self.cx = self.cy = None
        self.sx = self.sy = self.sxx = self.syy = self.sxy = None

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # float32 activations stay float32 up to the sums (the batch's products and squares, 3x faster than in
        # float64; of centred values, so their relative error is that of float32 sums, about 1e-6); every sum over
        # batches is float64. Any fixed shift gives exact moments, so the first batch's means are kept as they are.
        work = torch.float32 if x.dtype == torch.float32 and y.dtype == torch.float32 else torch.float64
        x = x.to(work)
        y = y.to(work)
        if self.cx is None:
            self.cx, self.cy = x.mean(0), y.mean(0)
            self.sx = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.sy = torch.zeros(y.shape[1], dtype=torch.float64, device=x.device)
            self.sxx, self.syy = torch.zeros_like(self.sx), torch.zeros_like(self.sy)
            self.sxy = torch.zeros(y.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        x = x - self.cx
        y = y - self.cy
        self.sx += x.sum(0, dtype=torch.float64)
        self.sy += y.sum(0, dtype=torch.float64)
        self.sxx += (x * x).sum(0, dtype=torch.float64)
        self.syy += (y * y).sum(0, dtype=torch.float64)
        self.sxy += (y.T @ x).double()
        self.n += x.shape[0]

    def correlation(self) -> np.ndarray:
        """``S[j, i] = corr(y_j, x_i)``; 0 where a unit is constant on the data."""
        n = max(self.n, 1)
        mx, my = self.sx / n, self.sy / n
        cov = self.sxy / n - my[:, None] * mx[None, :]
        varx = (self.sxx / n - mx * mx).clamp_min(0)
        vary = (self.syy / n - my * my).clamp_min(0)
        constx = varx <= 1e-20 * ((self.cx.double() + mx) ** 2 + 1e-300)
        consty = vary <= 1e-20 * ((self.cy.double() + my) ** 2 + 1e-300)
        sx = torch.where(constx, torch.inf, varx.sqrt())
        sy = torch.where(consty, torch.inf, vary.sqrt())
        return (cov / (sy[:, None] * sx[None, :])).nan_to_num(0.0).clamp(-1, 1).cpu().numpy()
