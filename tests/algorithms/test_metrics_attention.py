"""head_metrics: zero on planted heads, large for the wrong flip, clear errors."""

import copy

import pytest
import torch

import layerwise
from layerwise import LayerwiseError
from layerwise.testing import patch_generators, planted_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_planted_heads_have_zero_residuals_and_their_planted_partners(dtype):
    model, planted = planted_attention("z2", seed=2, dtype=dtype)
    x = torch.randn(20, 16, 8, dtype=dtype)
    rows = layerwise.head_metrics(model, planted.generators, x)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert len(rows) == 4 and all(r.layer == 0 and r.generator == "hflip" for r in rows)
    assert max(max(r.score, r.value, r.map) for r in rows) <= tol
    # hidden head j is planted head head_order[j]; partners follow the planted permutation
    planted_perm = planted.heads[planted.group.generator_index("hflip")].perm
    order = planted.head_order
    for r in rows:
        assert order[r.partner] == planted_perm[order[r.head]]


def test_the_wrong_flip_and_a_perturbed_model_show_large_residuals():
    model, planted = planted_attention("z2", seed=2, dtype=torch.float64)
    x = torch.randn(20, 16, 8, dtype=torch.float64)
    wrong = layerwise.head_metrics(model, patch_generators("z2v", 4, 2), x)
    assert max(r.score for r in wrong) > 0.1 and max(r.map for r in wrong) > 0.1
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad[1].attn.in_proj_weight[:2] += 0.1 * torch.randn(2, 8, dtype=torch.float64)
    rows = layerwise.head_metrics(bad, planted.generators, x)
    assert max(r.score for r in rows) > 1e-3


def test_head_metrics_refuses_bad_data():
    model, planted = planted_attention("z2", seed=0)
    with pytest.raises(LayerwiseError, match=r"\(N, T, d\)"):
        layerwise.head_metrics(model, planted.generators, torch.randn(5, 128))
