import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layerwise import LayerwiseError
from layerwise.group import FiniteGroup, action_matrix
from layerwise.testing import hflip_permutation, image_generators, rot90_permutation, vflip_permutation


def _check_table(g: FiniteGroup) -> None:
    # table[h, s] is the element rho(s) rho(h), on inputs and outputs
    for h in range(g.order):
        for s, name in enumerate(g.names):
            gi = g.generator_index(name)
            t = g.table[h, s]
            np.testing.assert_allclose(g.rho_in[gi] @ g.rho_in[h], g.rho_in[t], atol=1e-12)
            np.testing.assert_allclose(g.rho_out[gi] @ g.rho_out[h], g.rho_out[t], atol=1e-12)


@pytest.mark.parametrize("name,order", [("z2", 2), ("z2v", 2), ("d4", 8)])
def test_image_groups_have_the_right_order_and_table(name, order):
    g = FiniteGroup.from_generators(image_generators(name, 4), 16, 3)
    assert g.order == order
    assert g.words[0] == ()
    _check_table(g)
    # the elements are distinct
    flat = g.rho_in.reshape(order, -1)
    assert len({tuple(r) for r in flat}) == order


def test_permutation_convention_matches_torch_flips():
    x = torch.randn(5, 4, 4)
    assert torch.equal(x.reshape(5, -1)[:, hflip_permutation(4)].reshape(5, 4, 4), x.flip(-1))
    assert torch.equal(x.reshape(5, -1)[:, vflip_permutation(4)].reshape(5, 4, 4), x.flip(-2))
    assert torch.equal(x.reshape(5, -1)[:, rot90_permutation(4)].reshape(5, 4, 4), torch.rot90(x, 1, dims=(-2, -1)))
    # a permutation p acts as x[..., p] == x @ M.T
    m = action_matrix(hflip_permutation(4), 16, "p")
    y = x.reshape(5, -1).double()
    assert torch.allclose(y @ torch.as_tensor(m.T), y[:, hflip_permutation(4)])


def test_matrix_actions_rotation_by_60_degrees_gives_order_six():
    c, s = np.cos(np.pi / 3), np.sin(np.pi / 3)
    rot = np.array([[c, -s], [s, c]])
    g = FiniteGroup.from_generators({"r": (rot, None)}, 2, 1)
    assert g.order == 6
    _check_table(g)


def test_inverse_index():
    g = FiniteGroup.from_generators(image_generators("d4", 4), 16, 1)
    for h in range(g.order):
        inv = g.inverse_index(h)
        np.testing.assert_allclose(g.rho_in[h] @ g.rho_in[inv], np.eye(16), atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 9), k=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_cyclic_group_of_a_random_cycle_has_its_order(n, k, seed):
    # a k-cycle (k <= n) on n points generates a cyclic group of order k (order 1 when k == 1)
    rng = np.random.default_rng(seed)
    k = min(k, n)
    points = rng.permutation(n)[:k]
    perm = np.arange(n)
    perm[points] = np.roll(points, 1)
    g = FiniteGroup.from_generators({"c": (perm, None)}, n, 1)
    assert g.order == k
    _check_table(g)


def test_output_not_a_function_of_input_is_refused():
    # the input action is trivial but the output action is not: no homomorphism
    with pytest.raises(LayerwiseError, match="do not define a homomorphism"):
        FiniteGroup.from_generators({"g": (None, np.array([1, 0]))}, 4, 2)
    # rot90 has order 4 on inputs, but a 3-cycle on outputs: rot^4 = 1 on inputs only
    gens = image_generators("d4", 4)
    bad = {"rot90": (gens["rot90"][0], np.array([1, 2, 0])), "hflip": (gens["hflip"][0], None)}
    with pytest.raises(LayerwiseError, match="homomorphism"):
        FiniteGroup.from_generators(bad, 16, 3)
    # whereas rot90 -> swap, hflip -> identity is a homomorphism (a character of D4)
    ok = {"rot90": (gens["rot90"][0], np.array([1, 0])), "hflip": (gens["hflip"][0], None)}
    assert FiniteGroup.from_generators(ok, 16, 2).order == 8


@pytest.mark.parametrize(
    "generators,match",
    [
        ({}, "empty"),
        ([("a", (None, None))], "expected a dict"),
        ({"a": None}, "pair"),
        ({"a": (None,)}, "pair"),
        ({"a": "hflip"}, "pair"),
        ({"a": (np.array([0, 0, 1, 2]), None)}, "not a permutation"),
        ({"a": (np.array([0, 1, 2]), None)}, "size 3 does not match"),
        ({"a": (np.array([0.0, 1.0, 2.0, 3.0]), None)}, "integer permutation"),
        ({"a": (np.zeros((4, 4)), None)}, "not invertible"),
        ({"a": (2 * np.eye(4), None)}, "no finite order"),
        ({"a": (np.full((4, 4), np.nan), None)}, "NaN"),
        ({"a": (np.eye(3), None)}, "size 3 does not match"),
        ({"a": (np.ones((4, 4, 1)), None)}, "shape"),
        ({1: (None, None)}, "names must be strings"),
    ],
)
def test_bad_generators_raise_layerwise_error(generators, match):
    with pytest.raises(LayerwiseError, match=match):
        FiniteGroup.from_generators(generators, 4, 1)


def test_group_above_the_bound_is_refused():
    # S_6 (order 720) from a transposition and a 6-cycle, with a bound of 100
    gens = {"t": (np.array([1, 0, 2, 3, 4, 5]), None), "c": (np.array([1, 2, 3, 4, 5, 0]), None)}
    assert FiniteGroup.from_generators(gens, 6, 1).order == 720
    with pytest.raises(LayerwiseError, match="max_order=100"):
        FiniteGroup.from_generators(gens, 6, 1, max_order=100)


def test_multiplication_table_and_subgroups_of_d4():
    g = FiniteGroup.from_generators(image_generators("d4", 4), 16, 1)
    mul = g.multiplication_table()
    for a in range(g.order):
        for b in range(g.order):
            np.testing.assert_allclose(g.rho_in[a] @ g.rho_in[b], g.rho_in[mul[a, b]], atol=1e-12)
        inv = g.inverse_index(a)
        assert mul[a, inv] == 0 and mul[inv, a] == 0
    subs = g.subgroups()
    # D4 has 10 subgroups: trivial, 5 of order 2, 3 of order 4, itself
    assert [len(s) for s in subs] == [1, 2, 2, 2, 2, 2, 4, 4, 4, 8]
    for s in subs:
        assert all(mul[a, b] in s for a in s for b in s)
