"""Exact extraction for token models mixing self-attention and dense layers (THEORY sections 2 and 3).

The sweep of :mod:`layerwise.algorithms._extract`, with one more kind of layer. For a generator acting on tokens by
the permutation ``p`` and on features by ``M``, the augmented input ``[z; e_t]`` of a layer transforms by
``Mhat = [[M, o 1^T], [0, Pi]]`` (``o``: the input action's offset, ``Pi``: ``p`` on the position columns; the
adjunction moves the token permutation into the positional encodings). An attention layer is equivariant exactly
when there are a head permutation ``pi`` and matrices ``G_h`` with

- ``Mhat^T B_h Mhat = B_{pi(h)}`` for the score forms (``pi`` by linear assignment on their distances), and
- ``V_h Mhat = G_h V_{pi(h)}`` for the value maps modulo constants (``G_h`` by least squares),

and its latent action is then ``(k z)_h = G_h z_{pi(h)} + offset_h``: a :class:`~layerwise.hidden.HeadAction`.
Queries and keys keep an internal ``GL(d_head)`` freedom (``Q_h -> A Q_h``, ``K_h -> A^{-T} K_h``) that no function
sees; it is reported, never solved for.

Canonical choice: with ``S_h`` the group average of ``G^T G`` over the blocks landing on head ``h``, the change of
basis ``z_h -> S_h^{1/2} z_h`` makes every per-head map orthogonal; the group average of the offsets is a fixed point
of the affine action, and translating by it (value bias into output bias) makes the action linear. Dense layers get
the core's canonical factors (sigmoid layers keep their parameterization).
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .._errors import LayerwiseError
from .._numeric import at_least_tiny
from ..group import MAX_GROUP_ORDER, FiniteGroup, token_group
from ..hidden import HeadAction, LatentAction
from ..layers import AttentionBlock, DenseBlock, TokenNet, parse_tokens
from ..layers._attention import drop_query_terms
from ..layers._dense import check_device
from ..nn import PositionalEncoding, SelfAttention
from ._extract import (
    DEFAULT_TOL,
    ExtractionResult,
    canonical_factors,
    extend_to_group,
    output_residual,
    transformed_rows,
)
from ._match import match_rows
from ._reduce import duplicate_units


def _relative(err: torch.Tensor, ref: torch.Tensor, floor: float) -> torch.Tensor:
    return err / ref.clamp_min(max(floor, 1e-300))


def identify_heads(blk: AttentionBlock, mhat: torch.Tensor, tokens: torch.Tensor | None) -> HeadAction:
    """The head permutation and per-head maps with ``heads(g x) = k heads(x)`` for the augmented input action
    ``mhat`` (see the module docstring); the residuals are stored on the returned action."""
    b = blk.scores()
    moved = drop_query_terms(mhat.T @ b @ mhat, blk.d)
    nb = b.flatten(1).norm(dim=1)
    nm = moved.flatten(1).norm(dim=1)
    floor = 1e-3 * float(torch.cat([nb, nm]).max())
    dist = (moved[:, None] - b[None]).flatten(2).norm(dim=2)
    cost = _relative(dist, torch.maximum(nm[:, None], nb[None, :]), floor)
    rows, cols = linear_sum_assignment(cost.numpy())
    perm = torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)
    score_res = cost[torch.arange(blk.num_heads), perm]

    v, const = blk.values()
    y = v @ mhat
    shift = y[..., blk.d:].mean(-1)  # the input action's offset reaches the values as a constant
    y[..., blk.d:] -= shift[..., None]
    src = v[perm]
    # G_h = argmin |G src_h - y_h|: least squares on the transposed system src_h^T G^T = y_h^T
    g = torch.linalg.lstsq(src.transpose(1, 2), y.transpose(1, 2)).solution.transpose(1, 2)
    err = (g @ src - y).flatten(1).norm(dim=1)
    ny = y.flatten(1).norm(dim=1)
    # per head, no floor shared across heads: a head's value scale is a hidden symmetry (values x c, output / c)
    value_res = _relative(err, torch.maximum(ny, src.flatten(1).norm(dim=1)), 0.0)
    # on the actual latent (constants included): z'_h = G_h (z_{pi(h)} - c_{pi(h)}) + shift_h + c_h
    offset = shift + const - (g @ const[perm][..., None])[..., 0]
    return HeadAction(perm, g, offset.reshape(-1), tokens, score_res, value_res)


def _dense_step(blk: DenseBlock, mat: torch.Tensor, off: torch.Tensor, tol: float, scales: str):
    m = match_rows(blk.aug, transformed_rows(blk.aug, mat, off), scales, tol)
    mult, shift = blk.family.latent(m.scale)
    return LatentAction(m.perm, mult, shift), m.worst


def _position_action(net: TokenNet, tok: np.ndarray, t: int) -> torch.Tensor:
    """``Pi`` on the position columns: ``Pi e_{p(t)} = e_t``, which is the token matrix itself
    (``tok[t, p(t)] = 1``)."""
    if not net.has_pe or t == 0:
        return torch.eye(net.positions, dtype=torch.float64)
    return torch.as_tensor(tok.copy())


def _sweep(net: TokenNet, group: FiniteGroup, t: int, tol: float, canonical: bool):
    actions: list[dict] = [{} for _ in net.blocks]
    residuals: list[dict[str, float]] = [{} for _ in net.blocks]
    output: dict[str, float] = {}
    for name in group.names:
        h = group.generator_index(name)
        rho = torch.as_tensor(group.rho_in[h])
        tok, mat = rho[:t, :t], rho[t:, t:]
        tokens = torch.as_tensor(np.argmax(tok.numpy(), axis=1)) if t else None
        pi = _position_action(net, tok.numpy(), t)
        off = torch.zeros(mat.shape[0], dtype=torch.float64)
        for i, blk in enumerate(net.blocks):
            if isinstance(blk, DenseBlock):
                scales = blk.family.canonical_scales if canonical else blk.family.scales
                act, worst = _dense_step(blk, mat, off, tol, scales)
                mat, off = act.matrix.to(torch.float64), act.offset64
            else:
                n = mat.shape[0]
                mhat = torch.zeros(n + net.positions, n + net.positions, dtype=torch.float64)
                mhat[:n, :n] = mat
                mhat[:n, n:] = off[:, None]
                mhat[n:, n:] = pi
                act = identify_heads(blk, mhat, tokens)
                worst = float(torch.cat([act.score_residual, act.value_residual]).max())
                mat, off = act.matrix, act.offset
            actions[i][name] = act
            residuals[i][name] = worst
        output[name] = output_residual(net.out, mat, torch.as_tensor(group.rho_out[h])[t:, t:], off)
    return actions, residuals, output


def _outgoing(net: TokenNet, i: int) -> torch.Tensor:
    """``(consumers, width)``: every weight that reads the latent of block ``i`` (next block's input columns)."""
    nxt = net.blocks[i + 1] if i + 1 < len(net.blocks) else None
    if nxt is None:
        return net.out[:, :-1]
    if isinstance(nxt, AttentionBlock):
        return torch.cat([nxt.q, nxt.k, nxt.v], 1)[..., :nxt.d].reshape(-1, nxt.d)
    return nxt.aug[:, :-1]


def _notes(net: TokenNet, tol: float) -> list[str]:
    """What makes a token model non-identifiable, found on its invariants (nothing is reduced away)."""
    notes = []
    for i, blk in enumerate(net.blocks):
        if isinstance(blk, DenseBlock):
            w = blk.aug.double()
            cols = _outgoing(net, i).double().norm(dim=0)
            dead = torch.nonzero(cols <= tol * at_least_tiny(cols.max())).flatten().tolist()
            rows = w[:, :-1].norm(dim=1)
            const = torch.nonzero(rows <= tol * at_least_tiny(w.norm(dim=1).max())).flatten().tolist()
            dups, _, _ = duplicate_units(w, torch.ones(w.shape[0], dtype=torch.bool), blk.family.scales, tol)
            for label, units in (("dead (no outgoing weight)", dead), ("constant (no incoming weight)", const),
                                 ("duplicated", dups.tolist())):
                if units:
                    shown = f"{units[:8]}{' ...' if len(units) > 8 else ''}"
                    notes.append(f"layer {i + 1} ({blk.family.name}): units {shown} are {label}; the layer is not "
                                 "identifiable (token models are not reduced)")
            continue
        v, _ = blk.values()
        for h in range(blk.num_heads):
            sv = torch.linalg.svdvals(v[h])
            if sv.numel() and sv[-1] <= 10 * tol * max(float(sv[0]), 1e-300):
                notes.append(f"layer {i + 1}, head {h}: value map has rank below d_head={blk.head_dim} "
                             f"(singular values {sv[-1]:.2g} / {sv[0]:.2g}); its value space is not identifiable")
        b = blk.scores().flatten(1)
        scale = float(b.norm(dim=1).max())
        for h1 in range(blk.num_heads):
            for h2 in range(h1 + 1, blk.num_heads):
                if float((b[h1] - b[h2]).norm()) <= tol * max(scale, 1e-300):
                    notes.append(f"layer {i + 1}: heads {h1} and {h2} have the same score form; they act as one "
                                 "head and their split is not identifiable")
    return notes


def _has_consumer(mods: list[nn.Module], start: int) -> bool:
    """Whether a Linear or attention layer reads the latent after module ``start`` (a model may end with an
    activation: its output is then fixed by the output action, and no hidden symmetry may change it)."""
    return any(isinstance(m, (nn.Linear, SelfAttention)) for m in mods[start + 1:])


def _consumer_scale(mods: list[nn.Module], start: int, mult: torch.Tensor) -> None:
    """The latent after module ``start`` is multiplied by ``mult``: divide the columns of the next layer that
    reads it (scaling positional encodings met on the way, which add in the same space)."""
    for mod in mods[start + 1:]:
        if isinstance(mod, PositionalEncoding):
            mod.weight.mul_(mult.to(mod.weight.dtype))
        elif isinstance(mod, nn.Linear):
            mod.weight.div_(mult.to(mod.weight.dtype))
            return
        elif isinstance(mod, SelfAttention):
            mod.attn.in_proj_weight.div_(mult.to(mod.attn.in_proj_weight.dtype))
            return


def _orthogonalize(mha: nn.MultiheadAttention, acts: list[HeadAction]) -> None:
    """Change each head's value basis by ``S_h^{1/2}`` and translate by the offsets' group average (see the module
    docstring); the function is unchanged."""
    h, dv = acts[0].num_heads, acts[0].head_dim
    blocks = torch.zeros(h, dv, dv, dtype=torch.float64)
    for a in acts:
        blocks.index_add_(0, a.perm, a.mats.transpose(1, 2) @ a.mats)  # (K^T K) block perm[j] is G_j^T G_j
    blocks /= len(acts)
    evals, evecs = torch.linalg.eigh(blocks)
    root = evecs @ torch.diag_embed(evals.sqrt()) @ evecs.transpose(1, 2)
    inv_root = evecs @ torch.diag_embed(evals.rsqrt()) @ evecs.transpose(1, 2)
    center = torch.stack([a.offset for a in acts]).mean(0).reshape(h, dv)
    emb = mha.embed_dim
    dt = mha.in_proj_weight.dtype
    wv = mha.in_proj_weight[2 * emb:].detach().to(torch.float64).reshape(h, dv, -1)
    o = mha.out_proj.weight.detach().to(torch.float64)
    if mha.in_proj_bias is None or mha.out_proj.bias is None:
        center = torch.zeros_like(center)  # no bias to translate with
    mha.in_proj_weight[2 * emb:] = (root @ wv).reshape(emb, -1).to(dt)
    if mha.in_proj_bias is not None:
        bv = mha.in_proj_bias[2 * emb:].detach().to(torch.float64).reshape(h, dv)
        mha.in_proj_bias[2 * emb:] = (root @ (bv - center)[..., None])[..., 0].reshape(-1).to(dt)
    if mha.out_proj.bias is not None:
        mha.out_proj.bias += (o @ center.reshape(-1)).to(dt)
    new_o = (o.reshape(-1, h, dv).permute(1, 0, 2) @ inv_root).permute(1, 0, 2).reshape(o.shape)
    mha.out_proj.weight.copy_(new_o.to(dt))


def _canonical_model(model: nn.Sequential, net: TokenNet, group: FiniteGroup, group_latent: list) -> nn.Sequential:
    out = copy.deepcopy(model)
    flat = _flat_modules(out)
    with torch.no_grad():
        for blk, acts in zip(net.blocks, group_latent):
            if isinstance(blk, AttentionBlock):
                _orthogonalize(flat[blk.index].attn, acts)
                continue
            lin = flat[blk.index]
            if not _has_consumer(flat, blk.act_index):
                continue
            for factor in canonical_factors(blk.family, acts):
                mult, shift = blk.family.latent(factor)
                if torch.any(shift != 0):
                    break  # sigmoid flips change the next bias as well; keep this layer as it is
                lin.weight.mul_(factor.to(lin.weight.dtype)[:, None])
                if lin.bias is not None:
                    lin.bias.mul_(factor.to(lin.bias.dtype))
                _consumer_scale(flat, blk.act_index, mult)
    return out


def _flat_modules(model: nn.Sequential) -> list[nn.Module]:
    from ..layers._dense import _flatten

    return [m for _, m in _flatten(model, "")]


def _describe(blk) -> str:
    if isinstance(blk, AttentionBlock):
        return (f"attention ({blk.num_heads} heads x {blk.head_dim}; queries and keys identified up to their internal "
                f"GL({blk.q.shape[1]}) per head)")
    return blk.family.name


def extract_tokens(model: nn.Module, generators: dict, *, tol: float | None = None,
                   max_group_order: int = MAX_GROUP_ORDER, canonical: bool = True,
                   device: torch.device | str | None = None) -> ExtractionResult:
    """:func:`layerwise.extract` for token models (``(N, T, d)`` inputs with attention layers).

    Actions may be :class:`~layerwise.group.TokenAction` (token permutation and feature action) or plain feature
    actions. ``latent[i][name]`` is a :class:`~layerwise.hidden.HeadAction` for an attention layer and a
    :class:`~layerwise.hidden.LatentAction` on every token's features for a dense layer; tokens are permuted as the
    input's. Dead or duplicated units and heads are not removed (a width change would not fit
    ``nn.MultiheadAttention``): what makes the model non-identifiable is listed in ``notes``.
    """
    if device is not None and check_device(device).type != "cpu":
        raise LayerwiseError(f"device: token models are analysed on the CPU (their matrices are small), got {device!r}")
    if isinstance(model, nn.Module) and any(p.device.type not in ("cpu", "meta") for p in model.parameters()):
        raise LayerwiseError("model: token models are analysed on the CPU; move the model there with model.cpu()")
    net = parse_tokens(model)
    if tol is None:
        tol = DEFAULT_TOL[net.dtype]
    if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise LayerwiseError(f"tol: expected a positive finite number, got {tol!r}")
    group, t = token_group(generators, net.positions if net.has_pe else None, net.in_features, net.out_features,
                           max_order=max_group_order)
    notes = _notes(net, tol)
    found = _certify(net, group, t, tol, canonical=False)
    out_model = None
    if canonical and found.failure is None:
        moved_model = _canonical_model(model, net, group, found.group_latent)
        moved_net = parse_tokens(moved_model)
        second = _certify(moved_net, group, t, tol, canonical=True)
        if second.failure is None:  # keep the canonical point only if it certifies (float32 rounding could break it)
            found, out_model, net = second, moved_model, moved_net
        else:
            notes = notes + [f"the canonical parameters did not certify ({second.failure}); the model is returned "
                             "in its own parameterization"]
    if out_model is None:
        out_model = copy.deepcopy(model)
    worst = max([r for res in found.residuals for r in res.values()] + list(found.output.values())
                + ([] if found.failed is not None else [found.hom]))
    return ExtractionResult(
        equivariant=found.failure is None, residual=float(worst), model=out_model, latent=found.actions,
        tol=float(tol), group=group, group_latent=found.group_latent, layer_residuals=found.residuals,
        output_residual=found.output, homomorphism_residual=float(found.hom), first_failure=found.failure,
        failed_layer=found.failed, reduction=[], families=[_describe(b) for b in net.blocks],
        identifiable=[True for _ in net.blocks], notes=notes,
    )


class _Certificate(NamedTuple):
    actions: list
    group_latent: list
    residuals: list
    output: dict
    hom: float
    failure: str | None
    failed: int | None


def _certify(net: TokenNet, group: FiniteGroup, t: int, tol: float, canonical: bool) -> _Certificate:
    """One sweep per generator, extended to the whole group, with where it first fails."""
    actions, residuals, output = _sweep(net, group, t, tol, canonical=canonical)
    extended = [extend_to_group(group, acts) for acts in actions]
    group_latent = [e[0] for e in extended]
    hom = max((e[1] for e in extended), default=0.0)
    failure, failed = _first_failure(net, residuals, output, hom, tol)
    return _Certificate(actions, group_latent, residuals, output, hom, failure, failed)


def _first_failure(net: TokenNet, residuals, output, hom: float, tol: float):
    for i, res in enumerate(residuals):
        for name, r in res.items():
            if not r <= tol:
                return (f"hidden layer {i + 1} ({_describe(net.blocks[i])}, module index {net.blocks[i].index}), "
                        f"generator {name!r}: residual {r:.3g} > tolerance {tol:g}"), i
    for name, r in output.items():
        if not r <= tol:
            return f"output layer, generator {name!r}: residual {r:.3g} > tolerance {tol:g}", len(residuals)
    if not hom <= tol:
        return f"group relations do not hold on the latent actions (residual {hom:.3g})", None
    return None, None
