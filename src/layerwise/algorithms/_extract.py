"""Exact extraction of latent group actions (THEORY section 2, made constructive).

For each generator ``g``: start from the input action ``k_0(g) = rho_0(g)``; for each hidden layer find the unique
``k_i(g)`` in the layer's hidden symmetry group with ``f_i(k_{i-1}(g) z) = k_i(g) f_i(z)`` (a row match of
``[W k_{i-1} | W c + b]`` against ``[W | b]``); finally check ``f_L(k_{L-1}(g) z) = rho_L(g) f_L(z)``. The worst
relative residual is the certificate. The generator actions are then extended to the whole group along its Cayley
table, every relation is checked, positive rescalings are removed (the cocycle of a finite group into positive
scalars is a coboundary: average the log-scales over the group), and the sweep is repeated on the returned model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .._errors import LayerwiseError
from .._memory import empty
from .._numeric import at_least_tiny
from ..group import MAX_GROUP_ORDER, FiniteGroup
from ..hidden import LatentAction
from ..layers import DenseNet, parse_dense
from ._match import Sketch, best_scale, canonical_keys, chunk_rows, match_rows, nearest_keys, verify_rows
from ._reduce import LayerReduction, reduce_to_submodel

#: Certificate tolerance on the worst relative residual, by the model's dtype.
DEFAULT_TOL = {torch.float32: 1e-4, torch.float64: 1e-8}
#: Relative tolerance of the reduction (zero weights, duplicated rows), by dtype.
REDUCE_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


class _Mover:
    """The map ``[W | b] -> [W K | W c + b]`` of a monomial :class:`LatentAction` ``K z + c``, prepared once and
    applied to any rows (a whole matrix or a chunk of it)."""

    def __init__(self, act: LatentAction, like: torch.Tensor):
        # actions found on the CPU (alignment) may meet weights elsewhere
        self.inv = torch.argsort(act.perm).to(like.device)
        col_scale = act.scale.to(device=like.device, dtype=like.dtype)[self.inv]
        self.col_scale = None if bool(torch.all(col_scale == 1)) else col_scale
        offset = act.offset64.to(device=like.device, dtype=like.dtype)
        self.offset = offset if bool(torch.any(offset != 0)) else None

    def __call__(self, aug: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        w = aug[:, :-1]
        if out is None:
            out = torch.empty_like(aug)
        # (W K)[:, c] = W[:, inv[c]] * scale[inv[c]]: one gather with a broadcast index (3x faster than a
        # column index_select, which is strided here)
        torch.gather(w, 1, self.inv.expand(w.shape[0], -1), out=out[:, :-1])
        if self.col_scale is not None:
            out[:, :-1] *= self.col_scale
        out[:, -1] = aug[:, -1]
        if self.offset is not None:
            out[:, -1] += w @ self.offset
        return out


def transformed_rows(aug: torch.Tensor, prev: LatentAction | torch.Tensor,
                     offset: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[W K | W c + b]``: the rows ``aug = [W | b]`` seen through the input action ``K z + c`` (a monomial
    :class:`LatentAction` with its own offset, or a dense matrix ``K`` with ``c = offset``, zero by default).
    ``out`` (same shape and dtype, not overlapping ``aug``) is written and returned instead of a new tensor."""
    if isinstance(prev, LatentAction):
        return _Mover(prev, aug)(aug, out)
    w = aug[:, :-1]
    if out is None:
        out = torch.empty_like(aug)
    # small (d_in columns): exact enough in float64
    out[:, :-1] = (w.double() @ prev.to(device=w.device, dtype=torch.float64)).to(w.dtype)
    out[:, -1] = aug[:, -1]
    if offset is not None:
        out[:, -1] += w @ offset.to(device=w.device, dtype=w.dtype)
    return out


def _verify_moved(aug: torch.Tensor, prev, perm: torch.Tensor, scales: str):
    """:func:`verify_rows` of ``aug`` against its rows moved by ``prev``, which are built chunk by chunk into one
    small buffer (a wide layer's moved rows would cost a full-size tensor: its page faults and one more pass)."""
    if not isinstance(prev, LatentAction):
        return verify_rows(aug, transformed_rows(aug, prev), perm, scales)
    mover = _Mover(prev, aug)
    step = min(aug.shape[0], chunk_rows(aug.shape[1], aug.element_size()))
    buf = torch.empty(step, aug.shape[1], dtype=aug.dtype, device=aug.device)
    return verify_rows(aug, lambda sl: mover(aug[sl], out=buf[: sl.stop - sl.start]), perm, scales)


