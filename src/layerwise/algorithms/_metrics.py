"""How close a trained network is to layerwise equivariance (THEORY section 5), per hidden layer.

For a generator ``g`` and hidden layer ``i``, with ``z = f_<=i(x)`` and ``z_g = f_<=i(g x)`` on the inputs, fit on
one half and report, on the other half, the median over inputs of ``|z_g - A z| / |z|`` where ``A`` is

- ``linear``: any matrix and offset, by least squares (Lenc & Vedaldi 2015; the paper's table fits a matrix only;
  the offset makes sigmoid's affine flips ``1 - z`` exact too);
- ``constrained_activations``: an element of the layer's hidden symmetry group: a unit alignment from the
  correlation matrix of activations (linear assignment), with the best allowed factor per unit (positive for ReLU,
  a sign or the affine flip ``1 - z`` for tanh and sigmoid, any for polynomials, none for GELU);
- ``constrained_weights``: the same with the alignment found from weights, layer after layer;
- ``consistent``: the group-consistent alignment of :func:`layerwise.align` (its permutation is a homomorphism
  of the whole group), with the best allowed factor per unit.

Zero means exactly layerwise equivariant under that kind of action; a control transformation or an untrained
network gives the scale of "not equivariant".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .._errors import LayerwiseError
from .._numeric import at_least_tiny
from .._oracle import _check_inputs, _eval_mode
from ..group import MAX_GROUP_ORDER, FiniteGroup
from ..hidden import ActivationFamily
from ..layers import parse_dense
from ._align import activation_similarity, best_assignment, signed_latent, weight_similarity
from ._extract import REDUCE_TOL, extend_to_group, transformed_rows
from ._reduce import reduce_to_submodel
from ._symmetrize import _group_inputs, _hidden, align_network, chain_action

METRIC_KINDS = ("linear", "constrained_activations", "constrained_weights", "consistent")


@dataclass
class LayerMetric:
    """Median relative errors of layer ``layer`` (1-based, of the reduced model) under generator ``generator``."""

    layer: int
    generator: str
    width: int
    linear: float
    constrained_activations: float
    constrained_weights: float
    consistent: float

    def as_dict(self) -> dict:
        return asdict(self)


def _median_rel(target: torch.Tensor, pred: torch.Tensor, base: torch.Tensor) -> float:
    err = (target - pred).norm(dim=1) / base.norm(dim=1).clamp_min(1e-12)
    return float(err.median())


def _affine_fit(z: torch.Tensor, zg: torch.Tensor):
    """Least-squares ``zg ~ z A^T + c`` (ridge ``1e-8`` of the mean feature energy: units that are constant on the
    fit half must not explode on the other half)."""
    ones = torch.ones(z.shape[0], 1, dtype=z.dtype)
    za = torch.cat([z, ones], 1)
    gram = za.T @ za
    ridge = 1e-8 * float(gram.diagonal().mean()) * torch.eye(gram.shape[0], dtype=z.dtype)
    sol = torch.linalg.solve(gram + ridge, za.T @ zg)
    return lambda x: torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1) @ sol


def _fit_factors(zg: torch.Tensor, zp: torch.Tensor, family: ActivationFamily, sign: torch.Tensor):
    """Per-unit best allowed map ``zg_j ~ c_j zp_j + o_j`` (``zp`` already permuted), fitted on the given rows."""
    n = zg.shape[1]
    if family.affine_flip:  # z or 1 - z
        keep = ((zg - zp) ** 2).sum(0)
        flip = ((zg - (1 - zp)) ** 2).sum(0)
        c = torch.where(flip < keep, -1.0, 1.0).double()
        return c, (1 - c) / 2
    if family.scales == "one":
        return torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    dot = (zg * zp).sum(0)
    nn2 = at_least_tiny((zp * zp).sum(0))
    if family.scales == "sign":
        return torch.where(dot < 0, -1.0, 1.0).double(), torch.zeros(n, dtype=torch.float64)
    c = dot / nn2
    if not signed_latent(family):  # ReLU, even powers: the latent factor is positive
        c = c.clamp_min(0.0)
    return c, torch.zeros(n, dtype=torch.float64)


def _constrained(z, zg, perm, family, fit, ev) -> float:
    perm = torch.as_tensor(perm)
    c, o = _fit_factors(zg[fit], z[fit][:, perm], family, None)
    pred = z[ev][:, perm] * c + o
    return _median_rel(zg[ev], pred, z[ev])


def layerwise_metrics(
    model: nn.Module,
    generators: dict,
    inputs: torch.Tensor,
    *,
    seed: int = 0,
    kinds: tuple[str, ...] = ("linear", "constrained_activations", "constrained_weights", "consistent"),
    max_group_order: int = MAX_GROUP_ORDER,
) -> list[LayerMetric]:
    """Per hidden layer and generator, the four layerwise-equivariance errors of the module docstring.

    Args:
        model: dense ``nn.Sequential`` (as for :func:`layerwise.extract`); never modified.
        generators: ``{name: (input_action, output_action)}``; the output actions matter only for the group check.
        inputs: ``(N, ...)`` data or noise; half (at random, seeded) fits, half evaluates. Use ``N`` well above
            the widest layer (the least-squares fit has ``width^2`` unknowns).
        kinds: which errors to compute (the others are NaN); the group-consistent one is the slowest.

    CNNs take spatial generators (``"hflip"``, ...) and ``(N, C, H, W)`` inputs; their convolutional layers are
    measured channel by channel against ``T(f(x))`` (see :mod:`layerwise.algorithms._metrics_cnn`).

    Example:
        >>> import torch, layerwise
        >>> from layerwise.testing import planted_mlp
        >>> model, planted = planted_mlp("tanh", group="z2", widths=(16,), seed=0, dtype=torch.float64)
        >>> rows = layerwise.layerwise_metrics(model, planted.generators, torch.randn(400, 16, dtype=torch.float64))
        >>> rows[0].constrained_activations < 1e-10
        True
    """
    unknown = set(kinds) - set(METRIC_KINDS)
    if unknown:
        raise LayerwiseError(f"kinds: unknown {sorted(unknown)}; choose from {list(METRIC_KINDS)}")
    from ..layers._conv import is_cnn

    if is_cnn(model):
        from ._metrics_cnn import cnn_metrics

        return cnn_metrics(model, generators, inputs, seed=seed, kinds=kinds, max_group_order=max_group_order)
    x = _check_inputs(inputs, model)
    net = parse_dense(model)
    # the theorem speaks of the identifiable submodel: dead units, say, are not layerwise equivariant but harmless
    net = reduce_to_submodel(net, REDUCE_TOL[net.dtype])[0].to(torch.float64)
    group = FiniteGroup.from_generators(generators, net.in_features, net.out_features, max_order=max_group_order)
    n_samples = x.shape[0]
    if n_samples < 4:
        raise LayerwiseError(f"inputs: need at least 4 samples (fit on one half, test on the other), got {n_samples}")
    order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))
    fit, ev = order[: n_samples // 2], order[n_samples // 2 :]
    with _eval_mode(model), torch.no_grad():
        xs = _group_inputs(group, x)
        acts = [_hidden(net, xh) for xh in xs]
        consistent = align_network(net, group, x[fit]) if "consistent" in kinds else None
        rows: list[LayerMetric] = []
        # weight-based alignment, per generator, layer after layer (unconstrained assignment on cosines)
        prev_w = {name: torch.as_tensor(group.rho_in[group.generator_index(name)]) for name in group.names}
        weight_perm: list[dict[str, np.ndarray]] = []
        for blk in net.hidden if "constrained_weights" in kinds else []:
            layer = {}
            for name in group.names:
                moved = transformed_rows(blk.aug, prev_w[name])
                perm, sign, _ = best_assignment(weight_similarity(blk.aug, moved), signed_latent(blk.family))
                layer[name] = perm
                prev_w[name] = chain_action(blk, moved, perm, sign)
            weight_perm.append(layer)
        for i, blk in enumerate(net.hidden):
            z = acts[0][i]
            cons_all = extend_to_group(group, consistent[i].latent)[0] if consistent else None
            for name in group.names:
                h = group.generator_index(name)
                zg = acts[h][i]
                values = dict.fromkeys(METRIC_KINDS, float("nan"))
                if "linear" in kinds:
                    values["linear"] = _median_rel(zg[ev], _affine_fit(z[fit], zg[fit])(z[ev]), z[ev])
                if "constrained_activations" in kinds:
                    sim = activation_similarity(z[fit], zg[fit])
                    perm, _, _ = best_assignment(sim, signed_latent(blk.family))
                    values["constrained_activations"] = _constrained(z, zg, perm, blk.family, fit, ev)
                if "constrained_weights" in kinds:
                    values["constrained_weights"] = _constrained(z, zg, weight_perm[i][name], blk.family, fit, ev)
                if cons_all is not None:
                    values["consistent"] = _constrained(z, zg, cons_all[h].perm, blk.family, fit, ev)
                rows.append(LayerMetric(layer=i + 1, generator=name, width=blk.width, **values))
    return rows
