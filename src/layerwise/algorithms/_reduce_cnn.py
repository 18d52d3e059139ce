"""Reduction of CNNs to their identifiable submodel, channel by channel (THEORY section 4 for convolutions), and
unit by unit in the dense head.

For a convolution followed (through pooling) by another convolution or, after global pooling, by a dense layer:
(a) a channel whose outgoing weights (the next layer's slice for that input channel) are all zero is removed;
(c) channels whose filters and biases agree up to an allowed factor ``s`` are merged: the duplicate's outgoing slice
is added to the kept channel's with factor ``mult(s)``. Constant channels (zero filters) are kept: with zero padding
the next convolution sees a constant map as a position-dependent input, which no bias absorbs; and affine factors
(sigmoid) are never merged for the same reason. Layers followed by ``Flatten`` without global pooling are left as
they are.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .._numeric import at_least_tiny
from ._reduce import LayerReduction, duplicate_units


def _affine_indices(model: nn.Sequential) -> list[int]:
    return [i for i, m in enumerate(model) if isinstance(m, (nn.Conv2d, nn.Linear))]


def _slices_ok(model: nn.Sequential, i: int, j: int) -> bool:
    """Whether the input channels of affine module ``j`` correspond one to one to the output channels of ``i``."""
    between = model[i + 1 : j]
    if any(isinstance(m, nn.Flatten) for m in between) and not any(isinstance(m, nn.AdaptiveAvgPool2d)
                                                                    for m in between):
        return False
    nxt, cur = model[j], model[i]
    n_in = nxt.in_channels if isinstance(nxt, nn.Conv2d) else nxt.in_features
    return n_in == (cur.out_channels if isinstance(cur, nn.Conv2d) else cur.out_features)


def _keep(model: nn.Sequential, i: int, j: int, keep: torch.Tensor) -> None:
    idx = torch.nonzero(keep).flatten()
    cur, nxt = model[i], model[j]
    with torch.no_grad():
        if isinstance(cur, nn.Conv2d):
            new = nn.Conv2d(cur.in_channels, len(idx), cur.kernel_size, padding=cur.padding, bias=True,
                            dtype=cur.weight.dtype)
        else:
            new = nn.Linear(cur.in_features, len(idx), bias=True, dtype=cur.weight.dtype)
        new.weight.copy_(cur.weight[idx])
        new.bias.copy_(cur.bias[idx] if cur.bias is not None else torch.zeros(len(idx), dtype=cur.weight.dtype))
        model[i] = new
        if isinstance(nxt, nn.Conv2d):
            nn2 = nn.Conv2d(len(idx), nxt.out_channels, nxt.kernel_size, padding=nxt.padding, bias=nxt.bias is not None,
                            dtype=nxt.weight.dtype)
        else:
            nn2 = nn.Linear(len(idx), nxt.out_features, bias=nxt.bias is not None, dtype=nxt.weight.dtype)
        nn2.weight.copy_(nxt.weight[:, idx])
        if nxt.bias is not None:
            nn2.bias.copy_(nxt.bias)
        model[j] = nn2


def reduce_cnn(folded: nn.Sequential, families: list, tol: float) -> tuple[nn.Sequential, list[LayerReduction]]:
    """Remove dead and merge duplicated channels of every convolution of a BatchNorm-folded CNN (a copy).

    ``families``: the activation family of every hidden affine layer, in order. Returns the reduced model and one
    :class:`LayerReduction` per hidden affine layer (dense layers are reported unchanged)."""
    model = copy.deepcopy(folded)
    aff = _affine_indices(model)
    reports = []
    for k in range(len(families)):
        m = model[aff[k]]
        n = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        reports.append(LayerReduction(width_before=n, kept=list(range(n))))
    changed = True
    while changed:
        changed = False
        for k, fam in enumerate(families):
            i, j = aff[k], aff[k + 1]
            if not _slices_ok(model, i, j):
                continue
            cur, nxt = model[i], model[j]
            w = cur.weight.detach().double()
            b = cur.bias.detach().double() if cur.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            out = nxt.weight.detach().double().transpose(0, 1).reshape(w.shape[0], -1)  # outgoing slice per unit
            norms = out.norm(dim=1)
            keep = norms > tol * at_least_tiny(norms.max())
            rep = reports[k]
            for c in torch.nonzero(~keep).flatten().tolist():
                rep.dead.append(rep.kept[c])
            rows = torch.cat([w.reshape(w.shape[0], -1), b[:, None]], 1)
            if not fam.affine_flip and int(keep.sum()) > 1:
                dup_t, root, s = duplicate_units(rows, keep, fam.scales, tol)
                dups = dup_t.tolist()
                if dups:
                    mult, _ = fam.latent(s)
                    with torch.no_grad():
                        wn = nxt.weight
                        for c, r, f in zip(dups, root.tolist(), mult.tolist()):
                            wn[:, r] += f * wn[:, c]
                            rep.merged.append((rep.kept[c], rep.kept[r]))
                            keep[c] = False
            if not bool(keep.all()):
                _keep(model, i, j, keep)
                rep.kept = [u for u, kk in zip(rep.kept, keep.tolist()) if kk]
                changed = True
    for k, rep in enumerate(reports):
        m = model[aff[k]]
        rep.width_after = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
    return model, reports