def output_residual(aug: torch.Tensor, prev, rho_out: torch.Tensor, offset: torch.Tensor | None = None) -> float:
    """Worst relative row residual of the output layer ``aug`` seen through the last latent action (``prev``, with
    ``offset`` for a dense matrix) against ``rho_out [W | b]``; rows below 1e-3 of the largest use that floor."""
    got = transformed_rows(aug, prev, offset)
    want = (rho_out.double() @ aug.double()).to(got.dtype)
    err = (got - want).norm(dim=1)
    norms = torch.maximum(got.norm(dim=1), want.norm(dim=1))
    floor = 1e-3 * float(norms.max()) if norms.numel() else 0.0
    if not err.numel():
        return 0.0
    return float((err / norms.clamp_min(max(floor, 1e-300))).max())


@dataclass
class _Sweep:
    actions: list[dict[str, LatentAction]]
    residuals: list[dict[str, float]]
    output: dict[str, float]
    fallbacks: int


def _sweep(net: DenseNet, group: FiniteGroup, tol: float, canonical: bool, known: _Sweep | None = None) -> _Sweep:
    """One pass over the layers per generator. With ``known`` (an earlier sweep of the same units) the permutations
    are taken from it and only verified: the canonical move rescales and flips units but never reorders them."""
    actions: list[dict[str, LatentAction]] = [{} for _ in net.hidden]
    residuals: list[dict[str, float]] = [{} for _ in net.hidden]
    output: dict[str, float] = {}
    fallbacks = 0
    device = net.blocks[0].weight.device
    work = None  # the moved rows of every layer, one buffer (a fresh wide tensor costs its page faults)
    for name in group.names:
        h = group.generator_index(name)
        prev: LatentAction | torch.Tensor = torch.as_tensor(group.rho_in[h], dtype=torch.float64, device=device)
        for i, blk in enumerate(net.hidden):
            scales = blk.family.canonical_scales if canonical else blk.family.scales
            if known is not None:
                m = _verify_moved(blk.aug, prev, known.actions[i][name].perm, scales)
            else:
                if work is None:
                    work = empty((max(b.aug.numel() for b in net.hidden),), net.dtype, device)
                m = match_rows(blk.aug, transformed_rows(blk.aug, prev, out=work[:blk.aug.numel()].view(
                    blk.aug.shape)), scales, tol)
            fallbacks += m.n_fallback
            mult, off = blk.family.latent(m.scale)
            prev = LatentAction(m.perm, mult, off, dtype=net.dtype)
            actions[i][name] = prev
            residuals[i][name] = m.worst
            if i in net.post:  # a nonlinear map after the activation (max pooling): carry the action through it
                carried = net.post[i].carry(name, prev)
                if carried is None:  # the action does not commute with it: a failed certificate
                    residuals[i][name] = max(m.worst, 1.0)
                    carried = net.post[i].fallback(prev)
                prev = carried
        rho_out = torch.as_tensor(group.rho_out[h], dtype=torch.float64, device=device)
        output[name] = output_residual(net.blocks[-1].aug, prev, rho_out)
    return _Sweep(actions, residuals, output, fallbacks)


