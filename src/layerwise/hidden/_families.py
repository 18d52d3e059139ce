"""Hidden symmetry groups of pointwise activations (THEORY section 3).

A dense layer ``z -> sigma(W z + b)`` has hidden symmetries ``k`` acting on its output such that scaling row ``j``
of ``[W | b]`` by an allowed factor ``s`` (and permuting rows) changes the output by a known map of unit ``j``:
``sigma(s u) = mult(s) * sigma(u) + offset(s)``. The allowed factors form one of four scale groups:

- ``"one"``: only ``s = 1`` (GELU, SiLU, Softplus, ELU, Mish): permutations only;
- ``"sign"``: ``s = +-1`` (odd activations such as tanh; sigmoid, whose flip is affine: ``1 - z``);
- ``"positive"``: ``s > 0`` (ReLU, LeakyReLU: positive homogeneity);
- ``"nonzero"``: ``s != 0`` (polynomial ``t**m``: monomial matrices, latent scale ``s**m``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._errors import LayerwiseError
from ..nn import Power

SCALE_GROUPS = ("one", "sign", "positive", "nonzero")


@dataclass(frozen=True)
class ActivationFamily:
    """What the hidden symmetry group of a pointwise activation is, and how it acts on a unit.

    Attributes:
        name: short name of the activation.
        scales: the allowed factors of a unit's incoming row (one of :data:`SCALE_GROUPS`).
        power: latent multiplier is ``s**power`` (1 except for polynomial activations).
        affine_flip: ``s = -1`` maps the unit's output ``z`` to ``1 - z`` (sigmoid).
        identifiable: whether identifiability (up to the group) is established in the literature.
        bypass: ``c`` with ``sigma(x) - sigma(-x) = c x`` (a pair of opposite units acts linearly), else ``None``.
    """

    name: str
    scales: str
    power: int = 1
    affine_flip: bool = False
    identifiable: bool = True
    bypass: float | None = None

    def latent(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Multiplier and offset on a unit's output when its incoming row is scaled by ``s``."""
        if self.affine_flip:
            return s.sign(), (1.0 - s.sign()) / 2.0
        return s**self.power, torch.zeros_like(s)

    @property
    def canonical_scales(self) -> str:
        """Scale group left after the canonical parameter choice removes positive magnitudes."""
        return {"positive": "one", "nonzero": "sign"}.get(self.scales, self.scales)

    @property
    def homogeneous(self) -> bool:
        """Positive rescalings of a unit are hidden symmetries (the magnitude cocycle can be removed)."""
        return self.scales in ("positive", "nonzero")


def family_of(module: nn.Module, where: str) -> ActivationFamily:
    """The :class:`ActivationFamily` of an activation module; LayerwiseError naming it if unsupported."""
    if isinstance(module, nn.ReLU):
        return ActivationFamily("relu", "positive", bypass=1.0)
    if isinstance(module, nn.LeakyReLU):
        slope = float(module.negative_slope)
        if slope < 0:
            raise LayerwiseError(f"{where}: LeakyReLU with negative_slope={slope} < 0 is not supported")
        return ActivationFamily("leaky_relu", "positive", bypass=1.0 + slope)
    if isinstance(module, nn.Tanh):
        return ActivationFamily("tanh", "sign")
    if isinstance(module, nn.Softsign):
        return ActivationFamily("softsign", "sign", identifiable=False)
    if isinstance(module, nn.Sigmoid):
        return ActivationFamily("sigmoid", "sign", affine_flip=True)
    if isinstance(module, Power):
        return ActivationFamily(f"power{module.m}", "nonzero", power=module.m)
    if isinstance(module, nn.GELU):
        return ActivationFamily("gelu", "one", identifiable=False, bypass=1.0)
    if isinstance(module, nn.SiLU):
        return ActivationFamily("silu", "one", identifiable=False, bypass=1.0)
    if isinstance(module, nn.Softplus):
        return ActivationFamily("softplus", "one", identifiable=False, bypass=1.0)
    if isinstance(module, (nn.ELU, nn.Mish)):
        return ActivationFamily(type(module).__name__.lower(), "one", identifiable=False)
    raise LayerwiseError(
        f"{where}: unsupported module {type(module).__name__}; supported activations are ReLU, LeakyReLU, Tanh, "
        "Softsign, Sigmoid, layerwise.nn.Power, GELU, SiLU, Softplus, ELU, Mish"
    )
