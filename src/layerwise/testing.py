"""Planted structure: networks whose layers are equivariant under a known latent action, hidden by a random
element of the architecture's hidden symmetry group. The backbone of the project's tests, the demo and the
benchmarks, and a quick way for users to see what :func:`layerwise.extract` recovers.

>>> import layerwise
>>> from layerwise.testing import planted_mlp
>>> model, planted = planted_mlp("relu", group="d4", image=4, widths=(24, 16), seed=1)
>>> res = layerwise.extract(model, planted.generators)
>>> res.equivariant and planted.characters_match(res)
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ._errors import LayerwiseError
from ._planted_tokens import PlantedAttention, patch_generators, planted_attention
from .algorithms import extend_to_group
from .group import FiniteGroup
from .hidden import ActivationFamily, LatentAction, family_of
from .nn import Power

__all__ = [
    "ACTIVATIONS", "Planted", "PlantedAttention", "flip_permutation", "hflip_permutation", "image_generators",
    "patch_generators", "perturb", "planted_attention", "planted_cnn", "planted_mlp", "rot90_permutation",
    "vflip_permutation",
]

ACTIVATIONS = {
    "relu": lambda: nn.ReLU(),
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "tanh": lambda: nn.Tanh(),
    "sigmoid": lambda: nn.Sigmoid(),
    "power2": lambda: Power(2),
    "power3": lambda: Power(3),
    "gelu": lambda: nn.GELU(),
    "silu": lambda: nn.SiLU(),
    "softplus": lambda: nn.Softplus(),
}


def hflip_permutation(n: int, m: int | None = None) -> torch.Tensor:
    """Left-right flip of a flattened ``n x m`` image as a permutation (``x.flip(-1)``)."""
    m = n if m is None else m
    idx = torch.arange(n * m).reshape(n, m)
    return idx.flip(-1).reshape(-1)


flip_permutation = hflip_permutation


def vflip_permutation(n: int, m: int | None = None) -> torch.Tensor:
    """Up-down flip of a flattened ``n x m`` image as a permutation (``x.flip(-2)``)."""
    m = n if m is None else m
    return torch.arange(n * m).reshape(n, m).flip(-2).reshape(-1)


def rot90_permutation(n: int) -> torch.Tensor:
    """Rotation by 90 degrees of a flattened ``n x n`` image (``torch.rot90(x, 1, dims=(-2, -1))``)."""
    return torch.rot90(torch.arange(n * n).reshape(n, n), 1, dims=(-2, -1)).reshape(-1)


def image_generators(group: str, n: int, out: str = "invariant") -> dict:
    """Generators of ``"z2"`` (left-right flip), ``"z2v"`` (up-down flip) or ``"d4"`` on flattened ``n x n``
    images; outputs are invariant (``None``) or transform like the input (``out="equivariant"``)."""
    if group == "z2":
        gens = {"hflip": hflip_permutation(n)}
    elif group == "z2v":
        gens = {"vflip": vflip_permutation(n)}
    elif group == "d4":
        gens = {"rot90": rot90_permutation(n), "hflip": hflip_permutation(n)}
    else:
        raise LayerwiseError(f"group: expected 'z2', 'z2v' or 'd4', got {group!r}")
    if out not in ("invariant", "equivariant"):
        raise LayerwiseError(f"out: expected 'invariant' or 'equivariant', got {out!r}")
    return {k: (p, None if out == "invariant" else p) for k, p in gens.items()}


def _perm_action(p: torch.Tensor) -> LatentAction:
    return LatentAction(torch.as_tensor(p), torch.ones(len(p), dtype=torch.float64))


def _regular(group: FiniteGroup) -> dict[str, LatentAction]:
    """The regular representation: generator ``s`` sends basis vector ``e_h`` to ``e_{s.h}``."""
    out = {}
    for s, name in enumerate(group.names):
        perm = torch.empty(group.order, dtype=torch.long)
        perm[torch.as_tensor(group.table[:, s])] = torch.arange(group.order)  # (P z)_{s.h} = z_h
        out[name] = _perm_action(perm)
    return out


def _direct_sum(parts: list[dict[str, LatentAction]], names: tuple[str, ...]) -> dict[str, LatentAction]:
    out = {}
    for name in names:
        perms, scales, shift = [], [], 0
        for part in parts:
            a = part[name]
            perms.append(a.perm + shift)
            scales.append(a.scale)
            shift += a.size
        out[name] = LatentAction(torch.cat(perms), torch.cat(scales))
    return out


def _times_inverse(x: torch.Tensor, k: LatentAction) -> torch.Tensor:
    """``[W | b]`` of the map ``z_new -> W k^{-1} z_new + b`` where ``z_new = k z``."""
    w, b = x[:, :-1], x[:, -1]
    w_new = w[:, k.perm] / k.scale  # W k^{-1}[:, j] = W[:, perm[j]] / scale[j]
    b_new = b - w_new @ k.offset64
    return torch.cat([w_new, b_new[:, None]], 1)


def _apply_rows(k: LatentAction, x: torch.Tensor) -> torch.Tensor:
    """Rows of ``k x`` for a linear monomial ``k``."""
    return x[k.perm] * k.scale[:, None]


def _latent_of(pre: LatentAction, fam: ActivationFamily) -> LatentAction:
    mult, off = fam.latent(pre.scale)
    return LatentAction(pre.perm, mult, off)


def _random_factor(fam: ActivationFamily, n: int, gen: torch.Generator) -> torch.Tensor:
    if fam.scales == "one":
        return torch.ones(n, dtype=torch.float64)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    mag = torch.exp(0.5 * torch.randn(n, generator=gen, dtype=torch.float64))
    return {"sign": sign, "positive": mag, "nonzero": sign * mag}[fam.scales]


@dataclass
class Planted:
    """The known structure of a planted network.

    Attributes:
        generators: the generators dict to pass to :func:`layerwise.extract`.
        group: the enumerated group (element order matches :attr:`ExtractionResult.group`).
        latent: per hidden layer, the planted latent action of every group element (before hiding).
        blocks: per hidden layer, the numbers of regular blocks, trivial units and sign units.
        extra: per hidden layer, the numbers of dead, constant and duplicated units added.
    """

    generators: dict
    group: FiniteGroup
    latent: list[list[LatentAction]]
    blocks: list[tuple[int, int, int]]
    extra: list[tuple[int, int, int]]

    def characters(self) -> list[np.ndarray]:
        return [np.array([a.character() for a in acts]) for acts in self.latent]

    def characters_match(self, result, atol: float = 1e-6) -> bool:
        """Whether every recovered latent representation has the planted character."""
        got = [np.array([a.character() for a in acts]) for acts in result.group_latent]
        want = self.characters()
        return len(got) == len(want) and all(
            g.shape == w.shape and np.allclose(g, w, atol=atol) for g, w in zip(got, want)
        )


def planted_mlp(
    activation: str = "tanh",
    *,
    group: str = "z2",
    image: int = 4,
    widths: tuple[int, ...] = (12, 12),
    out: str = "invariant",
    n_out: int = 3,
    dead: int = 1,
    constant: int = 1,
    duplicates: int = 1,
    hide: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Sequential, Planted]:
    """A dense network, equivariant layer by layer under a planted latent representation, then hidden.

    Each hidden layer's representation is a direct sum of regular blocks (``|G|`` units permuted like the group
    elements), trivial units and, where the activation allows a negative factor, sign units (a character with
    values +-1); about a sixth of the units each are trivial and sign units, as far as the input space has room for
    them, and the rest regular blocks. Weights are group averages of random matrices, so they are generic
    (identifiable). Dead, constant and duplicated units are added without changing the function, then every hidden
    layer is transported by a random element of its hidden symmetry group (permutation, and positive scales, signs
    or affine flips).

    Args:
        activation: a key of :data:`ACTIVATIONS`.
        group: ``"z2"`` (left-right flip), ``"z2v"`` or ``"d4"`` acting on flattened ``image x image`` inputs.
        widths: approximate hidden widths before the extra units (at least one regular block each).
        out: ``"invariant"`` (``n_out`` outputs) or ``"equivariant"`` (outputs transform like the input).
    """
    if activation not in ACTIVATIONS:
        raise LayerwiseError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    gen = torch.Generator().manual_seed(seed)
    gens = image_generators(group, image, out)
    d0 = image * image
    d_out = d0 if out == "equivariant" else n_out
    grp = FiniteGroup.from_generators(gens, d0, d_out)
    fam = family_of(ACTIVATIONS[activation](), "activation")
    regular = _regular(grp)
    chi = {name: (-1.0 if j == 0 else 1.0) for j, name in enumerate(grp.names)}  # a character: first gen -> -1
    sign_unit = {name: LatentAction(torch.zeros(1, dtype=torch.long), torch.tensor([chi[name]])) for name in grp.names}
    trivial = {name: LatentAction.identity(1) for name in grp.names}
    allow_sign = fam.scales in ("sign", "nonzero")

    prev_latent = {name: _perm_action(torch.as_tensor(p)) for name, (p, _) in gens.items()}
    layers: list[torch.Tensor] = []
    acts_per_layer: list[list[LatentAction]] = []
    comp = []
    chi_all = np.array([a.scale[0].item() for a in extend_to_group(grp, sign_unit)[0]])
    for li in range(len(widths) + 1):
        prev_all = extend_to_group(grp, prev_latent)[0]
        if li < len(widths):
            # multiplicities of the trivial and the sign character in the augmented input space: more units of a
            # one-dimensional type than that would be collinear rows (duplicates) or dead.
            aug_char = np.array([a.character() + 1.0 for a in prev_all])
            m_triv = int(round(aug_char.mean()))
            m_sign = int(round((aug_char * chi_all).mean()))
            w = widths[li]
            last_invariant = li == len(widths) - 1 and out == "invariant"
            n_sign = 0 if (not allow_sign or last_invariant) else min(m_sign, w // 6)
            n_triv = min(m_triv, w // 6)
            n_reg = max(1, (w - n_sign - n_triv) // grp.order)
            parts = [regular] * n_reg + [trivial] * n_triv + [sign_unit] * n_sign
            pre = _direct_sum(parts, grp.names)
            comp.append((n_reg, n_triv, n_sign))
            pre_all = extend_to_group(grp, pre)[0]
        else:
            pre = None
        n_in = prev_all[0].size
        n = pre_all[0].size if pre is not None else d_out
        r = torch.randn(n, n_in + 1, generator=gen, dtype=torch.float64)
        if pre is None:
            out_acts = extend_to_group(grp, {k: _perm_action(torch.as_tensor(v)) if v is not None else
                                             LatentAction.identity(d_out) for k, (_, v) in gens.items()})[0]
            x = sum(_times_inverse(_apply_rows(o, r), k) for o, k in zip(out_acts, prev_all)) / grp.order
        else:
            x = sum(_times_inverse(_apply_rows(p, r), k) for p, k in zip(pre_all, prev_all)) / grp.order
        x = x * (2.0 / max(float(x[:, :-1].norm(dim=1).mean()), 1e-12))  # pre-activations of order one
        layers.append(x)
        if pre is not None:
            prev_latent = {name: _latent_of(a, fam) for name, a in pre.items()}
            acts_per_layer.append(extend_to_group(grp, prev_latent)[0])

    extra = []
    for i in range(len(widths)):
        x, nxt = layers[i], layers[i + 1]
        n_in = x.shape[1] - 1
        rows, cols = [x], [nxt[:, :-1]]
        bias_next = nxt[:, -1].clone()
        for _ in range(dead):
            rows.append(torch.randn(1, n_in + 1, generator=gen, dtype=torch.float64))
            cols.append(torch.zeros(nxt.shape[0], 1, dtype=torch.float64))
        for _ in range(constant):
            row = torch.zeros(1, n_in + 1, dtype=torch.float64)
            row[0, -1] = torch.randn(1, generator=gen, dtype=torch.float64)
            col = torch.randn(nxt.shape[0], 1, generator=gen, dtype=torch.float64)
            bias_next -= (col * fam_value(fam, activation, row[0, -1:])).squeeze(1)
            rows.append(row)
            cols.append(col)
        for _ in range(duplicates):
            j = int(torch.randint(x.shape[0], (1,), generator=gen))
            s = _random_factor(fam, 1, gen)
            mult, off = fam.latent(s)
            alpha = float(torch.rand(1, generator=gen)) + 0.5
            col = alpha * cols[0][:, j : j + 1].clone()
            cols[0][:, j] -= float(mult) * col[:, 0]
            bias_next -= (col * off).squeeze(1)
            rows.append(s[:, None] * x[j : j + 1])
            cols.append(col)
        layers[i] = torch.cat(rows, 0)
        layers[i + 1] = torch.cat([torch.cat(cols, 1), bias_next[:, None]], 1)
        extra.append((dead, constant, duplicates))

    if hide:
        for i in range(len(widths)):
            n = layers[i].shape[0]
            k_pre = LatentAction(torch.randperm(n, generator=gen), _random_factor(fam, n, gen))
            layers[i] = _apply_rows(k_pre, layers[i])
            layers[i + 1] = _times_inverse(layers[i + 1], _latent_of(k_pre, fam))

    mods: list[nn.Module] = []
    for i, x in enumerate(layers):
        lin = nn.Linear(x.shape[1] - 1, x.shape[0], dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(x[:, :-1])
            lin.bias.copy_(x[:, -1])
        mods.append(lin)
        if i < len(widths):
            mods.append(ACTIVATIONS[activation]())
    planted = Planted(gens, grp, acts_per_layer, comp, extra)
    return nn.Sequential(*mods), planted


def fam_value(fam: ActivationFamily, activation: str, u: torch.Tensor) -> torch.Tensor:
    """``sigma(u)`` for the named activation (float64)."""
    return ACTIVATIONS[activation]()(u)


def perturb(model: nn.Module, rel: float, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every weight matrix moved by Gaussian noise of relative size ``rel``."""
    import copy

    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            p.add_(rel * p.abs().mean() * noise)
    return out