def _moved_keys(aug: torch.Tensor, prev, scales: str, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw key projections onto the directions ``d`` and canonical keys of the rows ``[W K | W c + b]`` without
    building them: for a monomial ``K``, ``[W K | W c + b] D = [W | b] Q`` with ``Q = [K D_w + c d_b ; d_b]`` (one
    matmul)."""
    if not isinstance(prev, LatentAction):  # the input action of the first layer: its rows are few columns wide
        proj = transformed_rows(aug, prev) @ d
        return proj, canonical_keys(proj, scales)
    perm = prev.perm.to(aug.device)
    scale = prev.scale.to(device=aug.device, dtype=aug.dtype)
    offset = prev.offset64.to(device=aug.device, dtype=aug.dtype)
    q = torch.empty_like(d)
    q[:-1] = d[:-1][perm] * scale[:, None] + offset[:, None] * d[-1]  # (K D_w)[j] = scale_j D_w[perm_j]
    q[-1] = d[-1]
    proj = aug @ q
    return proj, canonical_keys(proj, scales)


def _quick_sweep(net: DenseNet, group: FiniteGroup, tol: float, sketches: list[Sketch] | None = None) -> _Sweep | None:
    """The first sweep on keys alone: each moved row is matched to the row with the nearest key (random
    projections of canonical representatives), and its factor is read off the projections. No full row is read
    twice; :func:`extract` then verifies everything in its final sweep. Returns None (the full sweep is needed)
    when a key is not matched within ``10 tol``, two rows claim one partner, or the network has nonlinear maps
    between layers (max pooling). ``sketches`` are the layers' :class:`Sketch` es when the caller has them."""
    if net.post:
        return None
    actions: list[dict[str, LatentAction]] = [{} for _ in net.hidden]
    residuals: list[dict[str, float]] = [{} for _ in net.hidden]
    device = net.blocks[0].weight.device
    own = sketches or [Sketch.of(blk.aug) for blk in net.hidden]  # each layer's own keys, for all generators
    own_keys = [sk.keys(blk.family.scales) for sk, blk in zip(own, net.hidden)]
    for name in group.names:
        h = group.generator_index(name)
        prev: LatentAction | torch.Tensor = torch.as_tensor(group.rho_in[h], dtype=torch.float64, device=device)
        for i, blk in enumerate(net.hidden):
            n = blk.width
            scales = blk.family.scales
            pa, ka = own[i].proj, own_keys[i]
            pb, kb = _moved_keys(blk.aug, prev, scales, own[i].dirs)
            choice = nearest_keys(ka, kb) if n else torch.zeros(0, dtype=torch.long, device=device)
            if n and torch.unique(choice).numel() != n:
                return None
            gap = (kb - ka[choice]).norm(dim=1) / at_least_tiny(
                torch.maximum(kb.norm(dim=1), ka[choice].norm(dim=1)))
            worst = float(gap.max()) if n else 0.0
            if not worst <= 10 * tol:
                return None
            s = best_scale(pa[choice], pb, scales)  # proportional rows have proportional projections
            mult, off = blk.family.latent(s.double())
            prev = LatentAction(choice, mult, off, dtype=net.dtype)
            actions[i][name] = prev
            residuals[i][name] = worst
    return _Sweep(actions, residuals, {name: 0.0 for name in group.names}, 0)


def extend_to_group(group: FiniteGroup, gens: dict[str, LatentAction]) -> tuple[list[LatentAction], float]:
    """Latent action of every group element from the generators' (along BFS words), and the worst relation
    residual over the Cayley table (``k(s) k(h) = k(s.h)``; ``inf`` when a permutation part disagrees)."""
    acts: list[LatentAction | None] = [None] * group.order
    acts[0] = next(iter(gens.values())).identity_like()
    for h in range(group.order):  # BFS order: every element's parent comes first
        for s, name in enumerate(group.names):
            t = int(group.table[h, s])
            if acts[t] is None:
                acts[t] = gens[name] @ acts[h]
    worst = 0.0
    for h in range(group.order):
        for s, name in enumerate(group.names):
            worst = max(worst, (gens[name] @ acts[h]).distance(acts[int(group.table[h, s])]))
    return acts, worst  # type: ignore[return-value]


def _sign_gauge(acts: list[LatentAction]) -> torch.Tensor:
    """Per-unit signs ``t`` for the canonical move, from the latent actions of every group element (a homomorphism:
    the relations were checked).

    After flipping units ``t_j = -1`` the multiplier of unit ``i`` under ``h`` becomes
    ``t_i sign(mult_h[i]) t_{perm_h[i]}``. In each orbit, with root ``r`` its smallest unit, every unit ``i`` takes
    the sign that makes it +1 for the first element ``h`` with ``perm_h[i] = r`` (a spanning star of the orbit).
    Signs that are a coboundary (hidden by a choice of unit signs) disappear completely; what is left is the
    cocycle's holonomy, which no choice removes (its stabilizer acts on such a unit by a nontrivial character).
    Which generators carry those unavoidable signs depends on the star, so it is a valid gauge, not the one that
    minimizes negative generator multipliers. Vectorized over units: one pass over the group elements for the
    roots, one for the signs.
    """
    roots = acts[0].perm.clone()
    for a in acts[1:]:
        roots = torch.minimum(roots, a.perm)
    t = torch.zeros(roots.numel(), dtype=torch.float64, device=roots.device)
    for a in acts:
        t = torch.where((t == 0) & (a.perm == roots), torch.where(a.scale < 0, -1.0, 1.0).to(t), t)
    return t


def _canonical_parameters(net: DenseNet, group_actions: list[list[LatentAction]]) -> None:
    """Move to the point of the fiber where latent actions are as simple as the group allows.

    Magnitudes (ReLU, LeakyReLU, polynomial): with ``u_j`` the group average of ``log|mult_h[j]|``, rescaling unit
    ``j``'s output by ``t_j = exp(-u_j)`` makes every ``t_j |mult_h[j]| / t_{perm_h[j]} = 1`` (cocycle identity
    ``u_j = log|mult_g[j]| + u_{perm_g[j]}``): pure permutations. Signs (tanh, sigmoid's affine flips, odd
    powers): :func:`_sign_gauge`.
    """
    for i, (blk, acts) in enumerate(zip(net.hidden, group_actions)):
        if blk.width == 0:
            continue
        for factor in canonical_factors(blk.family, acts):
            net.transport(i, factor)


def canonical_factors(family, acts: list[LatentAction]) -> list[torch.Tensor]:
    """Pre-activation factors (to apply in order) that move one layer to the canonical point of its fiber, from
    the latent actions of all group elements on it (see :func:`_canonical_parameters`)."""
    out = []
    if family.homogeneous:
        logs = torch.stack([a.scale.abs().log() for a in acts]).mean(0)
        out.append(torch.exp(-logs / family.power))  # latent factor exp(-logs)
    if family.scales in ("sign", "nonzero"):
        t = _sign_gauge(acts)
        if torch.any(t < 0):
            out.append(t)
    return out


@dataclass
class ExtractionResult:
    """What :func:`extract` found.

    Attributes:
        equivariant: the certificate holds: ``residual <= tol``.
        residual: worst relative residual over generators, layers, the output check and (when every sweep
            succeeded) the group relations.
        model: reduced, reparameterized ``nn.Sequential``; same function, module types and dtype.
        latent: per hidden layer of ``model``, ``{generator name: LatentAction}``.
        tol: the tolerance used (see :data:`DEFAULT_TOL`).
        group: the enumerated :class:`~layerwise.group.FiniteGroup`.
        group_latent: per hidden layer, the action of every group element (indexed like ``group.words``).
        layer_residuals: per hidden layer, ``{generator: residual}``.
        output_residual: ``{generator: residual}`` of the final check against the output action.
        homomorphism_residual: worst deviation of a group relation on any latent space.
        first_failure: where the certificate first fails (``None`` when equivariant).
        failed_layer: index of the first failing hidden layer (``len(latent)`` for the output layer), or ``None``.
        reduction: per hidden layer of the input model, what the reduction removed or merged.
        families: per hidden layer, the activation family name.
        identifiable: per hidden layer, whether the family's identifiability is established.
        notes: what keeps the model from being identifiable where it was not reduced away (token models:
            rank-deficient value maps, heads with equal score forms).
    """

    equivariant: bool
    residual: float
    model: nn.Sequential
    latent: list[dict[str, LatentAction]]
    tol: float
    group: FiniteGroup
    group_latent: list[list[LatentAction]] = field(repr=False)
    layer_residuals: list[dict[str, float]] = field(repr=False)
    output_residual: dict[str, float] = field(repr=False)
    homomorphism_residual: float = 0.0
    first_failure: str | None = None
    failed_layer: int | None = None
    reduction: list[LayerReduction] = field(default_factory=list, repr=False)
    families: list[str] = field(default_factory=list)
    identifiable: list[bool] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A readable report: certificate, reduction and latent actions per layer."""
        verdict = "CERTIFIED layerwise equivariant" if self.equivariant else "NOT layerwise equivariant"
        lines = [
            f"{verdict}: worst relative residual {self.residual:.3g} (tolerance {self.tol:g}), "
            f"{self.group.describe()}",
        ]
        if self.first_failure:
            lines.append(f"  first failure: {self.first_failure}")
        for i, acts in enumerate(self.latent):
            red = self.reduction[i].summary() if i < len(self.reduction) else ""
            ident = "" if self.identifiable[i] else " [identifiability not established]"
            lines.append(f"  hidden layer {i + 1} ({self.families[i]}{ident}): {red}")
            for name, act in acts.items():
                lines.append(
                    f"    {name}: {act.summary()}  (residual {self.layer_residuals[i][name]:.2g})"
                )
        lines.extend(f"  note: {note}" for note in self.notes)
        out = ", ".join(f"{k} {v:.2g}" for k, v in self.output_residual.items())
        lines.append(f"  output layer check: {out}; group relations: {self.homomorphism_residual:.2g}")
        return "\n".join(lines)


def _first_failure(sweep: _Sweep, tol: float, hom: float, net: DenseNet) -> tuple[str | None, int | None]:
    for i, res in enumerate(sweep.residuals):
        for name, r in res.items():
            if not r <= tol:
                return (f"hidden layer {i + 1} (module index {net.blocks[i].index}), generator {name!r}: "
                        f"residual {r:.3g} > tolerance {tol:g}"), i
    for name, r in sweep.output.items():
        if not r <= tol:
            return (f"output layer (module index {net.blocks[-1].index}), generator {name!r}: "
                    f"residual {r:.3g} > tolerance {tol:g}"), len(sweep.residuals)
    if not hom <= tol:
        return f"group relations do not hold on the latent actions (residual {hom:.3g})", None
    return None, None


def extract(
    model: nn.Module,
    generators: dict,
    *,
    tol: float | None = None,
    max_group_order: int = MAX_GROUP_ORDER,
    canonical: bool = True,
    input_shape: tuple[int, int, int] | None = None,
    device: torch.device | str | None = None,
) -> ExtractionResult:
    """Find every hidden layer's latent group action, exactly, with a certificate.

    Args:
        model: ``nn.Sequential`` of ``nn.Linear`` and activations (Flatten, Identity, Dropout allowed); float32 or
            float64. Never modified.
        generators: ``{name: (input_action, output_action)}``; an action is a permutation (``g.x = x[..., p]``),
            a square matrix (``g.x = x @ M.T``) or ``None`` (trivial). Input actions act on the features that enter
            the first Linear (flattened input).
        tol: certificate tolerance on the worst relative residual (default :data:`DEFAULT_TOL` by dtype).
        max_group_order: refuse groups larger than this.
        canonical: move to the canonical point of the fiber (ReLU-type layers get permutation actions, signs only
            where the group acts by a character). With ``False`` the returned model keeps the input's
            parameterization (reduced only) and the actions are the ones it has.
        input_shape: ``(C, H, W)`` of one input image, required for CNNs (models with ``Conv2d``). For CNNs
            actions may also be ``"hflip"``, ``"vflip"``, ``"rot90"`` on ``(N, C, H, W)`` tensors, and the latent
            action of a convolutional layer is a :class:`SpatialLatentAction` (channel matrix ``.matrix``, offset
            ``.offset``, spatial transform ``.spatial``); see :mod:`layerwise.algorithms._extract_cnn`.
        device: where to compute (default: where the model's weights are).

    Token models (inputs ``(N, T, d)``, with :class:`layerwise.nn.SelfAttention` and optionally
    :class:`layerwise.nn.PositionalEncoding`) take :class:`layerwise.TokenAction` generators and give a
    :class:`~layerwise.hidden.HeadAction` per attention layer; see :mod:`layerwise.algorithms._extract_attention`.

    Returns:
        :class:`ExtractionResult`. A network that is not equivariant gives ``equivariant=False`` and says where
        the sweep first fails; it does not raise.

    Example:
        >>> import torch, layerwise
        >>> from layerwise.testing import planted_mlp, flip_permutation
        >>> model, _ = planted_mlp("tanh", group="z2", image=4, widths=(8, 8), seed=0)
        >>> res = layerwise.extract(model, {"flip": (flip_permutation(4), None)})
        >>> res.equivariant
        True
    """
    from ..layers._attention import is_token_model
    from ..layers._conv import is_cnn

    if is_token_model(model):
        from ._extract_attention import extract_tokens

        if input_shape is not None:
            raise LayerwiseError("input_shape: only CNNs take it; token models read (N, T, d) inputs")
        return extract_tokens(model, generators, tol=tol, max_group_order=max_group_order, canonical=canonical,
                              device=device)
    if is_cnn(model):
        from ._extract_cnn import extract_cnn

        if input_shape is None:
            raise LayerwiseError("input_shape: a CNN needs the (C, H, W) shape of one input image")
        return extract_cnn(model, generators, input_shape=input_shape, tol=tol, max_group_order=max_group_order,
                           canonical=canonical)
    return _extract_dense(model, generators, tol, max_group_order, canonical, device, quick=True)


def _extract_dense(model: nn.Module, generators: dict, tol, max_group_order: int, canonical: bool, device,
                   quick: bool) -> ExtractionResult:
    """:func:`extract` on a dense model. With ``quick`` the first sweep matches rows on keys only
    (:func:`_quick_sweep`); when that is not possible, or when the final sweep (which verifies every row of the
    returned model) fails after it, everything is redone with full verification in both sweeps, so a failure is
    always located by the full sweep."""
    net = parse_dense(model, device=device)
    if tol is None:
        tol = DEFAULT_TOL[net.dtype]
    if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise LayerwiseError(f"tol: expected a positive finite number, got {tol!r}")
    group = FiniteGroup.from_generators(generators, net.in_features, net.out_features, max_order=max_group_order)
    sketches: list[Sketch] = []
    reduced, reports = reduce_to_submodel(net, REDUCE_TOL[net.dtype], inplace=True, sketches=sketches)  # no copy

    first = _quick_sweep(reduced, group, tol, sketches) if quick else None
    if first is None:
        quick = False
        first = _sweep(reduced, group, tol, canonical=False)
    extended = [extend_to_group(group, acts) for acts in first.actions]
    group_latent = [e[0] for e in extended]
    hom = max((e[1] for e in extended), default=0.0)
    failure, failed = _first_failure(first, tol, hom, reduced)
    if failure is not None and quick:  # key gaps are not residuals: locate the failure with the full sweep
        return _extract_dense(model, generators, tol, max_group_order, canonical, device, quick=False)
    if failure is None and canonical:
        _canonical_parameters(reduced, group_latent)
    out_model = reduced.to_module()
    # the returned weights are exactly reduced.aug (same dtype), so the certificate is computed on them directly
    final_net = reduced
    sweep = _sweep(final_net, group, tol, canonical=canonical, known=first) if failure is None else first
    if failure is None:
        extended = [extend_to_group(group, acts) for acts in sweep.actions]
        group_latent = [e[0] for e in extended]
        hom = max((e[1] for e in extended), default=0.0)
        failure, failed = _first_failure(sweep, tol, hom, final_net)
        if failure is not None and quick:
            return _extract_dense(model, generators, tol, max_group_order, canonical, device, quick=False)
    # relations are only meaningful when every generator's sweep succeeded
    sweep_failed = failed is not None
    worst = max(
        [r for res in sweep.residuals for r in res.values()] + list(sweep.output.values())
        + ([] if sweep_failed else [hom])
    )
    return ExtractionResult(
        equivariant=failure is None,
        residual=float(worst),
        model=out_model,
        latent=sweep.actions,
        tol=float(tol),
        group=group,
        group_latent=group_latent,
        layer_residuals=sweep.residuals,
        output_residual=sweep.output,
        homomorphism_residual=float(hom),
        first_failure=failure,
        failed_layer=failed,
        reduction=reports,
        families=[b.family.name for b in reduced.hidden],
        identifiable=[b.family.identifiable for b in reduced.hidden],
    )
