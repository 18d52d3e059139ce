"""Adapter: an ``nn.Sequential`` on token sequences ``(N, T, d)`` mixing self-attention and token-wise dense layers.

Supported modules: :class:`layerwise.nn.SelfAttention`, :class:`layerwise.nn.PositionalEncoding`, ``nn.Linear``
(applied to every token), the activations of the dense core, ``nn.Identity`` and ``nn.Dropout``. Affine maps between
two latent spaces (Linear layers without an activation, positional encodings, an attention layer's output
projection) are folded into the next block, as the theorem's layers are.

Every block reads the previous latent ``z`` augmented with the token position, ``[z; e_t]`` (``e_t`` one-hot over
the ``T`` tokens when the model has a positional encoding, the constant ``1`` otherwise), so biases and positional
encodings are columns of one matrix and a token permutation acts on them by permuting columns:

- an attention block stores per head the maps ``q_h = Q_h [z; e_t]``, ``k_h = K_h [z; e_t]``, ``v_h = V_h [z; e_t]``
  (the ``1/sqrt(d_head)`` of the scores is folded into ``Q_h``); its latent is the heads' value outputs;
- a dense block is ``act(W z + b)`` as in :mod:`layerwise.layers._dense` (a positional encoding may only reach an
  attention layer, so its bias is the same for every token);
- ``out`` is the final affine map ``[A | b]``.

The identifiable invariants of a head (THEORY section 3) are its score form ``B_h = Q_h^T K_h`` with the query-only
terms removed (softmax over keys ignores them), and its value map ``V_h`` modulo a constant (rows of an attention
map sum to one, so a constant value passes to the output bias).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .._errors import LayerwiseError
from ..hidden import family_of
from ..nn import PositionalEncoding, SelfAttention
from ..nn._attention import check_mha
from ._dense import DenseBlock, _flatten

_SKIP = (nn.Identity, nn.Dropout, nn.AlphaDropout)


def is_token_model(model: nn.Module) -> bool:
    """True when the model contains attention or a positional encoding (the token adapter applies)."""
    if not isinstance(model, nn.Module):
        return False
    return any(isinstance(m, (SelfAttention, PositionalEncoding, nn.MultiheadAttention)) for m in model.modules())


def drop_query_terms(b: torch.Tensor, d: int) -> torch.Tensor:
    """Remove from bilinear forms ``b`` (``(..., d + T, d + T)``) the terms that depend on the query only.

    A key's augmented vector ``[z; e_t]`` has position part summing to one, so ``x_q^T F x_k`` with ``F = u 1^T``
    on the position columns is the same for every key; subtracting each row's mean over the position columns
    removes exactly that part."""
    out = b.clone()
    out[..., :, d:] -= out[..., :, d:].mean(-1, keepdim=True)
    return out


@dataclass
class AttentionBlock:
    """One self-attention layer as per-head maps of the augmented input ``[z; e_t]`` (float64)."""

    q: torch.Tensor  # (h, d_head, d + T), scaled by 1/sqrt(d_head)
    k: torch.Tensor  # (h, d_head, d + T)
    v: torch.Tensor  # (h, d_head, d + T)
    d: int  # width of the input latent z
    index: int  # module position of the SelfAttention

    @property
    def num_heads(self) -> int:
        return int(self.q.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.v.shape[1])

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    def scores(self) -> torch.Tensor:
        """``(h, d + T, d + T)`` identifiable score forms ``Q_h^T K_h`` without query-only terms."""
        return drop_query_terms(self.q.transpose(1, 2) @ self.k, self.d)

    def values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Value maps without their constant part, and that constant ``(h, d_head)``."""
        const = self.v[..., self.d:].mean(-1)
        v = self.v.clone()
        v[..., self.d:] -= const[..., None]
        return v, const


@dataclass
class TokenNet:
    """A token model as hidden blocks (dense or attention) and the output affine map ``out = [A | b]``."""

    blocks: list  # DenseBlock | AttentionBlock
    out: torch.Tensor
    positions: int  # T of the augmented input (1 without a positional encoding)
    has_pe: bool
    in_features: int
    dtype: torch.dtype
    modules: list[nn.Module] = field(repr=False)

    @property
    def out_features(self) -> int:
        return int(self.out.shape[0])


