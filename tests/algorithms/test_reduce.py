import pytest
import torch
from torch import nn

import layerwise
from layerwise.algorithms import reduce_to_submodel
from layerwise.layers import parse_dense
from layerwise.nn import Power

from ..conftest import FUNCTION_RTOL


def _net(act, gen):
    w1 = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    b1 = torch.randn(6, generator=gen, dtype=torch.float64)
    w2 = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(4, 6, dtype=torch.float64), act, nn.Linear(6, 3, dtype=torch.float64))
    with torch.no_grad():
        model[0].weight.copy_(w1)
        model[0].bias.copy_(b1)
        model[2].weight.copy_(w2)
    return model


@pytest.mark.parametrize("act,factor", [(nn.ReLU(), 2.5), (nn.Tanh(), -1.0), (nn.Sigmoid(), -1.0), (Power(3), -0.5),
                                        (nn.GELU(), 1.0), (Power(2), -2.0)])
def test_dead_constant_and_duplicate_units_are_reduced_exactly(act, factor):
    gen = torch.Generator().manual_seed(0)
    model = _net(act, gen)
    with torch.no_grad():
        model[2].weight[:, 1] = 0.0  # unit 1 dead
        model[0].weight[2] = 0.0  # unit 2 constant sigma(b_2)
        model[0].weight[4] = factor * model[0].weight[3]  # unit 4 duplicates unit 3
        model[0].bias[4] = factor * model[0].bias[3]
    net = parse_dense(model)
    reduced, reports = reduce_to_submodel(net, 1e-10)
    rep = reports[0]
    assert rep.dead == [1] and rep.constant == [2] and rep.merged == [(4, 3)]
    assert rep.width_after == 3 and rep.kept == [0, 3, 5]
    x = torch.randn(50, 4, dtype=torch.float64)
    rel = (reduced.forward(x) - model(x)).norm() / model(x).norm()
    assert rel <= FUNCTION_RTOL[torch.float64]
    assert "1 dead removed" in rep.summary() and "1 duplicates merged" in rep.summary()


def test_merging_can_create_new_dead_units_and_the_reduction_iterates():
    gen = torch.Generator().manual_seed(1)
    model = _net(nn.Tanh(), gen)
    with torch.no_grad():
        model[0].weight[1] = model[0].weight[0]
        model[0].bias[1] = model[0].bias[0]
        model[2].weight[:, 1] = -model[2].weight[:, 0]  # the merged unit's outgoing weights cancel
    reduced, reports = reduce_to_submodel(parse_dense(model), 1e-10)
    assert reports[0].merged == [(1, 0)] and reports[0].dead == [0]
    x = torch.randn(50, 4, dtype=torch.float64)
    assert (reduced.forward(x) - model(x)).norm() / model(x).norm() < 1e-12


@pytest.mark.parametrize("act,scale", [(nn.ReLU(), 0.5), (nn.GELU(), 1.0), (nn.SiLU(), 1.0), (nn.Softplus(), 1.0)])
def test_linear_bypass_pairs_are_reported(act, scale):
    gen = torch.Generator().manual_seed(2)
    model = _net(act, gen)
    with torch.no_grad():
        model[0].weight[5] = -scale * model[0].weight[2]
        model[0].bias[5] = -scale * model[0].bias[2]
    res = layerwise.extract(model, {"id": (None, None)})
    assert res.reduction[0].bypass == [(2, 5)]
    assert "1 linear-bypass pairs" in res.summary()


def test_no_bypass_for_tanh_or_non_opposite_rows():
    gen = torch.Generator().manual_seed(2)
    model = _net(nn.Tanh(), gen)
    with torch.no_grad():
        model[0].weight[5] = -model[0].weight[2]
        model[0].bias[5] = -model[0].bias[2]
    res = layerwise.extract(model, {"id": (None, None)})
    assert res.reduction[0].bypass == []
    assert res.reduction[0].merged == [(5, 2)]  # for tanh an opposite row is a duplicate
    gelu = _net(nn.GELU(), gen)
    with torch.no_grad():
        gelu[0].weight[5] = -0.5 * gelu[0].weight[2]
        gelu[0].bias[5] = -0.5 * gelu[0].bias[2]
    assert layerwise.extract(gelu, {"id": (None, None)}).reduction[0].bypass == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_removing_rows_of_the_next_layer_can_kill_a_unit_backwards(dtype):
    """Unit 0 of layer 1 feeds only units 0 and 1 of layer 2, which are dead: once they are removed, unit 0 has no
    outgoing weight left. The outgoing norms are updated incrementally, so this needs their exact recheck."""
    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    with torch.no_grad():
        for lin in (model[0], model[2], model[4]):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen))
        model[2].weight[:, 0] = 0.0
        model[2].weight[:2, 0] = 1e3 * torch.randn(2, generator=gen)  # big weights: subtraction rounding matters
        model[4].weight[:, :2] = 0.0  # layer-2 units 0 and 1 dead
    reduced, reports = reduce_to_submodel(parse_dense(model), 1e-5 if dtype == torch.float32 else 1e-10)
    assert reports[1].dead == [0, 1]
    assert reports[0].dead == [0]
    x = torch.randn(50, 4, dtype=dtype)
    with torch.no_grad():
        assert (reduced.forward(x) - model(x)).norm() / model(x).norm() < (1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_sketches_handed_to_the_first_sweep_are_those_of_the_reduced_rows(activation):
    """The reduction keeps each layer's key projections across its passes (dropping them when the rows change,
    zeroing removed rows, selecting kept rows and columns at the end); what it hands on must equal a fresh sketch
    of the reduced rows, on a network where every kind of removal happens in every layer."""
    from layerwise.algorithms._match import Sketch
    from layerwise.testing import planted_mlp

    model, _ = planted_mlp(activation, group="d4", widths=(40, 32, 24), dead=2, constant=2, duplicates=2, seed=1,
                           dtype=torch.float64)
    sketches: list = []
    reduced, reports = reduce_to_submodel(parse_dense(model), 1e-10, sketches=sketches)
    assert all(r.dead and r.constant and r.merged for r in reports)
    assert len(sketches) == len(reduced.hidden)
    for sk, blk in zip(sketches, reduced.hidden):
        assert sk.dirs.shape == (blk.aug.shape[1], sk.proj.shape[1])
        fresh = blk.aug @ sk.dirs
        assert torch.allclose(sk.proj, fresh, atol=1e-10 * float(fresh.abs().max())), activation
    # the directions of the kept columns are the original ones (the keys of moved rows rely on it)
    again = Sketch.of(reduced.hidden[0].aug)
    assert again.proj.shape == sketches[0].proj.shape


def test_compaction_and_column_norms_match_plain_indexing():
    from layerwise.algorithms._reduce import _column_sumsq, _compact

    g = torch.Generator().manual_seed(0)
    aug = torch.randn(700, 301, generator=g)  # several row chunks
    rows = torch.tensor([0, 5, 6, 699, 300])
    cols = torch.tensor([1, 2, 300, 0])
    assert torch.equal(_compact(aug, rows, cols), aug[rows][:, cols])
    assert torch.equal(_compact(aug, None, cols), aug[:, cols])
    assert torch.equal(_compact(aug, rows, None), aug[rows])
    assert _compact(aug, None, None) is aug
    assert torch.allclose(_column_sumsq(aug), aug.square().sum(0), rtol=1e-5)
