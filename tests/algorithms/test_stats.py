import numpy as np
import torch

from layerwise.algorithms._align import activation_similarity
from layerwise.algorithms._stats import CorrelationStats
from layerwise.algorithms._symmetrize import activation_statistics
from layerwise.group import FiniteGroup
from layerwise.layers import parse_dense
from layerwise.testing import planted_mlp


def test_streamed_correlations_equal_the_batch_computation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 7, generator=gen, dtype=torch.float64) * 3 + 1
    y = x[:, [2, 0, 1, 3, 4, 5, 6, 6]] * torch.linspace(-2, 2, 8, dtype=torch.float64) + 0.1 * torch.randn(
        1000, 8, generator=gen, dtype=torch.float64)
    y[:, 5] = 4.0  # a constant unit: correlation 0
    stats = CorrelationStats()
    for a, b in zip(x.split(137), y.split(137)):
        stats.update(a, b)
    np.testing.assert_allclose(stats.correlation(), activation_similarity(x, y), atol=1e-10)
    assert np.all(stats.correlation()[5] == 0)


def test_activation_statistics_do_not_depend_on_the_batch_size():
    model, planted = planted_mlp("tanh", group="d4", widths=(24, 16), seed=0, dtype=torch.float64)
    net = parse_dense(model)
    group = FiniteGroup.from_generators(planted.generators, 16, 3)
    x = torch.randn(500, 16, dtype=torch.float64)
    a = activation_statistics(net, group, x, batch_size=64)
    b = activation_statistics(net, group, x, batch_size=500)
    for la, lb in zip(a, b):
        assert sorted(la) == sorted(lb) == list(range(group.order))
        for h in la:
            np.testing.assert_allclose(la[h], lb[h], atol=1e-10)
    # only the requested elements, with the same values
    some = activation_statistics(net, group, x, batch_size=64, elements=[3, 5])
    for ls, la in zip(some, a):
        assert sorted(ls) == [3, 5]
        for h in ls:
            np.testing.assert_allclose(ls[h], la[h], atol=1e-12)


def test_float32_activations_give_the_float64_correlations():
    """Float32 batches are centred and multiplied in float32, summed in float64: with a large mean (100) and a
    constant unit the correlations must still agree with the float64 computation to 1e-5."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 7, generator=gen, dtype=torch.float64) * 3 + 100
    y = x[:, [2, 0, 1, 3, 4, 5, 6, 6]] * torch.linspace(-2, 2, 8, dtype=torch.float64) + 0.1 * torch.randn(
        3000, 8, generator=gen, dtype=torch.float64)
    y[:, 5] = 4.0
    stats = CorrelationStats()
    for a, b in zip(x.float().split(512), y.float().split(512)):
        stats.update(a, b)
    ref = activation_similarity(x.float().double(), y.float().double())
    np.testing.assert_allclose(stats.correlation(), ref, atol=1e-5)
    assert np.all(stats.correlation()[5] == 0)
