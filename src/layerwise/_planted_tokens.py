"""Planted attention models: self-attention layers whose heads are equivariant under a known head action, hidden by
a random element of the attention layer's hidden symmetry group. Re-exported by :mod:`layerwise.testing`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ._errors import LayerwiseError
from .group import FiniteGroup, TokenAction, token_group
from .hidden import HeadAction
from .nn import PositionalEncoding, SelfAttention


def patch_generators(group: str, grid: int, channels: int = 1, out: str = "equivariant") -> dict:
    """Generators of ``"z2"`` (left-right flip), ``"z2v"`` (up-down flip) or ``"d4"`` on an image of size
    ``2 grid x 2 grid`` cut into ``grid x grid`` tokens of 2x2 patches, each token's features ``channel * 4 +
    corner`` (corners row-major). The flip permutes the tokens and mirrors every patch. With ``out="invariant"``
    the output features do not move (tokens still do); with ``"equivariant"`` they move like the input's.

    >>> gens = patch_generators("z2", 4, 2)
    >>> gens["hflip"][0].tokens[:4].tolist(), gens["hflip"][0].features.tolist()
    ([3, 2, 1, 0], [1, 0, 3, 2, 5, 4, 7, 6])
    """
    from .testing import hflip_permutation, rot90_permutation, vflip_permutation

    kinds = {"z2": ("hflip",), "z2v": ("vflip",), "d4": ("rot90", "hflip")}
    if group not in kinds:
        raise LayerwiseError(f"group: expected one of {sorted(kinds)}, got {group!r}")
    if out not in ("invariant", "equivariant"):
        raise LayerwiseError(f"out: expected 'invariant' or 'equivariant', got {out!r}")
    maker = {"hflip": hflip_permutation, "vflip": vflip_permutation, "rot90": rot90_permutation}
    gens = {}
    for name in kinds[group]:
        tokens = maker[name](grid)
        corners = maker[name](2)
        feats = torch.cat([corners + 4 * c for c in range(channels)])
        act_in = TokenAction(tokens, feats)
        gens[name] = (act_in, act_in if out == "equivariant" else TokenAction(tokens, None))
    return gens


@dataclass
class PlantedAttention:
    """The known structure of a planted attention model.

    Attributes:
        generators: the generators dict to pass to :func:`layerwise.extract`.
        group: the enumerated group (element order matches :attr:`ExtractionResult.group`).
        heads: the planted head action of every group element (before hiding).
        attention_layer: index of the attention layer among the hidden layers of the extraction result.
        head_order: ``head_order[j]`` is the planted head that hidden head ``j`` is.
    """

    generators: dict
    group: FiniteGroup
    heads: list[HeadAction]
    attention_layer: int
    head_order: torch.Tensor

    def cycle_types(self) -> dict[str, list[int]]:
        """Planted head-permutation cycle type of every generator."""
        return {name: self.heads[self.group.generator_index(name)].cycle_type() for name in self.group.names}

    def characters(self) -> np.ndarray:
        return np.array([a.character() for a in self.heads])


def _parity(group: FiniteGroup, name: str) -> np.ndarray:
    """``(-1)^(number of letters `name` in the word)``; raises unless it is a character of the group."""
    chi = np.array([(-1.0) ** word.count(name) for word in group.words])
    mul = group.multiplication_table()
    if not np.array_equal(chi[mul], np.outer(chi, chi)):
        raise LayerwiseError(f"the parity of generator {name!r} is not a character of this group")
    return chi


def _project_rows(rows: torch.Tensor, mats: list[torch.Tensor], chi: np.ndarray) -> torch.Tensor:
    """Rows ``r`` with ``r M_g = chi(g) r`` for all g: the isotypic projection of random rows."""
    proj = sum(float(c) * m for c, m in zip(chi, mats)) / len(mats)
    return rows @ proj


def planted_attention(
    group: str = "z2",
    *,
    grid: int = 4,
    channels: int = 2,
    fixed_heads: int = 2,
    orbits: int = 1,
    positional: bool = True,
    tail: str | None = "tanh",
    tail_blocks: int = 2,
    out: str = "equivariant",
    hide: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Sequential, PlantedAttention]:
    """``[PositionalEncoding,] SelfAttention[, Linear, act, Linear]`` on patch tokens (see :func:`patch_generators`),
    equivariant layer by layer, then hidden.

    Heads: ``orbits`` regular orbits of ``|G|`` heads each (the group permutes them like its elements: swapped pairs
    for a flip) and ``fixed_heads`` heads mapped to themselves, with queries and keys in the invariant rows and value
    rows alternating between the invariant rows and the rows of the flip's sign character (where the input has
    them), so a fixed head's latent map is ``diag(1, -1, ...)``. The positional encoding is a group average, so it is
    equivariant. ``tail`` adds a dense hidden layer of ``tail_blocks`` regular blocks with that activation.
    Hiding: a random head permutation, per-head ``GL(d_head)`` on queries/keys and on values, random key biases,
    a value bias moved into the output bias, a constant shift of the positional encoding absorbed by the biases,
    and a random hidden symmetry of the dense layer.

    >>> import layerwise
    >>> model, planted = planted_attention("z2", seed=0)
    >>> res = layerwise.extract(model, planted.generators)
    >>> res.equivariant, res.latent[0]["hflip"].cycle_type() == planted.cycle_types()["hflip"]
    (True, True)
    """
    from .testing import ACTIVATIONS, _random_factor

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def invertible(n):  # random, condition number about e^2 at most: float32 stays accurate
        q1, q2 = torch.linalg.qr(randn(n, n))[0], torch.linalg.qr(randn(n, n))[0]
        return q1 @ torch.diag(torch.exp(0.5 * torch.rand(n, generator=gen, dtype=torch.float64) * 4 - 1)) @ q2

    gens = patch_generators(group, grid, channels, out)
    d = 4 * channels
    t = grid * grid
    grp, _ = token_group(gens, t, d, d)
    order = grp.order
    num_heads = fixed_heads + orbits * order
    if num_heads == 0 or d % num_heads:
        raise LayerwiseError(f"{num_heads} heads do not divide the {d} token features (channels={channels})")
    dh = d // num_heads
    tok = [torch.as_tensor(r[:t, :t]) for r in grp.rho_in]
    feat = [torch.as_tensor(r[t:, t:]) for r in grp.rho_in]
    aug = [torch.block_diag(m, torch.ones(1, dtype=torch.float64)) for m in feat]  # on [y; 1]
    inv = [grp.inverse_index(h) for h in range(order)]
    mul = grp.multiplication_table()
    chi_triv = np.ones(order)
    chi_sign = _parity(grp, grp.names[-1])

    q, k, v, mats = [], [], [], []
    for _ in range(fixed_heads):
        q.append(_project_rows(randn(dh, d + 1), aug, chi_triv))
        k.append(_project_rows(randn(dh, d + 1), aug, chi_triv))
        rows, chis = [], []
        for r in range(dh):
            chi = chi_sign if r % 2 else chi_triv
            row = _project_rows(randn(1, d + 1), aug, chi)
            if float(row.norm()) < 1e-8:  # the input has no rows of that character
                chi, row = chi_triv, _project_rows(randn(1, d + 1), aug, chi_triv)
            rows.append(row)
            chis.append(chi)
        v.append(torch.cat(rows))
        mats.append([torch.diag(torch.tensor([c[g] for c in chis], dtype=torch.float64)) for g in range(order)])
    for _ in range(orbits):
        q0, k0, v0 = randn(dh, d + 1), randn(dh, d + 1), randn(dh, d + 1)
        for a in range(order):
            back = aug[inv[a]]  # M_a^{-1}
            q.append(q0 @ back)
            k.append(k0 @ back)
            v.append(v0 @ back)
            mats.append([torch.eye(dh, dtype=torch.float64)] * order)
    perms = []
    for g in range(order):
        p = list(range(fixed_heads))
        for o in range(orbits):
            base = fixed_heads + o * order
            p += [base + int(mul[inv[g], a]) for a in range(order)]
        perms.append(torch.tensor(p))
    heads = [HeadAction(perms[g], torch.stack([mats[j][g] for j in range(num_heads)])) for g in range(order)]
    kmat = [a.matrix for a in heads]

    # the stream after the output projection: R_g = O K_g O^{-1} with O random (tail) or the output action itself
    if tail is None:
        r_out = feat if out == "equivariant" else [torch.eye(d, dtype=torch.float64)] * order
        o0 = randn(d, d)
        o = sum(torch.linalg.inv(r_out[g]) @ o0 @ kmat[g] for g in range(order)) / order
        if torch.linalg.matrix_rank(o) < d:
            raise LayerwiseError("planted_attention: without a tail the output projection is singular for this "
                                 "head layout (some head values would be invisible); use a tail")
        c0 = randn(d)
        c = sum(torch.linalg.inv(r_out[g]) @ c0 for g in range(order)) / order
    else:
        o, c = randn(d, d) / d**0.5, randn(d) * 0.1
    q_all, k_all, v_all = (torch.cat(x) for x in (q, k, v))
    scale = 1.0 / float(q_all[:, :-1].norm(dim=1).mean())
    q_all, k_all = q_all * scale * dh**0.25, k_all * scale * dh**0.25  # scores of order one

    if positional:
        e0 = randn(t, d)
        pe = sum(tok[g] @ e0 @ feat[g].T for g in range(order)) / order  # e_t = M_g e_{p_g(t)}
    else:
        pe = None

    dense = []
    if tail is not None:
        # y = O z + c with z -> K z gives y -> R y + (c - R c)
        stream = []
        for g in range(order):
            r = o @ kmat[g] @ torch.linalg.inv(o)
            stream.append(torch.cat([torch.cat([r, (c - r @ c)[:, None]], 1),
                                     torch.eye(d + 1, dtype=torch.float64)[-1:]]))
        w_units = tail_blocks * order
        k_tail = []
        for g in range(order):
            perm = torch.cat([torch.as_tensor(mul[g]) + b * order for b in range(tail_blocks)])
            m = torch.zeros(w_units, w_units, dtype=torch.float64)
            m[perm, torch.arange(w_units)] = 1.0  # unit (b, a) goes to (b, g a)
            k_tail.append(m)
        x0 = randn(w_units, d + 1)
        x = sum(k_tail[g].T @ x0 @ stream[g] for g in range(order)) / order
        x = x * (2.0 / float(x[:, :-1].norm(dim=1).mean()))
        r_out = feat if out == "equivariant" else [torch.eye(d, dtype=torch.float64)] * order
        u0 = randn(d, w_units + 1)
        u = sum(torch.linalg.inv(r_out[g]) @ u0 @ torch.block_diag(k_tail[g], torch.ones(1, dtype=torch.float64))
                for g in range(order)) / order
        dense = [x, u]

    # parameters of nn.MultiheadAttention: in_proj [Wq; Wk; Wv] with biases, out_proj (o, c)
    wq, bq = q_all[:, :-1].clone(), q_all[:, -1].clone()
    wk, bk = k_all[:, :-1].clone(), k_all[:, -1].clone()
    wv, bv = v_all[:, :-1].clone(), v_all[:, -1].clone()
    order_heads = torch.arange(num_heads)
    if hide:
        order_heads = torch.randperm(num_heads, generator=gen)
        idx = (order_heads[:, None] * dh + torch.arange(dh)).reshape(-1)
        wq, bq, wk, bk, wv, bv = wq[idx], bq[idx], wk[idx], bk[idx], wv[idx], bv[idx]
        o = o[:, idx]
        for h in range(num_heads):
            sl = slice(h * dh, (h + 1) * dh)
            a = invertible(dh)
            wq[sl], bq[sl] = a @ wq[sl], a @ bq[sl]
            a_t = torch.linalg.inv(a).T
            wk[sl], bk[sl] = a_t @ wk[sl], a_t @ bk[sl] + randn(dh)  # a key bias only adds query-only terms
            cv = invertible(dh)
            wv[sl], bv[sl] = cv @ wv[sl], cv @ bv[sl]
            o[:, sl] = o[:, sl] @ torch.linalg.inv(cv)
            shift = randn(dh)  # a constant value passes to the output: move it into the output bias
            bv[sl] += shift
            c = c - o[:, sl] @ shift
        if pe is not None:
            u_shift = randn(d)  # a constant positional shift is absorbed by the biases
            pe = pe + u_shift
            bq, bk, bv = bq - wq @ u_shift, bk - wk @ u_shift, bv - wv @ u_shift
        if dense:
            fam_mod = ACTIVATIONS[tail]()
            from .hidden import family_of

            fam = family_of(fam_mod, "tail")
            n = dense[0].shape[0]
            perm = torch.randperm(n, generator=gen)
            s = _random_factor(fam, n, gen)
            mult, shift = fam.latent(s)
            x, u = dense
            x = x[perm] * s[:, None]
            uw = u[:, :-1][:, perm] / mult
            ub = u[:, -1] - uw @ shift
            dense = [x, torch.cat([uw, ub[:, None]], 1)]

    mods: list[nn.Module] = []
    if pe is not None:
        pe_mod = PositionalEncoding(t, d, dtype=dtype)
        with torch.no_grad():
            pe_mod.weight.copy_(pe)
        mods.append(pe_mod)
    att = SelfAttention(d, num_heads, dtype=dtype)
    with torch.no_grad():
        att.attn.in_proj_weight.copy_(torch.cat([wq, wk, wv]))
        att.attn.in_proj_bias.copy_(torch.cat([bq, bk, bv]))
        att.attn.out_proj.weight.copy_(o)
        att.attn.out_proj.bias.copy_(c)
    mods.append(att)
    if dense:
        for i, x in enumerate(dense):
            lin = nn.Linear(x.shape[1] - 1, x.shape[0], dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(x[:, :-1])
                lin.bias.copy_(x[:, -1])
            mods.append(lin)
            if i == 0:
                mods.append(ACTIVATIONS[tail]())
    return nn.Sequential(*mods), PlantedAttention(gens, grp, heads, 0, order_heads)
