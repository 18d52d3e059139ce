import pytest
import torch
from torch import nn

import layerwise
from layerwise import LayerwiseError
from layerwise.testing import hflip_permutation, planted_mlp, vflip_permutation


def test_equivariance_error_detects_the_wrong_group():
    model, planted = planted_mlp("tanh", group="z2", widths=(16,), seed=0, dtype=torch.float64)
    x = torch.randn(64, 16, dtype=torch.float64)
    assert layerwise.equivariance_error(model, planted.generators, x) < 1e-13
    assert layerwise.equivariance_error(model, {"v": (vflip_permutation(4), None)}, x) > 1e-3


def test_equivariance_error_on_image_shaped_inputs_and_equivariant_outputs():
    model, planted = planted_mlp("relu", group="z2", out="equivariant", widths=(16,), seed=1, dtype=torch.float64)
    flat = nn.Sequential(nn.Flatten(), *model)
    x = torch.randn(16, 4, 4, dtype=torch.float64)
    assert layerwise.equivariance_error(flat, planted.generators, x) < 1e-13
    # the same permutation on the last axis of 4x4 would be the wrong size: refused clearly
    with pytest.raises(LayerwiseError, match="matches neither"):
        layerwise.equivariance_error(flat, {"f": (torch.arange(5), None)}, x)


def test_equivariance_error_restores_training_mode():
    model, planted = planted_mlp("tanh", widths=(8,), seed=0)
    model.train()
    layerwise.equivariance_error(model, planted.generators, torch.randn(4, 16))
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("inputs,match", [
    ([[1.0]], "expected a tensor"),
    (torch.zeros(0, 16), "non-empty batch"),
    (torch.ones(4, 16, dtype=torch.long), "floating point"),
    (torch.full((4, 16), float("nan")), "NaN"),
])
def test_bad_inputs_raise(inputs, match):
    model, planted = planted_mlp("tanh", widths=(8,), seed=0)
    with pytest.raises(LayerwiseError, match=match):
        layerwise.equivariance_error(model, planted.generators, inputs)


def test_layer_errors_and_assert_helper_reject_wrong_actions():
    model, planted = planted_mlp("tanh", group="z2", widths=(16, 12), seed=2, dtype=torch.float64)
    res = layerwise.extract(model, planted.generators)
    x = torch.randn(64, 16, dtype=torch.float64)
    errs = layerwise.layer_equivariance_errors(res.model, res.latent, planted.generators, x)
    assert max(e["hflip"] for e in errs) < 1e-12
    # swap in a wrong latent action: the oracle must notice
    wrong = [dict(d) for d in res.latent]
    wrong[0]["hflip"] = layerwise.LatentAction.identity(wrong[0]["hflip"].size, torch.float64)
    errs = layerwise.layer_equivariance_errors(res.model, wrong, planted.generators, x)
    assert errs[0]["hflip"] > 1e-2
    res.latent = wrong
    with pytest.raises(AssertionError, match="hidden layer 1"):
        layerwise.assert_layerwise_equivariant(res, x, planted.generators)


def test_homomorphism_residual_catches_a_broken_relation():
    model, planted = planted_mlp("relu", group="d4", widths=(24,), seed=0, dtype=torch.float64)
    res = layerwise.extract(model, planted.generators)
    acts = list(res.group_latent[0])
    assert layerwise.homomorphism_residual(res.group, acts) == 0.0
    acts[3] = acts[2]
    assert layerwise.homomorphism_residual(res.group, acts) == float("inf")


def test_hflip_permutation_is_an_involution():
    p = hflip_permutation(5, 3)
    assert torch.equal(p[p], torch.arange(15))
