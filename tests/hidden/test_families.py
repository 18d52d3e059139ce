import pytest
import torch
from torch import nn

from layerwise import LayerwiseError
from layerwise.hidden import family_of
from layerwise.nn import Power

MODULES = [nn.ReLU(), nn.LeakyReLU(0.2), nn.Tanh(), nn.Softsign(), nn.Sigmoid(), Power(2), Power(3), nn.GELU(),
           nn.SiLU(), nn.Softplus(), nn.ELU(), nn.Mish()]


def _allowed_factors(scales: str) -> torch.Tensor:
    return {
        "one": torch.tensor([1.0]),
        "sign": torch.tensor([1.0, -1.0]),
        "positive": torch.tensor([0.3, 1.0, 2.5]),
        "nonzero": torch.tensor([0.3, -0.7, 1.0, -2.5]),
    }[scales].double()


@pytest.mark.parametrize("module", MODULES, ids=lambda m: type(m).__name__ + str(getattr(m, "m", "")))
def test_latent_map_of_every_allowed_factor_is_exact(module):
    # the defining identity of the hidden symmetry group: sigma(s u) = mult(s) sigma(u) + offset(s)
    fam = family_of(module, "act")
    u = torch.linspace(-4, 4, 101, dtype=torch.float64)
    for s in _allowed_factors(fam.scales):
        mult, off = fam.latent(s.reshape(1))
        torch.testing.assert_close(module(s * u), mult * module(u) + off, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("module", [m for m in MODULES if family_of(m, "a").bypass is not None],
                         ids=lambda m: type(m).__name__)
def test_bypass_constant(module):
    fam = family_of(module, "act")
    u = torch.linspace(-4, 4, 101, dtype=torch.float64)
    torch.testing.assert_close(module(u) - module(-u), fam.bypass * u, rtol=1e-12, atol=1e-12)


def test_non_identifiable_families_are_flagged():
    assert not family_of(nn.GELU(), "a").identifiable
    assert family_of(nn.Tanh(), "a").identifiable


def test_unsupported_module_is_named():
    with pytest.raises(LayerwiseError, match=r"model\[3\]: unsupported module Hardswish"):
        family_of(nn.Hardswish(), "model[3]")


@pytest.mark.parametrize("m", [0, -1, 1.5, True])
def test_power_rejects_bad_exponent(m):
    with pytest.raises(LayerwiseError, match="Power"):
        Power(m)
