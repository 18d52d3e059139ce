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
        for sa, sb in zip(la, lb):
            np.testing.assert_allclose(sa, sb, atol=1e-10)
