import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layerwise.hidden import LatentAction


def _random(n, gen, affine=False):
    perm = torch.randperm(n, generator=gen)
    scale = torch.randn(n, generator=gen, dtype=torch.float64)
    off = torch.randn(n, generator=gen, dtype=torch.float64) if affine else None
    return LatentAction(perm, scale, off)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 1000), affine=st.booleans())
def test_composition_matches_affine_maps(n, seed, affine):
    gen = torch.Generator().manual_seed(seed)
    a, b = _random(n, gen, affine), _random(n, gen, affine)
    z = torch.randn(5, n, generator=gen, dtype=torch.float64)
    torch.testing.assert_close((a @ b)(z), a(b(z)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a(z), z @ a.matrix.T + a.offset, rtol=1e-12, atol=1e-12)


def test_character_and_summary():
    # swap units 0,1; fix 2 negated; fix 3
    a = LatentAction(torch.tensor([1, 0, 2, 3]), torch.tensor([1.0, 1.0, -1.0, 1.0], dtype=torch.float64))
    assert a.character() == 0.0
    assert torch.trace(a.matrix) == 0.0
    assert a.summary().startswith("2 fixed (1 negated), 1 swapped pairs")
    assert not a.is_permutation()
    assert LatentAction.identity(3).is_permutation()


def test_distance():
    a = LatentAction.identity(3)
    b = LatentAction(torch.tensor([1, 0, 2]), torch.ones(3, dtype=torch.float64))
    assert a.distance(a) == 0.0
    assert a.distance(b) == float("inf")
    c = LatentAction(torch.arange(3), torch.tensor([1.0, 1.0, 1.5], dtype=torch.float64))
    assert abs(a.distance(c) - 0.5 / 1.5) < 1e-12


def test_matrix_dtype_follows_the_model():
    a = LatentAction(torch.arange(2), torch.ones(2, dtype=torch.float64), dtype=torch.float32)
    assert a.matrix.dtype == torch.float32 and a.offset.dtype == torch.float32


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 10), seed=st.integers(0, 1000), affine=st.booleans())
def test_inverse_and_apply_rows(n, seed, affine):
    gen = torch.Generator().manual_seed(seed)
    a = _random(n, gen, affine)
    a.scale = a.scale.sign() * (a.scale.abs() + 0.1)  # keep it invertible
    z = torch.randn(4, n, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(a.inverse()(a(z)), z, rtol=1e-10, atol=1e-10)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(a.apply_rows(x), a.matrix @ x, rtol=1e-12, atol=1e-12)
