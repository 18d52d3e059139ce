"""Group-consistent alignment of a whole network, and symmetrization (THEORY section 5.3).

``theta_sym = (1/|G|) sum_g k(g)^{-1} . theta^g``: layer ``i`` becomes the group average of
``P_i(g)^{-1} [W_i | b_i] L_{i-1}(g)``, where ``L_{i-1}`` is the (affine) latent action on the layer's input and
``P_i`` the action on its pre-activations (``rho_L`` for the output layer). When both are homomorphisms,
``P_i(h) X' = X' L_{i-1}(h)`` for every ``h``: every layer, hence the network, is exactly equivariant.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .._errors import LayerwiseError
from .._numeric import at_least_tiny
from .._oracle import _check_inputs, _eval_mode
from ..group import MAX_GROUP_ORDER, FiniteGroup
from ..hidden import LatentAction
from ..layers import DenseNet, parse_dense
from ._align import LayerAlignment, consistent_actions, weight_similarity
from ._extract import REDUCE_TOL, extend_to_group, transformed_rows
from ._match import best_scale, scale_from_cosine
from ._reduce import reduce_to_submodel
from ._stats import CorrelationStats


def _group_inputs(group: FiniteGroup, x: torch.Tensor) -> list[torch.Tensor]:
    flat = x.reshape(x.shape[0], -1).double()
    if flat.shape[1] != group.rho_in.shape[1]:
        raise LayerwiseError(
            f"data: {flat.shape[1]} features per sample, the model takes {group.rho_in.shape[1]}"
        )
    return [flat @ torch.as_tensor(group.rho_in[h].T, device=flat.device) for h in range(group.order)]


def _hidden(net: DenseNet, x: torch.Tensor) -> list[torch.Tensor]:
    outs, z = [], x
    for blk in net.hidden:
        z = blk.activate(z @ blk.weight.T + blk.bias)
        outs.append(z)
    return outs


#: Weight of the weight similarity next to activation correlations (a tie-breaker for units inactive on the data).
WEIGHT_TIEBREAK = 1e-2


#: Samples per batch when activation statistics are accumulated over the data.
STATS_BATCH = 4096


def activation_statistics(net: DenseNet, group: FiniteGroup, data: torch.Tensor, batch_size: int = STATS_BATCH,
                          elements: list[int] | None = None) -> list[dict[int, np.ndarray]]:
    """Per hidden layer and group element ``h`` (those in ``elements``, default all), the correlation matrix
    ``S_h[j, i] = corr(f(h x)_j, f(x)_i)`` over ``data``, accumulated in batches (one pass, memory independent of
    the number of samples). Returns one ``{h: S_h}`` per hidden layer."""
    elements = list(range(group.order)) if elements is None else list(elements)
    stats = [{h: CorrelationStats() for h in elements} for _ in net.hidden]
    ref = net.blocks[0].aug
    mats = {h: torch.as_tensor(group.rho_in[h].T, dtype=ref.dtype, device=ref.device) for h in elements}
    flat = data.reshape(data.shape[0], -1).to(device=ref.device, dtype=ref.dtype)
    if flat.shape[1] != group.rho_in.shape[1]:
        raise LayerwiseError(f"data: {flat.shape[1]} features per sample, the model takes {group.rho_in.shape[1]}")
    with torch.no_grad():
        for batch in flat.split(batch_size):
            base = _hidden(net, batch)
            for h in elements:
                moved = base if h == 0 else _hidden(net, batch @ mats[h])
                for i, (z, zh) in enumerate(zip(base, moved)):
                    stats[i][h].update(z, zh)
    return [{h: s.correlation() for h, s in layer.items()} for layer in stats]


def align_network(
    net: DenseNet, group: FiniteGroup, data: torch.Tensor | None = None
) -> list[LayerAlignment]:
    """Group-consistent latent actions of every hidden layer, from activations on ``data`` or from weights.

    Layers are aligned in order: layer ``i``'s weight similarity under ``h`` compares ``[W_i L_{i-1}(h) | ...]``
    with ``[W_i | b_i]``, using the actions already chosen for layer ``i-1``. With ``data`` the similarity is the
    correlation of activations, plus ``WEIGHT_TIEBREAK`` times the weight similarity, which decides only for units
    that are (nearly) inactive on the data and so have no informative correlation.
    """
    out: list[LayerAlignment] = []
    # an involution's matching reads only the generator's similarities; larger groups read every element's
    needed = [group.generator_index(group.names[0])] if group.order == 2 else list(range(group.order))
    corr = activation_statistics(net, group, data, elements=needed) if data is not None else None
    device = net.blocks[0].aug.device
    prev: list[LatentAction | torch.Tensor] = [torch.as_tensor(group.rho_in[h], device=device)
                                               for h in range(group.order)]
    for i, blk in enumerate(net.hidden):
        moved = {h: transformed_rows(blk.aug, prev[h]) for h in needed}
        sims = np.zeros((group.order, blk.width, blk.width), dtype=np.float32 if net.dtype == torch.float32 else None)
        for h in needed:
            sims[h] = weight_similarity(blk.aug, moved[h])
        cosines = {h: sims[h] for h in needed} if corr is None else {h: sims[h].copy() for h in needed}
        if corr is not None:
            for h in needed:
                sims[h] = (WEIGHT_TIEBREAK * sims[h] + corr[i][h]) / (1 + WEIGHT_TIEBREAK)
        al = consistent_actions(sims, group, blk.family, net.dtype)
        out.append(al)
        scaled = {name: chain_action(blk, moved[h], act.perm, pre.scale, cosines[h])
                  for (name, act), pre in zip(al.latent.items(), al.pre.values())
                  for h in [group.generator_index(name)]}
        prev = extend_to_group(group, scaled)[0]
    return out


def chain_action(blk, moved: torch.Tensor, perm, sign, cos: np.ndarray | None = None) -> LatentAction:
    """The latent action a weight alignment ``(perm, sign)`` of layer ``blk`` implies for the next layer: for
    rescalable units (ReLU, powers) the factor of each matched row ``moved[j] ~ s_j aug[perm[j]]`` is fitted, since
    the next layer sees this layer through those rescalings too. ``cos``, the cosines of ``moved`` against
    ``aug`` (:func:`weight_similarity`) when the caller has them, saves a pass over the gathered rows."""
    perm = torch.as_tensor(perm)  # latent actions of the alignment live on the CPU
    if blk.family.homogeneous and cos is not None:
        dev = blk.aug.device
        c = torch.as_tensor(cos[np.arange(len(perm)), perm.numpy()], dtype=torch.float64)
        norm_a = torch.linalg.vector_norm(blk.aug, dim=1).double().cpu()[perm]
        norm_b = torch.linalg.vector_norm(moved.to(dev), dim=1).double().cpu()
        s = scale_from_cosine(c, norm_a, norm_b, blk.family.scales)
    elif blk.family.homogeneous:
        s = best_scale(blk.aug[perm.to(blk.aug.device)], moved, blk.family.scales).double().cpu()
    else:
        s = torch.as_tensor(sign, dtype=torch.float64)
    mult, off = blk.family.latent(s)
    return LatentAction(perm, mult, off)


def _average(net: DenseNet, group: FiniteGroup, alignments: list[LayerAlignment] | None) -> DenseNet:
    """Group average of every layer; ``alignments=None`` is the naive average (identity on hidden layers)."""
    net = net.to(torch.float64)
    order = group.order
    device = net.blocks[0].aug.device
    prev_all: list = [torch.as_tensor(group.rho_in[h], device=device) for h in range(order)]
    for i, blk in enumerate(net.blocks):
        hidden = i < len(net.hidden)
        if hidden and alignments is not None:
            pre_all = extend_to_group(group, alignments[i].pre)[0]
            lat_all = extend_to_group(group, alignments[i].latent)[0]
        total = torch.zeros_like(blk.aug)
        for h in range(order):
            y = transformed_rows(blk.aug, prev_all[h] if (i == 0 or alignments is not None) else
                                 LatentAction.identity(blk.weight.shape[1]))
            if not hidden:
                y = torch.linalg.solve(torch.as_tensor(group.rho_out[h], device=device), y)
            elif alignments is not None:
                y = pre_all[h].inverse().apply_rows(y)
            total += y
        blk.aug = total / order
        if hidden and alignments is not None:
            prev_all = lat_all
    return net


def symmetrize(
    model: nn.Module,
    generators: dict,
    data: torch.Tensor | None = None,
    *,
    balance: bool = True,
    max_group_order: int = MAX_GROUP_ORDER,
    return_alignment: bool = False,
    device: torch.device | str | None = None,
):
    """An exactly equivariant network close to ``model``: the group average with group-consistent latent actions.

    Args:
        model: dense ``nn.Sequential`` as for :func:`layerwise.extract`; never modified.
        generators: ``{name: (input_action, output_action)}``.
        data: inputs ``(N, ...)`` to align units by their activations (correlations); without, by weights.
            CNNs (``Conv2d [BatchNorm2d] act [AvgPool2d(2)] ... AdaptiveAvgPool2d(1) Flatten Linear ...``) take
            spatial generators (``"hflip"``, ``"vflip"``, ``"rot90"``) and ``(N, C, H, W)`` data; the average is
            taken in filter space, so the result is a CNN again (BatchNorm folded).
        balance: normalize the incoming rows of ReLU-type and polynomial layers first (a hidden symmetry, so the
            function is unchanged), so that aligned units are averaged at comparable scales. The model is always
            reduced to its identifiable submodel first (dead, constant and duplicated units have no partner), so
            the returned model may be narrower.
        return_alignment: also return the per-layer :class:`LayerAlignment` (quality and cost of consistency).
        device: where to compute, dense models only (default: where the model's weights are); the activation
            statistics and the averages run there, and the returned model lives there.

    Returns:
        A new ``nn.Sequential`` with the same module types and dtype (and the alignments if asked).

    Example:
        >>> import torch, layerwise
        >>> from layerwise.testing import planted_mlp, perturb
        >>> model, planted = planted_mlp("tanh", group="z2", widths=(16,), seed=0)
        >>> sym = layerwise.symmetrize(perturb(model, 0.05), planted.generators)
        >>> layerwise.extract(sym, planted.generators).equivariant
        True
    """
    from ..group import FiniteGroup as _FG
    from ..layers._conv import is_cnn

    if is_cnn(model):
        from ._symmetrize_cnn import symmetrize_cnn

        return symmetrize_cnn(model, generators, data, balance=balance, max_group_order=max_group_order,
                              return_alignment=return_alignment)
    net = parse_dense(model, device=device)
    group = _FG.from_generators(generators, net.in_features, net.out_features, max_order=max_group_order)
    if data is not None:
        data = _check_inputs(data, model)
    # Dead, constant and duplicated units have no partner to align with: reduce first (the function is unchanged).
    net, _ = reduce_to_submodel(net, REDUCE_TOL[net.dtype])
    net = net.to(torch.float64)
    if balance:
        for i, blk in enumerate(net.hidden):
            if blk.family.homogeneous and blk.width:
                net.transport(i, 1.0 / at_least_tiny(blk.aug.norm(dim=1)))
    alignments = align_network(net, group, data)
    out = _average(net, group, alignments).to_module()
    return (out, alignments) if return_alignment else out


def naive_average(model: nn.Module, generators: dict, *, max_group_order: int = MAX_GROUP_ORDER,
                  device: torch.device | str | None = None) -> nn.Sequential:
    """The group average without alignment (hidden units matched to themselves): the baseline that alignment must
    beat (Bökman & Kahl 2023). Only the first and last layers see the group; it is not equivariant in general."""
    from ..layers._conv import is_cnn

    if is_cnn(model):
        from ._symmetrize_cnn import symmetrize_cnn

        return symmetrize_cnn(model, generators, balance=False, max_group_order=max_group_order, aligned=False)
    net = parse_dense(model, device=device)
    group = FiniteGroup.from_generators(generators, net.in_features, net.out_features, max_order=max_group_order)
    return _average(net, group, None).to_module()


def align(model: nn.Module, generators: dict, data: torch.Tensor | None = None, *,
          max_group_order: int = MAX_GROUP_ORDER, device: torch.device | str | None = None) -> list[LayerAlignment]:
    """Group-consistent latent actions of every hidden layer of a (trained, approximately equivariant) model.

    Each :class:`LayerAlignment` holds per-generator actions (``.latent``, ``.pre``) that form a homomorphism of the
    whole group, the similarity they achieve (``.quality``) and what unconstrained assignment would achieve.
    ``device`` (dense models): where the similarities and activation statistics are computed; the returned actions
    are on the CPU.
    """
    from ..layers._conv import is_cnn

    if is_cnn(model):  # channel alignments, as symmetrize computes them
        from ._symmetrize_cnn import symmetrize_cnn

        return symmetrize_cnn(model, generators, data, max_group_order=max_group_order, return_alignment=True)[1]
    net = parse_dense(model, device=device)
    group = FiniteGroup.from_generators(generators, net.in_features, net.out_features, max_order=max_group_order)
    if data is not None:
        data = _check_inputs(data, model)
        with _eval_mode(model):
            return align_network(net, group, data)
    return align_network(net, group, None)
