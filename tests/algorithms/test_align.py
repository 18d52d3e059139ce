import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import layerwise
from layerwise.algorithms import consistent_actions, extend_to_group, involution_matching
from layerwise.group import FiniteGroup
from layerwise.hidden import family_of
from layerwise.testing import ACTIVATIONS, image_generators, perturb, planted_mlp


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 30), seed=st.integers(0, 10_000), signed=st.booleans())
def test_involution_matching_returns_involutions(n, seed, signed):
    sim = np.random.default_rng(seed).uniform(-1, 1, (n, n))
    perm, sign = involution_matching(sim, signed)
    assert np.array_equal(perm[perm], np.arange(n))
    assert np.array_equal(sign[perm], sign)  # a swapped pair carries one sign: k(g)^2 = 1
    if not signed:
        assert np.all(sign == 1)


def test_involution_matching_is_optimal_on_a_small_case():
    # brute force over all involutions (with signs) of 5 units
    rng = np.random.default_rng(1)
    sim = rng.uniform(-1, 1, (5, 5))
    perm, sign = involution_matching(sim, True, candidates=4)
    got = (sim[np.arange(5), perm] * sign).sum()

    def involutions(items):
        if not items:
            yield {}
            return
        a, rest = items[0], items[1:]
        for sub in involutions(rest):
            yield {**sub, a: a}
        for i, b in enumerate(rest):
            for sub in involutions(rest[:i] + rest[i + 1 :]):
                yield {**sub, a: b, b: a}

    best = -np.inf
    for inv in involutions(list(range(5))):
        total = 0.0
        for a, b in inv.items():
            if a == b:
                total += abs(sim[a, a])
            elif a < b:
                total += abs(sim[a, b] + sim[b, a])
        best = max(best, total)
    assert got == pytest.approx(best)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 24), seed=st.integers(0, 10_000), activation=st.sampled_from(["tanh", "relu", "sigmoid"]))
def test_coset_greedy_always_gives_a_homomorphism_of_d4(n, seed, activation):
    group = FiniteGroup.from_generators(image_generators("d4", 4), 16, 1)
    sims = np.random.default_rng(seed).uniform(-1, 1, (group.order, n, n))
    al = consistent_actions(sims, group, family_of(ACTIVATIONS[activation](), "a"))
    acts = extend_to_group(group, al.latent)[0]
    assert layerwise.homomorphism_residual(group, acts) == 0.0
    assert al.quality <= al.unconstrained + 1e-12


@pytest.mark.parametrize("group", ["z2", "d4"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid", "gelu", "power3"])
@pytest.mark.parametrize("source", ["activations", "weights"])
def test_alignment_recovers_the_exact_action_at_small_noise(group, activation, source):
    model, planted = planted_mlp(activation, group=group, widths=(32, 24), seed=0, dtype=torch.float64,
                                 dead=0, constant=0, duplicates=0)
    exact = layerwise.extract(model, planted.generators)
    noisy = perturb(model, 1e-3, seed=1)
    x = torch.randn(3000, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    al = layerwise.align(noisy, planted.generators, x if source == "activations" else None)
    # the extracted model is reparameterized, so compare characters and the number of unit orbits
    for i, layer in enumerate(al):
        acts = extend_to_group(exact.group, layer.latent)[0]
        np.testing.assert_allclose(layerwise.character(acts), layerwise.character(exact.group_latent[i]), atol=1e-9)
        assert layer.quality > 0.97


def test_align_bad_data_raises():
    model, planted = planted_mlp("tanh", widths=(8,), seed=0)
    with pytest.raises(layerwise.LayerwiseError, match="inputs"):
        layerwise.align(model, planted.generators, torch.zeros(0, 16))


def test_involution_matching_repairs_large_problems_locally(monkeypatch):
    """Above EXACT_MATCHING_LIMIT units, consistent pairs of the assignment are kept and the rest re-matched: the
    result is still an involution, and on a noisy planted involution it recovers (nearly) every pair."""
    from layerwise.algorithms import _align

    monkeypatch.setattr(_align, "EXACT_MATCHING_LIMIT", 16)
    rng = np.random.default_rng(0)
    n = 200
    truth = rng.permutation(n).reshape(-1, 2)
    target = np.arange(n)
    target[truth[:, 0]], target[truth[:, 1]] = truth[:, 1], truth[:, 0]
    sim = 0.35 * rng.uniform(-1, 1, (n, n))
    sim[np.arange(n), target] += 1.0
    perm, sign = involution_matching(sim, signed=False)
    assert np.array_equal(perm[perm], np.arange(n))
    assert (perm == target).mean() >= 0.99
    uniform = rng.uniform(-1, 1, (n, n))  # no structure: many units inconsistent, and the recursion must end
    perm, sign = involution_matching(uniform, signed=True)
    assert np.array_equal(perm[perm], np.arange(n)) and np.array_equal(sign[perm], sign)



@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("spread", [0.05, 3.0])
def test_best_assignment_is_optimal_with_and_without_the_row_maximum_shortcut(signed, spread):
    """Distinct row maxima (small spread: a planted matching) take the shortcut; otherwise scipy solves it. Both
    must reach scipy's optimum."""
    from scipy.optimize import linear_sum_assignment

    from layerwise.algorithms._align import best_assignment

    rng = np.random.default_rng(3)
    n = 40
    sim = spread * rng.uniform(-1, 1, (n, n))
    sim[np.arange(n), rng.permutation(n)] += 1.0
    perm, sign, mean = best_assignment(sim, signed)
    score = np.abs(sim) if signed else sim
    r, c = linear_sum_assignment(-score)
    assert np.array_equal(np.sort(perm), np.arange(n))
    assert score[np.arange(n), perm].sum() == pytest.approx(score[r, c].sum(), abs=1e-12)
    assert mean == pytest.approx(score[r, c].mean(), abs=1e-12)
