"""Layerwise-equivariance metrics of CNNs (``layerwise_metrics`` on a CNN), channel by channel.

For a generator ``g`` with spatial transform ``T`` and a convolutional layer with output ``z = f_<=i(x)`` of shape
``(N, C, H, W)``, the latent action predicted by the theory is a channel action combined with ``T``, so every
metric compares ``f_<=i(g x)`` with a channel map applied to ``T(f_<=i(x))``, fitted on the rows
``(sample, position)`` of one half of the inputs and evaluated (median over samples of the relative error) on the
other half:

- ``linear``: any affine channel map (``C x C`` and an offset): the equivariant linear maps of the grid;
- ``constrained_activations`` / ``constrained_weights`` / ``consistent``: a channel map in the layer's hidden
  symmetry group, aligned by activation correlations, by filters (layer after layer), or group-consistently.

Dense layers after global pooling are the case ``H = W = 1``.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._errors import LayerwiseError
from .._oracle import _eval_mode
from ..group import MAX_GROUP_ORDER, FiniteGroup, generator_pairs
from ..hidden import LatentAction
from ..layers._conv import SPATIAL, fold_batchnorm, spatial_permutation
from ._align import activation_similarity, best_assignment, consistent_actions, signed_latent, weight_similarity
from ._extract import extend_to_group, transformed_rows
from ._metrics import METRIC_KINDS, LayerMetric, _affine_fit, _fit_factors
from ._symmetrize import chain_action
from ._symmetrize_cnn import _moved_filters, _stages, _word, check_images, units_of


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W) -> (N H W, C)``: one row per sample and position."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _per_sample(target: torch.Tensor, pred_rows: torch.Tensor, base: torch.Tensor) -> float:
    pred = pred_rows.reshape(target.shape[0], target.shape[2], target.shape[3], -1).permute(0, 3, 1, 2)
    err = (target - pred).flatten(1).norm(dim=1) / base.flatten(1).norm(dim=1).clamp_min(1e-12)
    return float(err.median())


def cnn_metrics(model: nn.Module, generators: dict, inputs: torch.Tensor, *, seed: int = 0,
                kinds: tuple[str, ...] = METRIC_KINDS, max_group_order: int = MAX_GROUP_ORDER) -> list[LayerMetric]:
    """:func:`layerwise.layerwise_metrics` for CNNs (spatial generators, ``(N, C, H, W)`` inputs)."""
    folded = fold_batchnorm(model)
    stages = _stages(folded)
    mods = list(folded)
    first = mods[stages[0].index]
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 4 or inputs.shape[1] != first.in_channels:
        raise LayerwiseError(f"inputs: a CNN takes (N, {first.in_channels}, H, W) images, got "
                             f"{tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__}")
    if inputs.shape[0] < 4:
        raise LayerwiseError(f"inputs: need at least 4 samples, got shape {tuple(inputs.shape)}")
    spatial, resolved = {}, {}
    for name, a_in, a_out in generator_pairs(generators):
        if not (isinstance(a_in, str) and a_in in SPATIAL):
            raise LayerwiseError(f"generators[{name!r}][0]: CNN metrics take a spatial action {sorted(SPATIAL)}, got "
                                 f"{a_in!r}")
        spatial[name] = a_in
        resolved[name] = (spatial_permutation(a_in, (1, 8, 8)), a_out)
    group = FiniteGroup.from_generators(resolved, 64, mods[stages[-1].index].out_features, max_order=max_group_order)
    words = [tuple(spatial[s] for s in w) for w in group.words]
    x = check_images(inputs, first.in_channels, "rot90" in spatial.values(), "inputs")
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    fit, ev = order[: x.shape[0] // 2], order[x.shape[0] // 2:]
    params = {s.index: (mods[s.index].weight.detach().double(),
                        mods[s.index].bias.detach().double() if mods[s.index].bias is not None
                        else torch.zeros(mods[s.index].weight.shape[0], dtype=torch.float64))
              for s in stages if s.kind in ("conv", "dense")}

    def hidden(z: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for s in stages:
            if s.kind == "conv":
                w, b = params[s.index]
                z = mods[s.act](F.conv2d(z, w, b, padding=w.shape[-1] // 2))
                outs.append(z)
            elif s.kind == "pool":
                z = F.avg_pool2d(z, 2)
            elif s.kind == "maxpool":
                z = F.max_pool2d(z, 2)
            elif s.kind == "gap":
                z = z.mean(dim=(-2, -1))
            elif s.act is not None:
                w, b = params[s.index]
                z = mods[s.act](z.reshape(z.shape[0], -1) @ w.T + b)
                outs.append(z[:, :, None, None])
        return outs

    with _eval_mode(model), torch.no_grad():
        try:
            acts = [hidden(_word(words[h], x)) for h in range(group.order)]
        except RuntimeError as exc:
            raise LayerwiseError(f"inputs: the model cannot run on images of shape {tuple(x.shape[1:])} "
                                 f"({str(exc).splitlines()[0]})") from None
        layers = [s for s in stages if s.act is not None]
        rows: list[LayerMetric] = []
        prev_w = {n: LatentAction.identity(first.in_channels) for n in group.names}
        for i, s in enumerate(layers):
            w, b = params[s.index]
            if s.kind == "conv":
                aug = torch.cat([w.reshape(w.shape[0], -1), b[:, None]], 1)
            else:
                aug = torch.cat([w, b[:, None]], 1)
            blk = SimpleNamespace(aug=aug, family=s.family)
            z0 = acts[0][i]
            sims = np.stack([activation_similarity(_rows(_word(words[h], z0)[fit]), _rows(acts[h][i][fit]))
                             for h in range(group.order)])
            cons = consistent_actions(sims, group, s.family) if "consistent" in kinds else None
            cons_all = extend_to_group(group, cons.latent)[0] if cons else None
            for name in group.names:
                h = group.generator_index(name)
                zt, zg = _word(words[h], z0), acts[h][i]
                values = dict.fromkeys(METRIC_KINDS, float("nan"))

                def constrained(perm, zt=zt, zg=zg, z0=z0, family=s.family):
                    perm = torch.as_tensor(perm)
                    c, o = _fit_factors(_rows(zg[fit]), _rows(zt[fit])[:, perm], family, None)
                    return _per_sample(zg[ev], _rows(zt[ev])[:, perm] * c + o, z0[ev])

                if "linear" in kinds:
                    fn = _affine_fit(_rows(zt[fit]), _rows(zg[fit]))
                    values["linear"] = _per_sample(zg[ev], fn(_rows(zt[ev])), z0[ev])
                if "constrained_activations" in kinds:
                    perm = best_assignment(sims[h], signed_latent(s.family))[0]
                    values["constrained_activations"] = constrained(perm)
                if "constrained_weights" in kinds:
                    if s.kind == "conv":
                        moved_w = torch.cat([_moved_filters(w, prev_w[name], words[h]).reshape(w.shape[0], -1),
                                             b[:, None]], 1)
                    else:
                        moved_w = transformed_rows(aug, units_of(prev_w[name], w.shape[1], words[h]))
                    perm, sign, _ = best_assignment(weight_similarity(aug, moved_w), signed_latent(s.family))
                    values["constrained_weights"] = constrained(perm)
                    prev_w[name] = chain_action(blk, moved_w, perm, sign)
                if cons_all is not None:
                    values["consistent"] = constrained(cons_all[h].perm)
                rows.append(LayerMetric(layer=i + 1, generator=name, width=int(aug.shape[0]), **values))
    return rows
