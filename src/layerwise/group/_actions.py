"""Linear actions on a feature axis: permutations, matrices, or the trivial action.

An action is given by the user as
- a 1-D integer array ``p`` that is a permutation: ``g.x = x[..., p]``;
- a square matrix ``M``: ``g.x = x @ M.T`` (``M`` acts on the last axis);
- ``None``: the trivial action.

Everything here is numpy; torch tensors are accepted and converted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._errors import LayerwiseError


def _to_numpy(action: Any, where: str) -> np.ndarray:
    if hasattr(action, "detach") and hasattr(action, "cpu"):  # a torch tensor, without importing torch
        action = action.detach().cpu().numpy()
    try:
        arr = np.asarray(action)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise LayerwiseError(f"{where}: cannot read the action as an array ({exc})") from None
    if arr.dtype == object:
        raise LayerwiseError(f"{where}: the action is not a numeric array (dtype object)")
    return arr


def action_matrix(action: Any, dim: int, where: str) -> np.ndarray:
    """Return the float64 ``dim x dim`` matrix ``M`` of an action (``g.x = x @ M.T``).

    Raises LayerwiseError naming ``where`` for wrong sizes, non-permutations, non-finite or singular matrices.
    """
    if action is None:
        return np.eye(dim)
    arr = _to_numpy(action, where)
    if arr.ndim == 1:
        if arr.dtype.kind not in "iu":
            raise LayerwiseError(
                f"{where}: a 1-D action must be an integer permutation, got dtype {arr.dtype}"
            )
        if arr.shape[0] != dim:
            raise LayerwiseError(
                f"{where}: permutation of size {arr.shape[0]} does not match the layer's {dim} features"
            )
        if not np.array_equal(np.sort(arr), np.arange(dim)):
            missing = np.setdiff1d(np.arange(dim), arr).size
            raise LayerwiseError(
                f"{where}: the index tensor is not a permutation of 0..{dim - 1} ({missing} indices missing)"
            )
        mat = np.zeros((dim, dim))
        mat[np.arange(dim), arr] = 1.0  # (x @ M.T)[i] = x[p[i]]
        return mat
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise LayerwiseError(
            f"{where}: an action must be a permutation, a square matrix or None, got shape {arr.shape}"
        )
    if arr.shape[0] != dim:
        raise LayerwiseError(f"{where}: matrix of size {arr.shape[0]} does not match the layer's {dim} features")
    if arr.dtype.kind not in "iufb":
        raise LayerwiseError(f"{where}: the action matrix must be real, got dtype {arr.dtype}")
    mat = arr.astype(np.float64)
    if not np.all(np.isfinite(mat)):
        raise LayerwiseError(f"{where}: the action matrix has {int((~np.isfinite(mat)).sum())} NaN or infinite entries")
    if dim:
        sv = np.linalg.svd(mat, compute_uv=False)
        if sv[-1] <= 1e-10 * max(sv[0], 1e-300):
            raise LayerwiseError(
                f"{where}: the action matrix is not invertible "
                f"(smallest singular value {sv[-1]:.3g}, largest {sv[0]:.3g})"
            )
    return mat


def is_permutation_matrix(mat: np.ndarray) -> bool:
    """True when ``mat`` has exactly one 1 per row and column and zeros elsewhere."""
    return bool(
        np.all((mat == 0) | (mat == 1)) and np.all(mat.sum(0) == 1) and np.all(mat.sum(1) == 1)
    )
