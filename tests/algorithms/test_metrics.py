import pytest
import torch

import layerwise
from layerwise.testing import perturb, planted_mlp, vflip_permutation

KINDS = ["linear", "constrained_activations", "constrained_weights", "consistent"]


@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid", "gelu"])
def test_metrics_vanish_on_planted_networks_and_controls_do_not(activation):
    model, planted = planted_mlp(activation, group="z2", widths=(32, 24), seed=0, dtype=torch.float64)
    x = torch.randn(3000, 16, dtype=torch.float64)
    rows = layerwise.layerwise_metrics(model, planted.generators, x)
    assert [r.layer for r in rows] == [1, 2]
    for r in rows:
        assert r.linear < 1e-6  # the affine fit carries a 1e-8 ridge
        for k in KINDS[1:]:
            assert getattr(r, k) < 1e-10, (r, k)
    control = layerwise.layerwise_metrics(model, {"vflip": (vflip_permutation(4), None)}, x)
    for r in control:
        assert r.linear > 0.05 and r.constrained_activations > 0.1


def test_constrained_is_never_below_linear_much_and_grows_with_noise():
    model, planted = planted_mlp("tanh", group="z2", widths=(32, 24), seed=0, dtype=torch.float64,
                                 dead=0, constant=0, duplicates=0)
    x = torch.randn(3000, 16, dtype=torch.float64)
    small = layerwise.layerwise_metrics(perturb(model, 0.01, seed=1), planted.generators, x)
    large = layerwise.layerwise_metrics(perturb(model, 0.1, seed=1), planted.generators, x)
    for s, b in zip(small, large):
        assert b.constrained_activations > s.constrained_activations
        assert b.linear > s.linear
        assert s.linear <= s.constrained_activations + 1e-9  # the affine fit contains the constrained one


def test_metrics_bad_inputs():
    model, planted = planted_mlp("tanh", widths=(8,), seed=0)
    with pytest.raises(layerwise.LayerwiseError, match="at least 4 samples"):
        layerwise.layerwise_metrics(model, planted.generators, torch.randn(3, 16))