def _plain(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    w = mod.weight.detach().to(torch.float64)
    b = mod.bias.detach().to(torch.float64) if mod.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    return w, b


def parse_tokens(model: nn.Module) -> TokenNet:
    """Read a token ``nn.Sequential`` into a :class:`TokenNet`; LayerwiseError naming any unsupported module."""
    if not isinstance(model, nn.Sequential):
        raise LayerwiseError(f"model: expected an nn.Sequential, got {type(model).__name__}")
    mods = [m for _, m in _flatten(model, "")]
    params = list(model.parameters())
    if not params:
        raise LayerwiseError("model: has no parameters")
    dtype = params[0].dtype
    if dtype not in (torch.float32, torch.float64):
        raise LayerwiseError(f"model: expected float32 or float64 weights, got {dtype}")
    for name, p in model.named_parameters():
        if p.dtype != dtype:
            raise LayerwiseError(f"model: parameter {name} has dtype {p.dtype}, the first parameter {dtype}; "
                                 "convert the whole model to one dtype")
    if any(p.is_meta for p in params):
        raise LayerwiseError("model: has weights on the meta device (no values to analyse)")
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise LayerwiseError("model: has NaN or infinite weights")
    pes = [m for m in mods if isinstance(m, PositionalEncoding)]
    sizes = {m.num_tokens for m in pes}
    if len(sizes) > 1:
        raise LayerwiseError(f"model: positional encodings disagree on the number of tokens ({sorted(sizes)})")
    positions = sizes.pop() if sizes else 1

    in_features = None
    a: torch.Tensor | None = None  # pending affine map from the latent z to the current stream
    beta: torch.Tensor | None = None  # (stream, positions) offsets
    z_dim = None
    blocks: list = []
    last_linear = None
    live = False  # whether a positional encoding has been added since the last latent

    def start(dim: int) -> None:
        nonlocal a, beta, z_dim, in_features
        if in_features is None:
            in_features = dim
        z_dim = dim
        a = torch.eye(dim, dtype=torch.float64)
        beta = torch.zeros(dim, positions, dtype=torch.float64)

    for i, mod in enumerate(mods):
        where = f"model[{i}] ({type(mod).__name__})"
        if isinstance(mod, _SKIP):
            continue
        if isinstance(mod, nn.MultiheadAttention):
            raise LayerwiseError(f"{where}: wrap it as layerwise.nn.SelfAttention.from_module(mha) so that it "
                                 "takes one argument inside nn.Sequential")
        if isinstance(mod, nn.Linear):
            w, b = _plain(mod)
            if a is None:
                start(w.shape[1])
            if w.shape[1] != a.shape[0]:
                raise LayerwiseError(f"{where}: expects {w.shape[1]} features, gets {a.shape[0]}")
            a, beta = w @ a, w @ beta + b[:, None]
            last_linear = i
            continue
        if isinstance(mod, PositionalEncoding):
            e = mod.weight.detach().to(torch.float64)
            if a is None:
                start(e.shape[1])
            if e.shape[1] != a.shape[0]:
                raise LayerwiseError(f"{where}: has dim {e.shape[1]}, the stream has {a.shape[0]} features")
            beta = beta + e.T
            live = True
            continue
        if isinstance(mod, SelfAttention):
            check_mha(mod.attn, where)
            emb, h, dh = mod.attn.embed_dim, mod.num_heads, mod.head_dim
            if a is None:
                start(emb)
            if a.shape[0] != emb:
                raise LayerwiseError(f"{where}: embed_dim {emb}, the stream has {a.shape[0]} features")
            w_in = mod.attn.in_proj_weight.detach().to(torch.float64)
            b_in = (mod.attn.in_proj_bias.detach().to(torch.float64) if mod.attn.in_proj_bias is not None
                    else torch.zeros(3 * emb, dtype=torch.float64))
            aug = torch.cat([a, beta], 1)  # stream = aug @ [z; e_t]
            maps = w_in @ aug
            maps[:, z_dim:] += b_in[:, None]  # a bias is on every position column ([z; e_t] has one 1 there)
            maps = maps.reshape(3, h, dh, -1)
            blocks.append(AttentionBlock(maps[0] / math.sqrt(dh), maps[1].clone(), maps[2].clone(), z_dim, i))
            o, c = _plain(mod.attn.out_proj)
            z_dim = emb
            a, beta = o, c[:, None].expand(-1, positions).clone()
            last_linear = None
            live = False
            continue
        try:
            fam = family_of(mod, where)
        except LayerwiseError:
            raise LayerwiseError(
                f"{where}: unsupported module in a token model; supported: layerwise.nn.SelfAttention, "
                "layerwise.nn.PositionalEncoding, nn.Linear, pointwise activations, Identity, Dropout"
            ) from None
        if last_linear is None:
            raise LayerwiseError(f"{where}: an activation must follow an nn.Linear")
        if live:
            raise LayerwiseError(f"{where}: a PositionalEncoding reaches this activation; positional encodings must "
                                 "feed a SelfAttention through Linear layers only")
        aug = torch.cat([a, beta[:, :1]], 1)
        blocks.append(DenseBlock(aug, True, mod, fam, last_linear, i))
        start(a.shape[0])
        last_linear = None
    if a is None:
        raise LayerwiseError("model: no Linear or attention layer")
    if not any(isinstance(b, AttentionBlock) for b in blocks):
        raise LayerwiseError("model: a positional encoding without a SelfAttention layer is not supported")
    if live:
        raise LayerwiseError("model: a PositionalEncoding after the last attention layer reaches the output; it "
                             "must feed a SelfAttention")
    out = torch.cat([a, beta[:, :1]], 1)
    return TokenNet(blocks, out, positions, bool(pes), int(in_features), dtype, mods)
