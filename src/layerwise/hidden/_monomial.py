"""Monomial affine actions on a layer: ``z -> scale * z[perm] + offset``.

Every element of a dense layer's hidden symmetry group (permutation times per-unit factor, plus the sigmoid's
affine flip) is of this form, so latent actions are stored in O(n) and composed in O(n); ``.matrix`` builds the
dense ``n x n`` matrix only when asked.
"""

from __future__ import annotations

import torch


def permutation_cycles(perm: list[int]) -> list[list[int]]:
    """The cycles of a permutation given as ``perm[j]`` = the index position ``j`` reads, each from its smallest
    unvisited start."""
    seen = [False] * len(perm)
    out = []
    for start in range(len(perm)):
        if not seen[start]:
            cyc, j = [], start
            while not seen[j]:
                seen[j] = True
                cyc.append(j)
                j = perm[j]
            out.append(cyc)
    return out


def cycle_counts(cycles: list[list[int]]) -> list[str]:
    """``['3 fixed', '2 swapped pairs', '1 4-cycles']``: how many cycles of each length."""
    lengths: dict[int, int] = {}
    for c in cycles:
        lengths[len(c)] = lengths.get(len(c), 0) + 1
    parts = [f"{lengths.pop(1, 0)} fixed"]
    for length in sorted(lengths):
        parts.append(f"{lengths[length]} {'swapped pairs' if length == 2 else f'{length}-cycles'}")
    return parts


class LatentAction:
    """A monomial affine action ``z -> z @ matrix.T + offset`` with ``matrix[j, perm[j]] = scale[j]``.

    Attributes:
        perm: ``(n,)`` long tensor; unit ``j`` of the result reads unit ``perm[j]`` of the input.
        scale: ``(n,)`` float64 tensor of multipliers.
        matrix: dense ``(n, n)`` tensor in :attr:`dtype`.
        offset: ``(n,)`` tensor in :attr:`dtype` (zeros unless affine).
    """

    def __init__(
        self, perm: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.perm = perm.to(torch.long)
        self.scale = scale.to(torch.float64)
        self._offset = torch.zeros_like(self.scale) if offset is None else offset.to(torch.float64)
        self.dtype = dtype

    @classmethod
    def identity(cls, n: int, dtype: torch.dtype = torch.float64, device=None) -> LatentAction:
        return cls(torch.arange(n, device=device), torch.ones(n, dtype=torch.float64, device=device), dtype=dtype)

    def identity_like(self) -> LatentAction:
        return LatentAction.identity(self.size, self.dtype, self.perm.device)

    @property
    def size(self) -> int:
        return int(self.perm.numel())

    @property
    def matrix(self) -> torch.Tensor:
        n = self.size
        mat = torch.zeros(n, n, dtype=torch.float64, device=self.perm.device)
        mat[torch.arange(n, device=self.perm.device), self.perm] = self.scale
        return mat.to(self.dtype)

    @property
    def offset(self) -> torch.Tensor:
        return self._offset.to(self.dtype)

    @property
    def offset64(self) -> torch.Tensor:
        return self._offset

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """Apply to ``z`` of shape ``(..., n)``."""
        s = self.scale.to(device=z.device, dtype=z.dtype)
        return z[..., self.perm.to(z.device)] * s + self._offset.to(device=z.device, dtype=z.dtype)

    def __matmul__(self, other: LatentAction) -> LatentAction:
        """Composition ``self o other`` (apply ``other`` first)."""
        perm = other.perm[self.perm]
        scale = self.scale * other.scale[self.perm]
        offset = self.scale * other._offset[self.perm] + self._offset
        return LatentAction(perm, scale, offset, self.dtype)

    def inverse(self) -> LatentAction:
        """The inverse affine map: ``z = (y - offset)[inv] / scale[inv]`` with ``inv = argsort(perm)``."""
        inv = torch.argsort(self.perm)
        scale = 1.0 / self.scale[inv]
        return LatentAction(inv, scale, -self._offset[inv] * scale, self.dtype)

    def apply_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of ``K x`` for the linear part ``K`` of this action (``x`` of shape ``(n, d)``)."""
        return x[self.perm.to(x.device)] * self.scale.to(device=x.device, dtype=x.dtype)[:, None]

    def distance(self, other: LatentAction) -> float:
        """Largest relative difference of the two affine maps' multipliers and offsets (inf when the permutations
        differ); multipliers are compared relative to ``max(|a|, |b|, 1)``."""
        if not torch.equal(self.perm, other.perm):
            return float("inf")
        den = torch.maximum(torch.maximum(self.scale.abs(), other.scale.abs()), torch.ones_like(self.scale))
        ds = ((self.scale - other.scale).abs() / den).max().item() if self.size else 0.0
        do = (self._offset - other._offset).abs().max().item() if self.size else 0.0
        return max(ds, do)

    def character(self) -> float:
        """Trace of the linear part."""
        fixed = self.perm == torch.arange(self.size, device=self.perm.device)
        return float(self.scale[fixed].sum())

    def is_permutation(self) -> bool:
        return bool(torch.all(self.scale == 1) and torch.all(self._offset == 0))

    def cycles(self) -> list[list[int]]:
        """The cycles of the permutation part, as lists of unit indices."""
        return permutation_cycles(self.perm.tolist())

    def summary(self) -> str:
        """Cycle type and signs, e.g. ``'12 fixed (2 negated), 10 swapped pairs'``."""
        cyc = self.cycles()
        fixed = [c[0] for c in cyc if len(c) == 1]
        neg_fixed = sum(1 for j in fixed if self.scale[j] < 0)
        parts = cycle_counts(cyc)
        if neg_fixed:
            parts[0] += f" ({neg_fixed} negated)"
        neg = int((self.scale < 0).sum())
        if neg:
            parts.append(f"{neg} sign flips")
        nontrivial_scale = int(((self.scale.abs() - 1).abs() > 1e-12).sum())
        if nontrivial_scale:
            parts.append(f"{nontrivial_scale} rescaled")
        flips = int((self._offset != 0).sum())
        if flips:
            parts.append(f"{flips} affine flips 1-z")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"LatentAction(n={self.size}: {self.summary()})"
