"""Self-attention as a one-argument module, and an additive learned positional encoding.

``torch.nn.MultiheadAttention`` takes ``(query, key, value)`` and returns a pair, so it cannot sit in an
``nn.Sequential``. :class:`SelfAttention` wraps one (batch first, queries = keys = values = the input tokens, no
mask) and is what :func:`layerwise.extract` reads as an attention layer. Your own attention model maps onto it as
follows: per head ``h``, queries ``x Wq_h^T + bq_h``, keys ``x Wk_h^T + bk_h``, values ``x Wv_h^T + bv_h``
(rows ``h*d_head:(h+1)*d_head`` of ``attn.in_proj_weight``'s three thirds), attention
``softmax(q k^T / sqrt(d_head))`` over keys, and the output ``sum_h A_h V_h Wo_h^T + bo`` (columns
``h*d_head:(h+1)*d_head`` of ``attn.out_proj.weight``). Copy your matrices into those slices; a residual connection,
LayerNorm, masks or key/value biases are not part of this layer (the theorem does not cover them).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._errors import LayerwiseError

__all__ = ["PositionalEncoding", "SelfAttention"]


class SelfAttention(nn.Module):
    """Multi-head self-attention on ``(N, T, d)`` tokens, usable inside ``nn.Sequential``.

    Its hidden symmetry group is ``GL(d_head)^h x| S_h`` on the heads' value outputs (heads can be permuted, each
    head's value space changed by an invertible map), times the internal ``GL(d_head)`` of each head's queries and
    keys, which only enter through the score form ``Wq_h^T Wk_h``.

    Args:
        embed_dim: token feature size ``d`` (input and output), ``num_heads * d_head``.
        num_heads: number of heads.
        bias: input and output projection biases.
        dropout: attention dropout (training mode only).

    >>> import torch, layerwise
    >>> layer = layerwise.nn.SelfAttention(8, 2)
    >>> layer(torch.randn(3, 5, 8)).shape
    torch.Size([3, 5, 8])
    >>> layer.attention_maps(torch.randn(3, 5, 8)).shape
    torch.Size([3, 2, 5, 5])
    """

    def __init__(self, embed_dim: int, num_heads: int, *, bias: bool = True, dropout: float = 0.0,
                 dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise LayerwiseError(f"SelfAttention({name}): expected a positive integer, got {val!r}")
        if embed_dim % num_heads:
            raise LayerwiseError(
                f"SelfAttention: embed_dim={embed_dim} is not divisible by num_heads={num_heads}"
            )
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, bias=bias, batch_first=True,
                                          dtype=dtype, device=device)

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> SelfAttention:
        """Wrap an existing ``nn.MultiheadAttention`` (shared, not copied) after checking it is plain
        self-attention: batch first, equal query/key/value sizes, no ``add_bias_kv`` and no ``add_zero_attn``."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise LayerwiseError(f"mha: expected nn.MultiheadAttention, got {type(mha).__name__}")
        check_mha(mha, "mha")
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.attn = mha
        return out

    @property
    def num_heads(self) -> int:
        return int(self.attn.num_heads)

    @property
    def head_dim(self) -> int:
        return int(self.attn.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.attn.embed_dim:
            raise LayerwiseError(f"SelfAttention: expected tokens of shape (N, T, {self.attn.embed_dim}), got "
                                 f"{tuple(x.shape)}")
        return self.attn(x, x, x, need_weights=False)[0]

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, t, _ = x.shape
        w, b = self.attn.in_proj_weight, self.attn.in_proj_bias
        qkv = x @ w.T + (b if b is not None else 0)
        q, k, v = qkv.reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (N, h, T, dh)
        return q, k, v

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, h, T, T)``: each head's attention weights, rows are queries (sum to 1 over keys)."""
        q, k, _ = self._qkv(x)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, h * d_head)``: the heads' value outputs before the output projection (the latent space on
        which the head permutation and per-head maps act)."""
        q, k, v = self._qkv(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        z = att @ v  # (N, h, T, dh)
        return z.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)


def check_mha(mha: nn.MultiheadAttention, where: str) -> None:
    """Refuse ``nn.MultiheadAttention`` settings outside plain batch-first self-attention."""
    if not mha.batch_first:
        raise LayerwiseError(f"{where}: nn.MultiheadAttention must have batch_first=True")
    if not mha._qkv_same_embed_dim:
        raise LayerwiseError(f"{where}: kdim/vdim differ from embed_dim; only self-attention is supported")
    if mha.bias_k is not None or mha.bias_v is not None:
        raise LayerwiseError(f"{where}: add_bias_kv=True is not supported")
    if mha.add_zero_attn:
        raise LayerwiseError(f"{where}: add_zero_attn=True is not supported")


class PositionalEncoding(nn.Module):
    """Additive learned positional encoding: ``x -> x + weight`` for ``(N, T, d)`` tokens, ``weight`` of shape
    ``(T, d)``. A group that permutes tokens acts on it through the adjunction (THEORY section 2).

    >>> import torch, layerwise
    >>> layerwise.nn.PositionalEncoding(4, 3)(torch.zeros(2, 4, 3)).shape
    torch.Size([2, 4, 3])
    """

    def __init__(self, num_tokens: int, dim: int, *, std: float = 0.02, dtype: torch.dtype | None = None,
                 device=None) -> None:
        super().__init__()
        for name, val in (("num_tokens", num_tokens), ("dim", dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise LayerwiseError(f"PositionalEncoding({name}): expected a positive integer, got {val!r}")
        self.weight = nn.Parameter(torch.randn(num_tokens, dim, dtype=dtype, device=device) * std)

    @property
    def num_tokens(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or tuple(x.shape[1:]) != tuple(self.weight.shape):
            raise LayerwiseError(
                f"PositionalEncoding: expected tokens of shape (N, {self.weight.shape[0]}, {self.weight.shape[1]}), "
                f"got {tuple(x.shape)}"
            )
        return x + self.weight

    def extra_repr(self) -> str:
        return f"num_tokens={self.weight.shape[0]}, dim={self.weight.shape[1]}"