_SPATIAL_INV = {"hflip": lambda a: a.flip(-1), "vflip": lambda a: a.flip(-2),
                "rot90": lambda a: torch.rot90(a, -1, dims=(-2, -1))}


def planted_cnn(
    activation: str = "tanh",
    *,
    group: str = "z2",
    image: int = 8,
    channels: tuple[int, ...] = (8, 8),
    kernel: int = 3,
    n_out: int = 3,
    batchnorm: bool = False,
    pool: str | None = None,
    hide: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Sequential, Planted]:
    """A CNN ``Conv2d -> act -> ... -> AdaptiveAvgPool2d(1) -> Flatten -> Linear`` on ``1 x image x image`` inputs
    whose convolutions are equivariant under a planted channel representation combined with the spatial action of
    ``group`` (``"z2"``: left-right flip, ``"d4"``: rotations by 90 degrees and flips); the output is invariant.

    Filters are group averages ``F = mean_g K_out(g)^-1 T_g^-1(F K_in(g))`` (``conv(T x, F) = T conv(x, T^-1 F)``),
    channels come in regular blocks, trivial channels and (where the activation allows) sign channels, and every
    layer is then hidden by a random channel permutation with factors from its hidden symmetry group. With
    ``batchnorm`` an eval-mode BatchNorm2d with random statistics follows each convolution, compensated so that
    folding it gives the planted filters. ``pool="avg"`` or ``"max"`` puts a 2x2 pooling after the first layer; max
    pooling commutes only with positive channel factors, so that layer then gets no sign channels and is hidden by
    permutations and positive factors only. ``Planted.latent`` holds the planted channel actions; pass
    ``input_shape=(1, image, image)`` to :func:`layerwise.extract`.
    """
    if activation not in ACTIVATIONS or activation == "sigmoid":
        raise LayerwiseError(f"activation: expected one of {sorted(set(ACTIVATIONS) - {'sigmoid'})}, got "
                             f"{activation!r}")
    gen = torch.Generator().manual_seed(seed)
    names = {"z2": ("hflip",), "d4": ("rot90", "hflip")}.get(group)
    if names is None:
        raise LayerwiseError(f"group: expected 'z2' or 'd4', got {group!r}")
    generators = {n: (n, None) for n in names}
    from .layers._conv import spatial_permutation

    grp = FiniteGroup.from_generators({n: (spatial_permutation(n, (1, image, image)), None) for n in names},
                                      image * image, n_out)
    fam = family_of(ACTIVATIONS[activation](), "activation")
    regular = _regular(grp)
    chi = {name: (-1.0 if j == 0 else 1.0) for j, name in enumerate(grp.names)}
    sign_unit = {n: LatentAction(torch.zeros(1, dtype=torch.long), torch.tensor([chi[n]])) for n in grp.names}
    trivial = {n: LatentAction.identity(1) for n in grp.names}
    allow_sign = fam.scales in ("sign", "nonzero")

    def t_inv(word, a):  # T_g^-1 for g = s1 s2 ... sk: apply s1^-1 first
        for s in word:
            a = _SPATIAL_INV[s](a)
        return a

    prev = extend_to_group(grp, trivial)[0]  # the input's single channel is trivial
    convs, pre_all_layers, comp = [], [], []
    c_in = 1
    for li, c in enumerate(channels):
        last = li == len(channels) - 1
        n_sign = 0 if (not allow_sign or last or (li == 0 and pool == "max")) else c // 4
        if li == 0:
            # filters of a single input channel that flip sign under the character span one dimension for D4:
            # more sign channels would be collinear rows, i.e. duplicated units
            n_sign = min(n_sign, 1)
        n_reg = max(1, (c - n_sign - c // 4) // grp.order)
        n_triv = max(0, c - n_sign - n_reg * grp.order)
        pre = _direct_sum([regular] * n_reg + [trivial] * n_triv + [sign_unit] * n_sign, grp.names)
        comp.append((n_reg, n_triv, n_sign))
        pre_all = extend_to_group(grp, pre)[0]
        c_out = pre_all[0].size
        raw = torch.randn(c_out, c_in, kernel, kernel, generator=gen, dtype=torch.float64)
        braw = torch.randn(c_out, generator=gen, dtype=torch.float64)
        w = torch.zeros_like(raw)
        b = torch.zeros_like(braw)
        for h in range(grp.order):
            fk = torch.empty_like(raw)
            fk[:, prev[h].perm] = raw * prev[h].scale[None, :, None, None]  # F K_in
            moved = t_inv(grp.words[h], fk)
            inv = pre_all[h].inverse()
            w += inv.apply_rows(moved.reshape(c_out, -1)).reshape(raw.shape)
            b += inv.apply_rows(braw[:, None])[:, 0]
        w, b = w / grp.order, b / grp.order
        scale = 1.5 / max(float(w.reshape(c_out, -1).norm(dim=1).mean()), 1e-12)
        convs.append([w * scale, b * scale])
        pre_all_layers.append(pre_all)
        prev = [_latent_of(a, fam) for a in pre_all]
        c_in = c_out
    r = torch.randn(n_out, c_in + 1, generator=gen, dtype=torch.float64)
    head = sum(_times_inverse(r, k) for k in prev) / grp.order  # invariant output: rho_L = 1
    latent = [[_latent_of(a, fam) for a in pre_all] for pre_all in pre_all_layers]

    if hide:
        for li in range(len(convs)):
            c = convs[li][0].shape[0]
            factor = _random_factor(fam, c, gen)
            if li == 0 and pool == "max":  # max(s z) = s max(z) needs s > 0
                factor = factor.abs() if fam.scales in ("positive", "nonzero") else torch.ones_like(factor)
            k_pre = LatentAction(torch.randperm(c, generator=gen), factor)
            w, b = convs[li]
            convs[li] = [k_pre.apply_rows(w.reshape(c, -1)).reshape(w.shape), k_pre.apply_rows(b[:, None])[:, 0]]
            lat = _latent_of(k_pre, fam)
            if li + 1 < len(convs):
                nw = convs[li + 1][0]
                convs[li + 1][0] = nw[:, lat.perm] / lat.scale[None, :, None, None]
            else:
                head = _times_inverse(head, lat)

    mods: list[nn.Module] = []
    c_in = 1
    for w, b in convs:
        conv = nn.Conv2d(c_in, w.shape[0], kernel, padding=kernel // 2, dtype=dtype)
        if batchnorm:
            bn = nn.BatchNorm2d(w.shape[0], dtype=dtype)
            with torch.no_grad():
                bn.running_mean.copy_(torch.randn(w.shape[0], generator=gen))
                bn.running_var.copy_(torch.rand(w.shape[0], generator=gen) + 0.5)
                bn.weight.copy_(torch.rand(w.shape[0], generator=gen) + 0.5)
                bn.bias.copy_(torch.randn(w.shape[0], generator=gen))
                s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double()
                w = w / s[:, None, None, None]
                b = (b - bn.bias.double()) / s + bn.running_mean.double()
            bn.eval()
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        mods += [conv, bn, ACTIVATIONS[activation]()] if batchnorm else [conv, ACTIVATIONS[activation]()]
        if pool is not None and len(mods) <= 3:
            mods.append({"avg": nn.AvgPool2d(2), "max": nn.MaxPool2d(2)}[pool])
        c_in = w.shape[0]
    lin = nn.Linear(c_in, n_out, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(head[:, :-1])
        lin.bias.copy_(head[:, -1])
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin]
    return nn.Sequential(*mods), Planted(generators, grp, latent, comp, [(0, 0, 0)] * len(channels))

