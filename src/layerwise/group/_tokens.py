"""Actions on token sequences ``(N, T, d)``: a permutation of the tokens times an action on each token's features.

A mirrored image cut into patches permutes its patches (the token axis) and mirrors each patch (the feature axis).
The group is enumerated on the block-diagonal matrices ``diag(P, M)``, which compose exactly as the pairs do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import LayerwiseError
from ._actions import _to_numpy, action_matrix
from ._finite import MAX_GROUP_ORDER, FiniteGroup, generator_pairs


@dataclass(frozen=True)
class TokenAction:
    """``g.x = (x[:, tokens])`` with ``features`` applied on the last axis, for ``x`` of shape ``(N, T, d)``.

    Attributes:
        tokens: a permutation of ``0..T-1`` (token ``t`` of the result is token ``tokens[t]`` of the input), or
            ``None`` (tokens stay in place).
        features: a feature action as everywhere else (permutation, square matrix or ``None``).

    >>> import torch
    >>> from layerwise import TokenAction
    >>> x = torch.arange(6.0).reshape(1, 3, 2)
    >>> TokenAction(tokens=[2, 1, 0], features=[1, 0]).apply(x)
    tensor([[[5., 4.],
             [3., 2.],
             [1., 0.]]])
    """

    tokens: Any = None
    features: Any = None

    def token_matrix(self, num_tokens: int, where: str) -> np.ndarray:
        if self.tokens is None:
            return np.eye(num_tokens)
        arr = _to_numpy(self.tokens, where)
        if arr.ndim != 1:
            raise LayerwiseError(f"{where}: tokens must be a 1-D permutation, got shape {arr.shape}")
        return action_matrix(arr, num_tokens, where)

    def num_tokens(self, where: str) -> int | None:
        if self.tokens is None:
            return None
        arr = _to_numpy(self.tokens, where)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise LayerwiseError(f"{where}: tokens must be a 1-D integer permutation, got shape {arr.shape} and "
                                 f"dtype {arr.dtype}")
        return int(arr.shape[0])

    def apply(self, x):
        """Apply to a torch tensor of shape ``(N, T, d)``."""
        import torch

        from .._oracle import _feature_action

        if x.ndim != 3:
            raise LayerwiseError(f"TokenAction: expected tokens of shape (N, T, d), got {tuple(x.shape)}")
        if self.tokens is not None:
            self.num_tokens("TokenAction.tokens")
            p = torch.as_tensor(np.asarray(_to_numpy(self.tokens, "tokens")), dtype=torch.long, device=x.device)
            if p.ndim != 1 or p.numel() != x.shape[1] or not torch.equal(p.sort().values,
                                                                           torch.arange(x.shape[1], device=x.device)):
                raise LayerwiseError(f"TokenAction.tokens: not a permutation of the {x.shape[1]} tokens")
            x = x[:, p]
        if self.features is None:
            return x
        mat = action_matrix(self.features, x.shape[-1], "TokenAction.features")
        return _feature_action(mat, x, "TokenAction.features")


def _as_token_action(action: Any) -> TokenAction:
    return action if isinstance(action, TokenAction) else TokenAction(None, action)


def token_group(generators: Any, num_tokens: int | None, in_dim: int, out_dim: int, *,
                max_order: int = MAX_GROUP_ORDER) -> tuple[FiniteGroup, int]:
    """Enumerate the group of token actions; returns it and the number of tokens ``T`` its matrices use.

    ``rho_in[h]`` is ``diag(P_h, M_h)`` of size ``T + in_dim`` (``T = 0`` when no generator permutes tokens and
    ``num_tokens`` is None), ``rho_out[h]`` likewise with the output feature action. Plain feature actions count as
    ``TokenAction(None, action)``.
    """
    pairs = [(name, _as_token_action(a), _as_token_action(b)) for name, a, b in generator_pairs(generators)]
    sizes = {a.num_tokens(f"generators[{name!r}]") for name, a, b in pairs} | {
        b.num_tokens(f"generators[{name!r}]") for name, a, b in pairs}
    sizes.discard(None)
    if num_tokens is not None:
        sizes.add(num_tokens)
    if len(sizes) > 1:
        raise LayerwiseError(f"generators: token permutations and the model disagree on the number of tokens "
                             f"({sorted(sizes)})")
    t = sizes.pop() if sizes else 0
    blocks = {}
    for name, a, b in pairs:
        mats = []
        for act, dim, side in ((a, in_dim, "input"), (b, out_dim, "output")):
            where = f"generators[{name!r}][{0 if side == 'input' else 1}] ({side} action)"
            tok = act.token_matrix(t, where + ".tokens")
            feat = action_matrix(act.features, dim, where + ".features")
            mats.append(np.block([[tok, np.zeros((t, dim))], [np.zeros((dim, t)), feat]]))
        if not np.array_equal(mats[0][:t, :t], mats[1][:t, :t]):
            raise LayerwiseError(
                f"generators[{name!r}]: the output's token permutation differs from the input's; attention and "
                "token-wise layers carry every token to the same position, so they must be equal"
            )
        blocks[name] = (mats[0], mats[1])
    return FiniteGroup.from_generators(blocks, t + in_dim, t + out_dim, max_order=max_order), t
