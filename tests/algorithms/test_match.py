import pytest
import torch

from layerwise.algorithms import match_rows


def _planted(n, d, scales, gen):
    a = torch.randn(n, d, generator=gen, dtype=torch.float64)
    perm = torch.randperm(n, generator=gen)
    s = {
        "one": torch.ones(n, dtype=torch.float64),
        "sign": torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double(),
        "positive": torch.exp(torch.randn(n, generator=gen, dtype=torch.float64)),
        "nonzero": torch.randn(n, generator=gen, dtype=torch.float64),
    }[scales]
    return a, a[perm] * s[:, None], perm, s


@pytest.mark.parametrize("scales", ["one", "sign", "positive", "nonzero"])
@pytest.mark.parametrize("n", [1, 7, 500])
def test_exact_matches_are_found_without_fallback(scales, n):
    gen = torch.Generator().manual_seed(n)
    a, b, perm, s = _planted(n, 20, scales, gen)
    m = match_rows(a, b, scales, 1e-10)
    assert torch.equal(m.perm, perm)
    torch.testing.assert_close(m.scale, s, rtol=1e-12, atol=0)
    assert m.worst < 1e-13 and m.n_fallback == 0


def test_near_duplicate_keys_still_match_through_the_window_or_fallback():
    # many rows differing in one coordinate by tiny amounts: the first key barely separates them
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, 30, generator=gen, dtype=torch.float64).repeat(200, 1)
    base[:, 0] += torch.arange(200, dtype=torch.float64) * 1e-3
    perm = torch.randperm(200, generator=gen)
    m = match_rows(base, base[perm], "one", 1e-12)
    assert torch.equal(m.perm, perm)


def test_mismatched_rows_report_their_residual():
    gen = torch.Generator().manual_seed(3)
    a, b, perm, _ = _planted(50, 10, "positive", gen)
    b[7] = torch.randn(10, generator=gen, dtype=torch.float64)
    m = match_rows(a, b, "positive", 1e-10)
    assert m.residual[7] > 1e-3 and m.n_fallback >= 1
    others = torch.ones(50, dtype=torch.bool)
    others[7] = False
    assert m.residual[others].max() < 1e-12
    assert sorted(m.perm.tolist()) == list(range(50))  # always a permutation


def test_sign_group_refuses_other_magnitudes():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    m = match_rows(a, 2.0 * a, "sign", 1e-8)
    assert m.worst > 0.3
    m = match_rows(a, 2.0 * a, "positive", 1e-8)
    assert m.worst < 1e-12


@pytest.mark.parametrize("scales", ["one", "sign", "positive", "nonzero"])
def test_keys_are_invariant_under_the_scale_group_and_separate_other_rows(scales):
    from layerwise.algorithms._match import row_keys

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(50, 30, generator=g, dtype=torch.float64)
    factor = {"one": torch.ones(50, dtype=torch.float64),
              "sign": torch.where(torch.rand(50, generator=g) < 0.5, -1.0, 1.0).double(),
              "positive": torch.rand(50, generator=g, dtype=torch.float64) * 5 + 0.1,
              "nonzero": (torch.rand(50, generator=g, dtype=torch.float64) * 5 + 0.1)
              * torch.where(torch.rand(50, generator=g) < 0.5, -1.0, 1.0).double()}[scales]
    k1 = row_keys(rows, scales, seed=0)
    k2 = row_keys(rows * factor[:, None], scales, seed=0)
    assert torch.allclose(k1, k2, atol=1e-12)
    gaps = torch.cdist(k1, k1) + torch.eye(50, dtype=torch.float64)
    assert float(gaps.min()) > 1e-3  # distinct rows keep distinct keys


def test_chunked_verification_of_moved_rows_equals_the_built_rows(monkeypatch):
    """The final sweep builds the moved rows chunk by chunk into one small buffer; the residuals and factors must
    equal those against the whole moved matrix, across chunk boundaries and with scales and offsets."""
    import layerwise.algorithms._match as match
    from layerwise.algorithms._extract import _verify_moved, transformed_rows
    from layerwise.hidden import LatentAction

    monkeypatch.setattr(match, "_CHUNK_BYTES", 7 * 41 * 8)  # 7 rows per chunk
    g = torch.Generator().manual_seed(1)
    aug = torch.randn(30, 41, generator=g, dtype=torch.float64)
    act = LatentAction(torch.randperm(40, generator=g), torch.randn(40, generator=g, dtype=torch.float64),
                       torch.randn(40, generator=g, dtype=torch.float64))
    perm = torch.randperm(30, generator=g)
    for scales in ("one", "sign", "positive", "nonzero"):
        got = _verify_moved(aug, act, perm, scales)
        want = match.verify_rows(aug, transformed_rows(aug, act), perm, scales)
        assert torch.equal(got.perm, want.perm)
        assert torch.allclose(got.scale, want.scale) and torch.allclose(got.residual, want.residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("scales", ["one", "sign", "positive", "nonzero"])
def test_zero_rows_match_in_both_dtypes(scales, dtype):
    """Zero rows give zero keys and go to the assignment fallback; its costs must stay finite in float32 too (a guard
    of 1e-300 rounds to 0 there)."""
    from layerwise.algorithms import match_rows

    g = torch.Generator().manual_seed(0)
    A = torch.randn(20, 9, generator=g, dtype=dtype)
    A[[3, 7]] = 0.0
    p = torch.randperm(20, generator=g)
    factor = {"one": 1.0, "sign": -1.0, "positive": 3.0, "nonzero": -0.5}[scales]
    m = match_rows(A, A[p] * factor, scales, 1e-4 if dtype == torch.float32 else 1e-8)
    assert torch.isfinite(m.residual).all() and m.worst <= 1e-5
    nonzero = A[p].norm(dim=1) > 0
    assert torch.equal(m.perm[nonzero], p[nonzero])
