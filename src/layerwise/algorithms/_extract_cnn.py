"""Exact extraction for small CNNs, through their dense view (``layers._conv``).

The sweep of :mod:`._extract` runs on the unrolled network, whose hidden units are (channel, position) pairs; on a
convolutional layer the action it finds must then factor as a channel action (the layer's hidden symmetry group
acting on channels) combined with the spatial transform of the generator: ``perm[c, q] = (pi(c), T(q))`` with one
factor per channel. That factorization is checked and reported; a failure counts as a failed certificate.
Before the sweep, dead and duplicated channels are removed (``_reduce_cnn``); after it, a certified network is moved
to the canonical point of its fiber.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from .._errors import LayerwiseError
from ..group import MAX_GROUP_ORDER, FiniteGroup, generator_pairs
from ..hidden import LatentAction
from ..layers._conv import SPATIAL, factor_action, parse_cnn, spatial_permutation
from ._extract import REDUCE_TOL, ExtractionResult, _first_failure, _sweep, canonical_factors, extend_to_group
from ._reduce_cnn import reduce_cnn


@dataclass
class SpatialLatentAction:
    """The latent action of a generator on a convolutional layer: ``z -> channel(T(z))`` on ``(N, C, H, W)``.

    Attributes:
        channel: the channel action (a :class:`LatentAction` on ``C`` channels).
        spatial: the name of the spatial transform ``T`` (``"hflip"``, ``"vflip"``, ``"rot90"``) or ``None``.
        matrix, offset: the channel matrix (``C x C``) and offset, as ``channel.matrix`` / ``channel.offset``.
    """

    channel: LatentAction
    spatial: str | None

    @property
    def matrix(self) -> torch.Tensor:
        return self.channel.matrix

    @property
    def offset(self) -> torch.Tensor:
        return self.channel.offset

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        moved = SPATIAL[self.spatial](z) if self.spatial else z
        s = self.channel.scale.to(z.dtype)[:, None, None]
        return moved[..., self.channel.perm, :, :] * s + self.channel.offset64.to(z.dtype)[:, None, None]

    def summary(self) -> str:
        return f"{self.spatial or 'no spatial transform'} x channels: {self.channel.summary()}"

    def __repr__(self) -> str:
        return f"SpatialLatentAction({self.summary()})"


def _resolve(action, shape: tuple[int, ...], where: str):
    """A spatial string becomes the permutation of the flattened tensor; other actions pass through."""
    if isinstance(action, str):
        if len(shape) != 3:
            raise LayerwiseError(f"{where}: spatial action {action!r} needs (C, H, W) tensors, got shape {shape}")
        return spatial_permutation(action, shape), action
    return action, None


def _apply_canonical(folded: nn.Sequential, net, group, group_latent) -> nn.Sequential:
    """A copy of the (BatchNorm-folded) CNN moved to the canonical point of its fiber: per conv layer the factors
    come from the channel actions, per dense layer from the unit actions (:func:`canonical_factors`); each factor
    scales a layer's output channels or units and the next affine layer's inputs compensate."""
    model = copy.deepcopy(folded)
    affine = [i for i, m in enumerate(model) if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for k, (blk, acts) in enumerate(zip(net.hidden, group_latent)):
            for factor in canonical_factors(blk.family, acts):
                if blk.family.affine_flip and torch.any(factor < 0):
                    continue  # a sigmoid flip would put a position-dependent offset into the next convolution
                cur, nxt = model[affine[k]], model[affine[k + 1]]
                f = factor.to(cur.weight.dtype)
                mult, _ = blk.family.latent(f)
                cur.weight.mul_(f.view(-1, *([1] * (cur.weight.ndim - 1))))
                cur.bias.mul_(f)
                w = nxt.weight
                if w.shape[1] == mult.numel():  # channels (conv, or dense after global pooling) or units
                    w.div_(mult.view(1, -1, *([1] * (w.ndim - 2))))
                else:  # dense after Flatten of (C, H, W): C blocks of H W columns
                    w.div_(mult.repeat_interleave(w.shape[1] // mult.numel())[None, :])
    return model


def extract_cnn(
    model: nn.Module, generators: dict, *, input_shape, tol: float | None = None,
    max_group_order: int = MAX_GROUP_ORDER, canonical: bool = True, _canonical_sweep: bool = False,
) -> ExtractionResult:
    """:func:`layerwise.extract` for CNNs; ``input_shape = (C, H, W)`` of one input image. With ``canonical``, a
    certified network is moved to the canonical point of its fiber (ReLU-type channels get permutation actions,
    signs only where the group acts by a character) and certified again."""
    from ._extract import DEFAULT_TOL

    net, layout, folded = parse_cnn(model, input_shape)
    reports = []
    if not _canonical_sweep:  # (the canonical second pass runs on an already reduced model)
        folded, reports = reduce_cnn(folded, [b.family for b in net.hidden], REDUCE_TOL[net.dtype])
        if any(r.width_after != r.width_before for r in reports):
            net, layout, folded = parse_cnn(folded, input_shape)
    tol = DEFAULT_TOL[net.dtype] if tol is None else tol
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise LayerwiseError(f"tol: expected a positive finite number, got {tol!r}")
    resolved, spatial = {}, {}
    for name, act_in, act_out in generator_pairs(generators):
        a_in, spatial[name] = _resolve(act_in, layout.input_shape, f"generators[{name!r}][0]")
        a_out, _ = _resolve(act_out, layout.output_shape, f"generators[{name!r}][1]")
        resolved[name] = (a_in, a_out)
    group = FiniteGroup.from_generators(resolved, net.in_features, net.out_features, max_order=max_group_order)
    for post in net.post.values():
        post.spatial = spatial
    # after the canonical move, ReLU-type factors are matched as exactly 1 (permutations), as for MLPs
    sweep = _sweep(net, group, tol, canonical=_canonical_sweep)
    extended = [extend_to_group(group, acts) for acts in sweep.actions]
    hom = max((e[1] for e in extended), default=0.0)
    failure, failed = _first_failure(sweep, tol, hom, net)
    latent: list[dict] = []
    group_latent: list[list[LatentAction]] = []
    for i, (acts, shape) in enumerate(zip(sweep.actions, layout.hidden_shapes)):
        if len(shape) != 3:
            latent.append(acts)
            group_latent.append(extended[i][0])
            continue
        layer = {}
        for name, act in acts.items():
            ch = factor_action(act, shape, spatial[name])
            if ch is None:
                if failure is None:
                    failure, failed = (f"hidden layer {i + 1}: the action of {name!r} is not a channel action "
                                       f"combined with {spatial[name] or 'no spatial transform'}"), i
                ch = LatentAction.identity(shape[0], net.dtype)
            layer[name] = SpatialLatentAction(ch, spatial[name])
        latent.append(layer)
        group_latent.append(extend_to_group(group, {n: a.channel for n, a in layer.items()})[0])
    worst = max([r for res in sweep.residuals for r in res.values()] + list(sweep.output.values())
                + ([] if failed is not None else [hom]))
    if failure is not None and worst <= tol:
        worst = 1.0  # the factorization failed although every match verified
    if failure is None and canonical:
        moved = _apply_canonical(folded, net, group, group_latent)
        result = extract_cnn(moved, generators, input_shape=input_shape, tol=tol, max_group_order=max_group_order,
                             canonical=False, _canonical_sweep=True)
        result.reduction = reports
        return result
    return ExtractionResult(
        equivariant=failure is None, residual=float(worst), model=folded, latent=latent, tol=float(tol),
        group=group, group_latent=group_latent, layer_residuals=sweep.residuals, output_residual=sweep.output,
        homomorphism_residual=float(hom), first_failure=failure, failed_layer=failed, reduction=reports,
        families=[b.family.name for b in net.hidden], identifiable=[b.family.identifiable for b in net.hidden],
    )
