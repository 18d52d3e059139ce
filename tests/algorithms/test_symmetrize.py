import copy

import pytest
import torch

import layerwise
from layerwise.testing import perturb, planted_mlp


def _dist(a, b, x):
    with torch.no_grad():
        return float((a(x) - b(x)).norm() / b(x).norm())


@pytest.mark.parametrize("source", ["data", "weights"])
@pytest.mark.parametrize("group", ["z2", "d4"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid", "gelu", "power3", "leaky_relu"])
def test_symmetrize_is_exactly_equivariant_and_certified(activation, group, source):
    model, planted = planted_mlp(activation, group=group, widths=(32, 24), seed=1)  # float32
    noisy = perturb(model, 0.05, seed=2)
    before = copy.deepcopy(noisy.state_dict())
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(3))
    sym = layerwise.symmetrize(noisy, planted.generators, x if source == "data" else None)
    assert layerwise.equivariance_error(sym, planted.generators, x) < 1e-5  # float32
    assert layerwise.extract(sym, planted.generators).equivariant
    assert all(p.dtype == torch.float32 for p in sym.parameters())
    assert [type(m) for m in sym] == [type(m) for m in noisy]
    for k, v in noisy.state_dict().items():  # the input is untouched
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid", "gelu"])
def test_an_equivariant_network_is_a_fixed_point(activation):
    model, planted = planted_mlp(activation, group="d4", widths=(32, 24), seed=0, dtype=torch.float64)
    x = torch.randn(500, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert _dist(layerwise.symmetrize(model, planted.generators), model, x) < 1e-12
    assert _dist(layerwise.symmetrize(model, planted.generators, x), model, x) < 1e-12
    # without alignment the average changes the function
    assert _dist(layerwise.naive_average(model, planted.generators), model, x) > 1e-3


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu"])
def test_symmetrize_removes_noise(activation):
    # the aligned average of a perturbed equivariant network is closer to the clean one than the perturbed one is
    model, planted = planted_mlp(activation, group="d4", widths=(32, 24), seed=0, dtype=torch.float64,
                                 dead=0, constant=0, duplicates=0)
    noisy = perturb(model, 0.02, seed=1)
    x = torch.randn(2000, 16, dtype=torch.float64)
    sym = layerwise.symmetrize(noisy, planted.generators, x)
    assert _dist(sym, model, x) < _dist(noisy, model, x)
    assert _dist(sym, model, x) < 0.5 * _dist(layerwise.naive_average(noisy, planted.generators), model, x)


def test_alignment_is_returned_with_its_cost():
    model, planted = planted_mlp("tanh", group="d4", widths=(32,), seed=0)
    sym, al = layerwise.symmetrize(perturb(model, 0.05), planted.generators, return_alignment=True)
    assert len(al) == 1 and 0 < al[0].quality <= al[0].unconstrained + 1e-12 and al[0].cost >= -1e-12


def test_bad_data_raises():
    model, planted = planted_mlp("tanh", widths=(8,), seed=0)
    with pytest.raises(layerwise.LayerwiseError, match="features"):
        layerwise.symmetrize(model, planted.generators, torch.randn(10, 15))
