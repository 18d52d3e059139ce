"""Reduction to the identifiable submodel (THEORY section 4), keeping the end-to-end function.

Per hidden layer, until nothing changes anywhere: (a) remove units whose outgoing weights are zero; (b) fold units
whose incoming weights are zero (constants ``sigma(b_j)``) into the next bias; (c) merge units whose incoming rows
``[W | b]`` agree up to an allowed factor ``s``: ``sigma(s u) = mult(s) sigma(u) + offset(s)``, so the duplicate's
outgoing column is added to the kept unit's with factor ``mult(s)`` and ``offset(s)`` goes into the next bias.
Linear-bypass pairs (opposite rows, ``sigma(x) - sigma(-x) = c x``) are detected and reported, not removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .._memory import empty
from .._numeric import at_least_tiny
from ..layers import DenseNet
from ._match import _WINDOW, Sketch, _chunks, best_scale, row_residual


@dataclass
class LayerReduction:
    """What happened to one hidden layer; unit indices refer to the original layer."""

    width_before: int
    width_after: int = 0
    dead: list[int] = field(default_factory=list)
    constant: list[int] = field(default_factory=list)
    merged: list[tuple[int, int]] = field(default_factory=list)  # (removed unit, kept unit)
    kept: list[int] = field(default_factory=list)  # original index of each unit of the reduced layer
    bypass: list[tuple[int, int]] = field(default_factory=list)  # pairs in the reduced layer's numbering

    def summary(self) -> str:
        parts = [f"{self.width_before} -> {self.width_after} units"]
        if self.dead:
            parts.append(f"{len(self.dead)} dead removed")
        if self.constant:
            parts.append(f"{len(self.constant)} constant folded into the next bias")
        if self.merged:
            parts.append(f"{len(self.merged)} duplicates merged")
        if self.bypass:
            parts.append(f"{len(self.bypass)} linear-bypass pairs")
        return ", ".join(parts)


def _near_pairs(rows: torch.Tensor, scales: str, tol: float, live: torch.Tensor | None = None,
                sketch: Sketch | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs ``(j, k, s)`` (three tensors) with ``rows[j] = s * rows[k]`` (within ``tol``), found by sorted random
    keys (from ``sketch``, the rows' :class:`Sketch`, when given); only rows in ``live`` (indices, default all)
    take part. The rows are never copied: keys are one matmul, and only pairs whose keys nearly agree get the full
    O(d) check."""
    keys = (sketch or Sketch.of(rows)).keys(scales)
    if live is not None:
        keys = keys[live]
    n = keys.shape[0]
    none = torch.zeros(0, dtype=torch.long, device=rows.device)
    if n < 2:
        return none, none, rows.new_zeros(0)
    order = torch.argsort(keys[:, 0])
    key_scale = keys.norm(dim=1)
    # every row against the next 2 * _WINDOW rows in key order, all offsets at once
    pos = torch.arange(n, device=keys.device)[:, None] + torch.arange(1, min(2 * _WINDOW, n - 1) + 1,
                                                                         device=keys.device)[None, :]
    inside = pos < n
    j = order[pos.clamp(max=n - 1)]  # (n, window)
    k = order[:, None].expand_as(j)
    close = inside & ((keys[j] - keys[k]).norm(dim=2) <= 10 * tol * (key_scale[j] + key_scale[k]))
    j, k = j[close], k[close]
    if not j.numel():
        return none, none, rows.new_zeros(0)
    if live is not None:
        j, k = live[j], live[k]
    s = best_scale(rows[k], rows[j], scales)
    ok = row_residual(rows[k], rows[j], s) <= tol
    return j[ok], k[ok], s[ok]


