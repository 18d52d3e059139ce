"""How close each head of a trained attention model is to the head-permutation action (the attention counterpart of
:func:`layerwise.layerwise_metrics`).

Per attention layer, generator and head ``h``, against the head permutation ``pi`` that the weights give
(:func:`layerwise.extract` with ``canonical=False``, which returns the best assignment even when nothing certifies):

- ``score``: relative residual of ``Mhat^T B_h Mhat = B_{pi(h)}`` (weights; :attr:`HeadAction.score_residual`);
- ``value``: relative residual of the least-squares per-head map (weights; :attr:`HeadAction.value_residual`);
- ``map``: on data, ``|A_h(g x) - P A_{pi(h)}(x) P^T| / |A_h(g x) - U|`` (Frobenius per input, mean over inputs;
  ``U`` is uniform attention, so that structureless maps do not pass for equivariant ones).

Averaging heads over the group (``symmetrize``) is not offered for attention: see :func:`layerwise.symmetrize`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .._errors import LayerwiseError
from .._oracle import _check_inputs, _eval_mode, _feature_action
from ..group import MAX_GROUP_ORDER
from ..nn import SelfAttention


@dataclass(frozen=True)
class HeadMetric:
    """One head of one attention layer under one generator (see the module docstring)."""

    layer: int  # index of the attention layer among the hidden layers of ``extract``'s result
    generator: str
    head: int
    partner: int  # pi(head): the head it is matched to
    score: float
    value: float
    map: float

    def as_dict(self) -> dict:
        return asdict(self)


def head_metrics(model: nn.Module, generators: dict, data: torch.Tensor, *,
                 max_group_order: int = MAX_GROUP_ORDER) -> list[HeadMetric]:
    """Per attention layer, generator and head: the head permutation found from the weights and how well it holds,
    on the weights (``score``, ``value``) and on the attention maps of ``data`` (``map``).

    Args:
        model: a token model (see :func:`layerwise.extract`); never modified.
        generators: ``{name: (input_action, output_action)}`` with :class:`~layerwise.TokenAction` actions.
        data: inputs ``(N, T, d)``.

    Example:
        >>> import torch, layerwise
        >>> from layerwise.testing import planted_attention
        >>> model, planted = planted_attention("z2", seed=0)
        >>> rows = layerwise.head_metrics(model, planted.generators, torch.randn(8, 16, 8))
        >>> sorted(r.partner for r in rows), max(r.map for r in rows) < 1e-4
        ([0, 1, 2, 3], True)
    """
    from ._extract import extract

    x = _check_inputs(data, model)
    if x.ndim != 3:
        raise LayerwiseError(f"data: expected tokens of shape (N, T, d), got {tuple(x.shape)}")
    res = extract(model, generators, canonical=False, max_group_order=max_group_order)
    mods = list(model)
    att_modules = [i for i, m in enumerate(mods) if isinstance(m, SelfAttention)]
    att_layers = [i for i, f in enumerate(res.families) if f.startswith("attention")]
    if len(att_modules) != len(att_layers):
        raise LayerwiseError("model: attention layers must sit directly in the nn.Sequential (not nested)")
    out = []
    with _eval_mode(model):
        for mi, li in zip(att_modules, att_layers):
            prefix = nn.Sequential(*mods[:mi])
            maps = mods[mi].attention_maps(prefix(x))
            for name, (act_in, _) in generators.items():
                k = res.latent[li][name]
                gx = _feature_action(act_in, x, f"generators[{name!r}][0] (input action)")
                maps_g = mods[mi].attention_maps(prefix(gx))
                p = k.tokens if k.tokens is not None else torch.arange(x.shape[1])
                predicted = maps[:, k.perm][:, :, p][:, :, :, p]
                structure = (maps_g - 1.0 / maps_g.shape[-1]).flatten(2).norm(dim=2)
                err = ((maps_g - predicted).flatten(2).norm(dim=2) / structure.clamp_min(1e-12)).mean(0)
                for h in range(k.num_heads):
                    out.append(HeadMetric(li, name, h, int(k.perm[h]), float(k.score_residual[h]),
                                          float(k.value_residual[h]), float(err[h])))
    return out
