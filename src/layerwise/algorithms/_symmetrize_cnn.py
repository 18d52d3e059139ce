"""Alignment and symmetrization of CNNs (stage two of the CNN support), in filter space.

A CNN ``(Conv2d act [AvgPool2d(2)])* AdaptiveAvgPool2d(1) Flatten (Linear act)* Linear`` (BatchNorm2d in eval mode
is folded first) keeps its weight sharing under the group average when the latent actions are channel actions
combined with the spatial transform: with ``conv(T x, F) = T conv(x, T^-1 F)``, layer ``i`` becomes

    F' = mean_h P_i(h)^-1 T_h^-1(F K_{i-1}(h)),   b' = mean_h P_i(h)^-1 b,

where ``K_{i-1}(h)`` is the channel action on the layer's input and ``P_i(h)`` the channel action on its
pre-activations, both homomorphisms, so ``F'`` satisfies the equivariance condition exactly. Channels are aligned
group-consistently (``_align``) from activations (correlation of channel ``j`` of ``f(h x)`` with channel ``c`` of
``T_h f(x)`` over samples and positions) or from filters (cosines of ``T_h^-1(F K(h))`` with ``F``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from .._errors import LayerwiseError
from .._numeric import at_least_tiny
from ..group import MAX_GROUP_ORDER, FiniteGroup, generator_pairs
from ..hidden import ActivationFamily, LatentAction, family_of
from ..layers._conv import SPATIAL, _check_conv, fold_batchnorm, spatial_permutation
from ..layers._dense import PASSTHROUGH
from ._align import LayerAlignment, activation_similarity, consistent_actions, weight_similarity
from ._extract import extend_to_group, transformed_rows
from ._symmetrize import WEIGHT_TIEBREAK

_INVERSE = {"hflip": SPATIAL["hflip"], "vflip": SPATIAL["vflip"], "rot90": lambda a: torch.rot90(a, -1, (-2, -1))}


@dataclass
class _Stage:
    kind: str  # "conv" | "pool" | "maxpool" | "gap" | "dense"
    index: int
    act: int | None = None
    family: ActivationFamily | None = None
    maxpool: bool = False  # a MaxPool2d follows this layer's activation

    def alignment_family(self) -> ActivationFamily:
        """The family whose group the channel alignment may use. Sigmoid's flip ``1 - z`` of a channel cannot be
        moved into a zero-padded convolution (the offset becomes position dependent), and max pooling commutes only
        with positive factors: such layers are aligned by permutations (with positive factors where allowed)."""
        fam = self.family
        if self.kind == "conv" and (fam.affine_flip or (self.maxpool and fam.scales in ("sign", "nonzero"))):
            return replace(fam, scales="one" if fam.scales == "sign" else "positive", affine_flip=False)
        return fam


def _stages(model: nn.Sequential) -> list[_Stage]:
    stages: list[_Stage] = []
    for i, mod in enumerate(model):
        where = f"model[{i}]"
        if isinstance(mod, nn.Flatten):
            if stages and stages[-1].kind not in ("gap", "dense", "flatten"):
                stages.append(_Stage("flatten", i))
            continue
        if isinstance(mod, PASSTHROUGH):
            continue
        if isinstance(mod, nn.Conv2d):
            _check_conv(mod, where)
            if any(s.kind in ("gap", "dense", "flatten") for s in stages):
                raise LayerwiseError(f"{where}: a Conv2d after the pooling head is not supported by symmetrize")
            stages.append(_Stage("conv", i))
        elif isinstance(mod, nn.Linear):
            if not any(s.kind in ("gap", "flatten") for s in stages):
                raise LayerwiseError(f"{where}: a Linear layer needs AdaptiveAvgPool2d(1) or Flatten before it")
            stages.append(_Stage("dense", i))
        elif isinstance(mod, (nn.AvgPool2d, nn.MaxPool2d)) and not _is_pool2(mod):
            raise LayerwiseError(f"{where}: only {type(mod).__name__}(2) (window 2, stride 2, no padding) is "
                                 f"supported, got {mod}")
        elif isinstance(mod, nn.AdaptiveAvgPool2d) and mod.output_size not in (1, (1, 1)):
            raise LayerwiseError(f"{where}: only AdaptiveAvgPool2d(1) is supported, got output size {mod.output_size}")
        elif isinstance(mod, nn.AvgPool2d):
            stages.append(_Stage("pool", i))
        elif isinstance(mod, nn.MaxPool2d):
            if not stages or stages[-1].kind != "conv" or stages[-1].act is None:
                raise LayerwiseError(f"{where}: MaxPool2d must follow a convolution's activation")
            stages[-1].maxpool = True
            stages.append(_Stage("maxpool", i))
        elif isinstance(mod, nn.AdaptiveAvgPool2d):
            stages.append(_Stage("gap", i))
        else:
            fam = family_of(mod, where)
            if not stages or stages[-1].kind not in ("conv", "dense") or stages[-1].act is not None:
                raise LayerwiseError(f"{where}: activation must follow a Conv2d or Linear")
            stages[-1].act, stages[-1].family = i, fam
    if not stages or stages[-1].kind != "dense" or stages[-1].act is not None:
        raise LayerwiseError("model: symmetrize for CNNs needs a final Linear layer without activation")
    for s in stages[:-1]:
        if s.kind in ("conv", "dense") and s.act is None:
            raise LayerwiseError(f"model[{s.index}]: every hidden Conv2d or Linear needs an activation after it")
    return stages


def _is_pool2(mod: nn.Module) -> bool:
    ok = mod.kernel_size in (2, (2, 2)) and mod.stride in (2, (2, 2)) and mod.padding in (0, (0, 0))
    if isinstance(mod, nn.MaxPool2d):
        ok = ok and mod.dilation in (1, (1, 1)) and not mod.ceil_mode
    return ok and not getattr(mod, "ceil_mode", False)


def check_images(data, channels: int, square: bool, where: str) -> torch.Tensor:
    """``data`` as float64 ``(N, channels, H, W)`` images, or a LayerwiseError naming ``where``."""
    if not isinstance(data, torch.Tensor) or data.ndim != 4 or data.shape[1] != channels:
        raise LayerwiseError(f"{where}: expected (N, {channels}, H, W) images, got "
                             f"{tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__}")
    if data.shape[0] < 1 or not data.is_floating_point() or not torch.isfinite(data).all():
        raise LayerwiseError(f"{where}: expected a non-empty batch of finite floating-point images, got shape "
                             f"{tuple(data.shape)} and dtype {data.dtype}")
    if square and data.shape[2] != data.shape[3]:
        raise LayerwiseError(f"{where}: rot90 needs square images, got {data.shape[2]}x{data.shape[3]}")
    return data.to(torch.float64)


def _word_inverse(word: tuple[str, ...], a: torch.Tensor) -> torch.Tensor:
    """``T_h^-1`` for ``h = s1 s2 ... sk`` (``T_h = T_s1 T_s2 ...``): apply ``s1^-1`` first."""
    for s in word:
        a = _INVERSE[s](a)
    return a


def _word(word: tuple[str, ...], a: torch.Tensor) -> torch.Tensor:
    for s in reversed(word):
        a = SPATIAL[s](a)
    return a


def units_of(channel: LatentAction, n_features: int, word: tuple[str, ...]) -> LatentAction:
    """The action on ``Flatten``-ed ``(C, H, W)`` maps (``n_features = C H W``, square maps) of a channel action
    combined with the spatial transform of the group element spelled ``word``; unchanged when
    ``n_features == C`` (after global pooling)."""
    c = channel.size
    if n_features == c:
        return channel
    hw = n_features // c
    side = int(round(hw**0.5))
    if c * side * side != n_features:
        raise LayerwiseError(f"model: a Linear layer with {n_features} inputs after {c} channels needs square maps")
    sp = _word(word, torch.arange(hw).reshape(1, side, side)).reshape(-1)
    perm = (channel.perm[:, None] * hw + sp[None, :]).reshape(-1)
    return LatentAction(perm, channel.scale.repeat_interleave(hw), channel.offset64.repeat_interleave(hw),
                        channel.dtype)


def _moved_filters(w: torch.Tensor, k_in: LatentAction, word: tuple[str, ...]) -> torch.Tensor:
    fk = torch.empty_like(w)
    fk[:, k_in.perm] = w * k_in.scale.to(w.dtype)[None, :, None, None]  # F K_in
    return _word_inverse(word, fk)


def symmetrize_cnn(
    model: nn.Module, generators: dict, data: torch.Tensor | None = None, *, balance: bool = True,
    max_group_order: int = MAX_GROUP_ORDER, return_alignment: bool = False, aligned: bool = True,
):
    """:func:`layerwise.symmetrize` for CNNs; ``data`` of shape ``(N, C, H, W)`` aligns by activations.
    ``aligned=False`` is the naive average (every channel matched to itself)."""
    folded = fold_batchnorm(model)
    stages = _stages(folded)
    mods = [m for m in folded]
    dtype = mods[stages[0].index].weight.dtype
    first = mods[stages[0].index]
    spatial_names = {}
    resolved = {}
    for name, a_in, a_out in generator_pairs(generators):
        if not (isinstance(a_in, str) and a_in in SPATIAL):
            raise LayerwiseError(f"generators[{name!r}][0]: symmetrize for CNNs takes a spatial action "
                                 f"{sorted(SPATIAL)}, got {a_in!r}")
        spatial_names[name] = a_in
        resolved[name] = (spatial_permutation(a_in, (first.in_channels, 8, 8)), a_out)
    out_features = mods[stages[-1].index].out_features
    # the group's words and table only (an 8x8 grid represents the flips and rotations faithfully)
    group = FiniteGroup.from_generators(resolved, first.in_channels * 64, out_features, max_order=max_group_order)
    words = [tuple(spatial_names[s] for s in w) for w in group.words]
    if data is not None:
        data = check_images(data, first.in_channels, "rot90" in spatial_names.values(), "data")
    # float64 working copies: [weight, bias] per affine stage
    params = {s.index: [mods[s.index].weight.detach().double().clone(), mods[s.index].bias.detach().double().clone()
                        if mods[s.index].bias is not None else torch.zeros(mods[s.index].weight.shape[0],
                                                                           dtype=torch.float64)]
              for s in stages if s.kind in ("conv", "dense")}
    affine = [s for s in stages if s.kind in ("conv", "dense")]
    if balance:  # unit-norm filters for ReLU-type layers (a hidden symmetry; the next layer compensates)
        for s, nxt in zip(affine, affine[1:]):
            if s.family is not None and s.family.homogeneous:
                w, b = params[s.index]
                norm = at_least_tiny(torch.sqrt(w.reshape(w.shape[0], -1).pow(2).sum(1) + b.pow(2)))
                params[s.index] = [w / norm.view(-1, *([1] * (w.ndim - 1))), b / norm]
                mult = (1 / norm) ** s.family.power
                nw = params[nxt.index][0]
                if nw.shape[1] != mult.numel():  # a dense layer after Flatten: H W columns per channel
                    mult = mult.repeat_interleave(nw.shape[1] // mult.numel())
                params[nxt.index][0] = nw / mult.view(1, -1, *([1] * (nw.ndim - 2)))

    def forward_hidden(x: torch.Tensor) -> list[torch.Tensor]:
        outs, z = [], x
        for s in stages:
            if s.kind == "conv":
                w, b = params[s.index]
                z = mods[s.act](torch.nn.functional.conv2d(z, w, b, padding=w.shape[-1] // 2))
                outs.append(z)
            elif s.kind == "pool":
                z = torch.nn.functional.avg_pool2d(z, 2)
            elif s.kind == "maxpool":
                z = torch.nn.functional.max_pool2d(z, 2)
            elif s.kind == "gap":
                z = z.mean(dim=(-2, -1))
            elif s.act is not None:
                w, b = params[s.index]
                z = mods[s.act](z.reshape(z.shape[0], -1) @ w.T + b)
                outs.append(z)
        return outs

    acts = None
    if data is not None:
        with torch.no_grad():
            try:
                acts = [forward_hidden(_word(words[h], data)) for h in range(group.order)]
            except RuntimeError as exc:
                raise LayerwiseError(f"data: the model cannot run on images of shape {tuple(data.shape[1:])} "
                                     f"({str(exc).splitlines()[0]})") from None
    alignments: list[LayerAlignment] = []
    prev = [LatentAction.identity(first.in_channels) for _ in range(group.order)]
    hidden_i = 0
    new_params = {}
    for s in affine:
        w, b = params[s.index]
        if s.kind == "conv":
            moved = [_moved_filters(w, prev[h], words[h]) for h in range(group.order)]
            rows = [m.reshape(m.shape[0], -1) for m in moved]
            base = torch.cat([w.reshape(w.shape[0], -1), b[:, None]], 1)
            sims = np.stack([weight_similarity(base, torch.cat([r, b[:, None]], 1)) for r in rows])
            if acts is not None:
                z0 = acts[0][hidden_i]
                for h in range(group.order):
                    zt = _word(words[h], z0)  # T_h f(x), compared with f(h x)
                    flat = lambda t: t.transpose(0, 1).reshape(t.shape[1], -1).T  # noqa: E731
                    sims[h] = (WEIGHT_TIEBREAK * sims[h] + activation_similarity(flat(zt), flat(acts[h][hidden_i]))) \
                        / (1 + WEIGHT_TIEBREAK)
        else:
            prev = [units_of(prev[h], w.shape[1], words[h]) for h in range(group.order)]
            moved = [transformed_rows(torch.cat([w, b[:, None]], 1), prev[h]) for h in range(group.order)]
            base = torch.cat([w, b[:, None]], 1)
            if s.act is None:  # output layer: average with rho_L
                total = sum(torch.linalg.solve(torch.as_tensor(group.rho_out[h]), moved[h]) for h in range(group.order))
                new_params[s.index] = [total[:, :-1] / group.order, total[:, -1] / group.order]
                continue
            sims = np.stack([weight_similarity(base, m) for m in moved])
            if acts is not None:
                sims = (WEIGHT_TIEBREAK * sims + np.stack([activation_similarity(acts[0][hidden_i], acts[h][hidden_i])
                                                           for h in range(group.order)])) / (1 + WEIGHT_TIEBREAK)
        if aligned:
            al = consistent_actions(sims, group, s.alignment_family(), dtype)
        else:
            ident = {n: LatentAction.identity(w.shape[0], dtype) for n in group.names}
            al = LayerAlignment(ident, ident, float("nan"), float("nan"))
        alignments.append(al)
        pre_all = extend_to_group(group, al.pre)[0]
        if s.kind == "conv":
            tw = sum(pre_all[h].inverse().apply_rows(moved[h].reshape(w.shape[0], -1)) for h in range(group.order))
            tb = sum(pre_all[h].inverse().apply_rows(b[:, None])[:, 0] for h in range(group.order))
            new_params[s.index] = [tw.reshape(w.shape) / group.order, tb / group.order]
        else:
            total = sum(pre_all[h].inverse().apply_rows(moved[h]) for h in range(group.order)) / group.order
            new_params[s.index] = [total[:, :-1], total[:, -1]]
        prev = extend_to_group(group, al.latent)[0]
        hidden_i += 1
    out = []
    for i, mod in enumerate(mods):
        if i in new_params:
            if isinstance(mod, nn.Conv2d):
                new = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, padding=mod.padding, dtype=dtype)
            else:
                new = nn.Linear(mod.in_features, mod.out_features, dtype=dtype)
            with torch.no_grad():
                new.weight.copy_(new_params[i][0])
                new.bias.copy_(new_params[i][1])
            out.append(new)
        else:
            out.append(mod)
    result = nn.Sequential(*out).eval()
    return (result, alignments) if return_alignment else result