def duplicate_units(rows: torch.Tensor, keep: torch.Tensor, scales: str, tol: float, sketch: Sketch | None = None):
    """Units among ``keep`` whose rows equal another's up to an allowed factor: components of the "equal rows"
    graph (scipy's connected components), each merged into its smallest unit. Returns ``(dups, roots, s)`` with
    ``rows[dups] = s * rows[roots]`` (tensors, empty when there are none)."""
    live = torch.nonzero(keep).flatten()
    j, k, _ = _near_pairs(rows, scales, tol, live=None if bool(keep.all()) else live, sketch=sketch)
    if not j.numel():
        return j, k, rows.new_zeros(0)
    n = rows.shape[0]
    graph = coo_matrix((np.ones(j.numel()), (j.cpu().numpy(), k.cpu().numpy())), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    root = np.full(labels.max() + 1, n)
    np.minimum.at(root, labels, np.arange(n))
    root_of = root[labels]
    dups = np.flatnonzero(root_of != np.arange(n))
    dup_t = torch.as_tensor(dups, dtype=torch.long, device=rows.device)
    root_t = torch.as_tensor(root_of[dups], dtype=torch.long, device=rows.device)
    return dup_t, root_t, best_scale(rows[root_t], rows[dup_t], scales)


#: Columns whose incrementally updated squared norm falls below this fraction of the largest are recomputed exactly
#: before the dead-unit test (the updates subtract, so their rounding is relative to the old norms).
_RECHECK = 1e-4


def _reduce_layer(net: DenseNet, i: int, rep: LayerReduction, alive: list[torch.Tensor], tol: float,
                  colsq: list, sketches: list, full: bool = True) -> bool:
    """One pass over hidden layer ``i``; returns whether anything changed. Removed units are zeroed and marked in
    ``alive[i]`` (the arrays are compacted once, at the end: no copy of a wide matrix per pass). ``colsq[i]`` holds
    the squared outgoing norms of layer ``i``'s units, updated as rows and columns change instead of recomputed. With
    ``full=False`` only dead units are looked for (what a change of the neighbouring layers' rows or of this layer's
    merges can create). ``sketches[i]`` is the :class:`Sketch` of layer ``i``'s rows, computed when first needed and
    dropped when the rows change (zeroed rows are zeroed in it)."""
    blk, nxt = net.blocks[i], net.blocks[i + 1]
    fam = blk.family
    aug = blk.aug
    live = alive[i]
    if colsq[i] is None:
        colsq[i] = _column_sumsq(nxt.weight)
    cs = colsq[i]
    scale = at_least_tiny(cs[live].max())
    low = torch.nonzero(live & (cs <= _RECHECK * scale)).flatten()
    if low.numel():
        cs[low] = nxt.weight[:, low].square().sum(0)
    # (a) dead: no outgoing weight
    dead = (cs <= tol * tol * scale) & live
    if full:
        # (b) constant: no incoming weight; sigma(b_j) goes into the next bias
        row_scale = at_least_tiny(torch.linalg.vector_norm(aug, dim=1).max())
        const = (blk.weight.norm(dim=1) <= tol * row_scale) & live & ~dead
    else:
        const = torch.zeros_like(dead)
    rep.dead.extend(torch.nonzero(dead).flatten().tolist())
    if const.any():
        idx = torch.nonzero(const).flatten()
        value = blk.activate(blk.bias[idx])
        nxt.aug[:, -1] += nxt.weight[:, idx] @ value
        if torch.any(value != 0):
            nxt.has_bias = True
        rep.constant.extend(idx.tolist())
    gone = dead | const
    # (c) duplicates up to an allowed factor, merged into the first unit of their component
    if full:
        if sketches[i] is None:
            sketches[i] = Sketch.of(aug)
        dup_t, root_t, s = duplicate_units(aug, live & ~gone, fam.scales, tol, sketch=sketches[i])
    else:
        dup_t = torch.zeros(0, dtype=torch.long, device=aug.device)
    if dup_t.numel():
        mult, off = fam.latent(s)
        nxt.weight.index_add_(1, root_t, nxt.weight[:, dup_t] * mult)
        if torch.any(off != 0):
            nxt.aug[:, -1] += nxt.weight[:, dup_t] @ off
            nxt.has_bias = True
        rep.merged.extend(zip(dup_t.tolist(), root_t.tolist()))
        gone[dup_t] = True
        roots = torch.unique(root_t)
        cs[roots] = nxt.weight[:, roots].square().sum(0)
    if not bool(gone.any()):
        return False
    idx = torch.nonzero(gone).flatten()
    live[idx] = False
    if i > 0 and colsq[i - 1] is not None:  # these rows held outgoing weights of layer i - 1's units
        colsq[i - 1] -= blk.weight[idx].square().sum(0)
        colsq[i - 1].clamp_(min=0.0)
    blk.aug[idx] = 0.0
    if sketches[i] is not None:
        sketches[i].zero_rows(idx)
    nxt.weight[:, idx] = 0.0
    if i + 1 < len(sketches):  # the next layer's rows changed (columns removed, constants or merges folded in)
        sketches[i + 1] = None
    cs[idx] = 0.0
    return True


def _compact(aug: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """``aug[rows][:, cols]`` (``None``: all) in one new tensor, filled chunk by chunk of rows."""
    if rows is None and cols is None:
        return aug
    n = aug.shape[0] if rows is None else rows.numel()
    out = empty((n, aug.shape[1] if cols is None else cols.numel()), aug.dtype, aug.device)
    for sl in _chunks(n, aug.shape[1], aug.element_size()):
        part = aug[sl] if rows is None else aug.index_select(0, rows[sl])
        if cols is None:
            out[sl] = part
        else:
            torch.gather(part, 1, cols.expand(part.shape[0], -1), out=out[sl])
    return out


def _column_sumsq(w: torch.Tensor) -> torch.Tensor:
    """Squared norms of the columns of ``w``, chunk by chunk of rows (no temporary of the matrix's size)."""
    out = torch.zeros(w.shape[1], dtype=w.dtype, device=w.device)
    ones = torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
    for sl in _chunks(w.shape[0], w.shape[1], w.element_size()):
        part = w[sl].square()
        out.addmv_(part.T, ones[: part.shape[0]])  # 3x faster than part.sum(0)
    return out


def bypass_pairs(rows: torch.Tensor, homogeneous: bool, tol: float,
                 sketch: Sketch | None = None) -> list[tuple[int, int]]:
    """Pairs of units with opposite incoming rows (up to a positive factor when ``homogeneous``)."""
    j, k, s = _near_pairs(rows, "nonzero" if homogeneous else "sign", tol, sketch=sketch)
    opposite = (s < 0) & ((s + 1).abs() <= tol) if not homogeneous else s < 0
    lo, hi = torch.minimum(j, k)[opposite], torch.maximum(j, k)[opposite]
    return sorted(set(zip(lo.tolist(), hi.tolist())))


def reduce_to_submodel(net: DenseNet, tol: float, *, inplace: bool = False,
                       sketches: list | None = None) -> tuple[DenseNet, list[LayerReduction]]:
    """Remove dead units, fold constant units and merge duplicated units in every hidden layer.

    Args:
        net: parsed network (not modified, unless ``inplace``: then its arrays are reused, which saves a copy of
            every weight when the caller has no further use for it).
        sketches: a list to fill with one :class:`~layerwise.algorithms._match.Sketch` per hidden layer of the
            reduced network (its rows' key projections and their directions), for the first extraction sweep.
        tol: relative tolerance: a weight vector is zero when its norm is at most ``tol`` times the largest in
            its layer; two rows are duplicates when their relative residual under the best allowed factor is at
            most ``tol``.

    Returns:
        The reduced network (same function) and one :class:`LayerReduction` per hidden layer.
    """
    if not inplace:
        net = net.copy()
    reports = [LayerReduction(width_before=b.width, kept=list(range(b.width))) for b in net.hidden]
    alive = [torch.ones(b.width, dtype=torch.bool, device=b.aug.device) for b in net.hidden]
    colsq: list = [None] * len(net.hidden)
    sketch: list = [None] * len(net.hidden)
    # A change in layer i alters the rows of layer i + 1 (new constants or duplicates possible: a full pass) and the
    # outgoing columns of layers i - 1 and i (merged or removed columns can leave a unit dead: a dead-unit pass).
    full = set(range(len(net.hidden)))
    dead_only: set[int] = set()
    while full or dead_only:
        i = min(full | dead_only)
        is_full = i in full
        full.discard(i)
        dead_only.discard(i)
        if bool(alive[i].any()) and _reduce_layer(net, i, reports[i], alive, tol, colsq, sketch, full=is_full):
            if i + 1 < len(net.hidden):
                full.add(i + 1)
            dead_only |= {j for j in (i - 1, i) if j >= 0 and j not in full}
    # compact every matrix once: its own removed rows and the removed columns of the layer before, in one copy
    keep = [torch.nonzero(a).flatten() if not bool(a.all()) else None for a in alive] + [None]
    for i, blk in enumerate(net.blocks):
        cols = keep[i - 1] if i > 0 else None
        if cols is not None:
            cols = torch.cat([cols, torch.tensor([blk.aug.shape[1] - 1], device=cols.device)])
        blk.aug = _compact(blk.aug, keep[i], cols)
        if i < len(sketch):
            sketch[i] = Sketch.of(blk.aug) if sketch[i] is None else sketch[i].select(keep[i], cols)
    for i, (blk, rep) in enumerate(zip(net.hidden, reports)):
        if keep[i] is not None:
            rep.kept = keep[i].tolist()
        for field_ in (rep.dead, rep.constant):
            field_.sort()
        rep.width_after = blk.width
        if blk.family.bypass is not None:
            rep.bypass = bypass_pairs(blk.aug, blk.family.homogeneous, tol, sketch=sketch[i])
    if sketches is not None:
        sketches[:] = sketch
    return net, reports
