"""HeadAction: composition, identity and cycle type agree with the dense block matrices."""

import torch

from layerwise import HeadAction


def _random(h=4, dv=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(h, generator=g)
    mats = torch.randn(h, dv, dv, generator=g, dtype=torch.float64) + 2 * torch.eye(dv, dtype=torch.float64)
    return HeadAction(perm, mats, torch.randn(h * dv, generator=g, dtype=torch.float64), torch.randperm(5, generator=g))


def test_composition_is_the_product_of_the_affine_maps():
    a, b = _random(seed=1), _random(seed=2)
    z = torch.randn(7, 12, dtype=torch.float64)
    assert torch.allclose((a @ b)(z), a(b(z)), atol=1e-12)
    assert torch.allclose((a @ b).matrix, a.matrix @ b.matrix, atol=1e-12)
    assert torch.equal((a @ b).tokens, b.tokens[a.tokens])  # x[:, b][:, a]


def test_identity_cycle_type_character_and_distance():
    a = _random()
    ident = a.identity_like()
    assert a.distance(a @ ident) < 1e-12 and a.distance(ident @ a) < 1e-12
    swap = HeadAction(torch.tensor([1, 0, 2]), torch.stack([torch.eye(2, dtype=torch.float64)] * 3))
    assert swap.cycle_type() == [1, 2]
    assert swap.character() == 2.0  # only head 2 is fixed
    assert swap.distance(swap.identity_like()) == float("inf")
    assert "1 fixed, 1 swapped pairs" in swap.summary() and "orthogonal" in swap.summary()
