"""Elements of an attention layer's hidden symmetry group ``GL(d_head)^h x| S_h``, acting on the heads' values.

The latent space of a self-attention layer is the concatenation ``z = (z_1, ..., z_h)`` of its heads' value outputs
(each ``d_head`` wide, before the output projection). A latent action permutes heads and maps each head's value
space by an invertible matrix: ``(k z)_h = mats[h] @ z_{perm[h]} + offset_h``. The token axis is permuted as the
group element permutes the input tokens (``tokens``).
"""

from __future__ import annotations

import torch

from ._monomial import cycle_counts, permutation_cycles


class HeadAction:
    """``(k z)_h = mats[h] @ z[perm[h]] + offset[h]`` on the concatenated head outputs.

    Attributes:
        perm: ``(h,)`` long tensor; head ``j`` of the result reads head ``perm[j]`` of the input.
        mats: ``(h, d_head, d_head)`` float64 per-head matrices (orthogonal after the canonical choice).
        offset: ``(h * d_head,)`` float64 offsets: value biases that are not group-averaged and affine input actions
            give them; zero after the canonical choice.
        tokens: ``(T,)`` token permutation of the group element, or ``None`` (tokens stay in place).
        score_residual: ``(h,)`` relative residual of each head's score-form match (``M^T B_h M = B_{perm[h]}``).
        value_residual: ``(h,)`` relative residual of each head's value map (least squares).
    """

    def __init__(self, perm: torch.Tensor, mats: torch.Tensor, offset: torch.Tensor | None = None,
                 tokens: torch.Tensor | None = None, score_residual: torch.Tensor | None = None,
                 value_residual: torch.Tensor | None = None) -> None:
        self.perm = perm.to(torch.long)
        self.mats = mats.to(torch.float64)
        h, dv = self.mats.shape[0], self.mats.shape[-1]
        self.offset = torch.zeros(h * dv, dtype=torch.float64) if offset is None else offset.to(torch.float64)
        self.tokens = tokens
        zeros = torch.zeros(h, dtype=torch.float64)
        self.score_residual = zeros if score_residual is None else score_residual
        self.value_residual = zeros if value_residual is None else value_residual

    @property
    def num_heads(self) -> int:
        return int(self.perm.numel())

    @property
    def head_dim(self) -> int:
        return int(self.mats.shape[-1])

    @property
    def size(self) -> int:
        return self.num_heads * self.head_dim

    def identity_like(self) -> HeadAction:
        h, dv = self.num_heads, self.head_dim
        eye = torch.eye(dv, dtype=torch.float64).expand(h, dv, dv).clone()
        tokens = None if self.tokens is None else torch.arange(self.tokens.numel())
        return HeadAction(torch.arange(h), eye, tokens=tokens)

    @property
    def matrix(self) -> torch.Tensor:
        """Dense ``(h d_head, h d_head)`` float64 matrix of the linear part (block ``(j, perm[j])`` is
        ``mats[j]``)."""
        h, dv = self.num_heads, self.head_dim
        out = torch.zeros(h, dv, h, dv, dtype=torch.float64)
        out[torch.arange(h), :, self.perm, :] = self.mats
        return out.reshape(h * dv, h * dv)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """Apply to the feature axis of ``z`` (``(..., h * d_head)``); tokens are not moved."""
        return z @ self.matrix.to(z.dtype).T + self.offset.to(z.dtype)

    def __matmul__(self, other: HeadAction) -> HeadAction:
        """Composition ``self o other`` (apply ``other`` first)."""
        perm = other.perm[self.perm]
        mats = self.mats @ other.mats[self.perm]
        off_other = other.offset.reshape(self.num_heads, self.head_dim)[self.perm]
        offset = (self.mats @ off_other[..., None])[..., 0].reshape(-1) + self.offset
        tokens = None
        if self.tokens is not None and other.tokens is not None:
            tokens = other.tokens[self.tokens]
        return HeadAction(perm, mats, offset, tokens)

    def distance(self, other: HeadAction) -> float:
        """Largest entry difference of the per-head matrices (relative to ``max(|entry|, 1)``) and offsets;
        inf when the head permutations differ."""
        if not torch.equal(self.perm, other.perm):
            return float("inf")
        den = torch.maximum(torch.maximum(self.mats.abs(), other.mats.abs()), torch.ones_like(self.mats))
        dm = float(((self.mats - other.mats).abs() / den).max()) if self.size else 0.0
        do = float((self.offset - other.offset).abs().max()) if self.size else 0.0
        return max(dm, do)

    def character(self) -> float:
        """Trace of the linear part: the sum of the traces of fixed heads' matrices."""
        fixed = self.perm == torch.arange(self.num_heads)
        return float(self.mats[fixed].diagonal(dim1=-2, dim2=-1).sum())

    def cycles(self) -> list[list[int]]:
        """Cycles of the head permutation, as lists of head indices."""
        return permutation_cycles(self.perm.tolist())

    def cycle_type(self) -> list[int]:
        """Sorted cycle lengths of the head permutation (``[1, 1, 2]``: two fixed heads and a swapped pair)."""
        return sorted(len(c) for c in self.cycles())

    def orthogonality(self) -> float:
        """``max_h |mats[h]^T mats[h] - I|``: zero when every per-head map is orthogonal."""
        eye = torch.eye(self.head_dim, dtype=torch.float64)
        return float((self.mats.transpose(-1, -2) @ self.mats - eye).abs().max()) if self.size else 0.0

    def summary(self) -> str:
        """E.g. ``'heads: 2 fixed, 1 swapped pair; per-head maps orthogonal'``."""
        parts = cycle_counts(self.cycles())
        ortho = self.orthogonality()
        maps = "per-head maps orthogonal" if ortho < 1e-6 else f"per-head maps not orthogonal ({ortho:.2g})"
        traces = ", ".join(f"{float(self.mats[j].trace()):+.2g}" for c in self.cycles() if len(c) == 1
                           for j in c)
        return f"heads: {', '.join(parts)}; {maps}" + (f"; fixed-head traces {traces}" if traces else "")

    def __repr__(self) -> str:
        return f"HeadAction(h={self.num_heads}, d_head={self.head_dim}: {self.summary()})"
