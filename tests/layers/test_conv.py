import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layerwise
from layerwise import LayerwiseError
from layerwise.layers._conv import SPATIAL, fold_batchnorm, parse_cnn, spatial_permutation
from layerwise.testing import perturb, planted_cnn

from ..conftest import DTYPES

SHAPE = (1, 8, 8)


@pytest.mark.parametrize("name", ["hflip", "vflip", "rot90"])
def test_spatial_permutation_matches_the_transform(name):
    x = torch.randn(5, 3, 6, 6)
    p = spatial_permutation(name, (3, 6, 6))
    assert torch.equal(x.reshape(5, -1)[:, p].reshape(5, 3, 6, 6), SPATIAL[name](x))


@pytest.mark.parametrize("name", ["hflip", "vflip", "rot90"])
def test_the_adjunction_moves_the_transform_into_the_filters(name):
    # conv(T x, F) = T conv(x, T^-1 F): the identity the planted CNNs rely on
    inverse = {"hflip": SPATIAL["hflip"], "vflip": SPATIAL["vflip"], "rot90": lambda a: torch.rot90(a, -1, (-2, -1))}
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    lhs = F.conv2d(SPATIAL[name](x), w, padding=1)
    torch.testing.assert_close(lhs, SPATIAL[name](F.conv2d(x, inverse[name](w), padding=1)), rtol=1e-12, atol=1e-12)


def test_dense_view_computes_the_same_function():
    model, _ = planted_cnn("tanh", group="z2", channels=(6, 5), seed=0, dtype=torch.float64, batchnorm=True)
    model = nn.Sequential(*list(model)[:-3], nn.AvgPool2d(2), nn.Flatten(), nn.Linear(5 * 16, 3, dtype=torch.float64))
    net, layout, folded = parse_cnn(model, SHAPE)
    x = torch.randn(10, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(net.forward(x), model(x), rtol=1e-10, atol=1e-10)
    assert layout.hidden_shapes == [(6, 8, 8), (5, 8, 8)] and layout.output_shape == (3,)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batchnorm_folding_is_exact(dtype):
    model, _ = planted_cnn("relu", group="z2", channels=(6, 6), seed=3, dtype=dtype, batchnorm=True)
    before = copy.deepcopy(model.state_dict())
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded)
    x = torch.randn(10, 1, 8, 8, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    with torch.no_grad():
        assert float((folded(x) - model(x)).norm() / model(x).norm()) < tol
    for k, v in model.state_dict().items():  # the input is untouched
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", ["z2", "d4"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu", "power3", "leaky_relu"])
def test_planted_cnn_is_certified_and_recovered(activation, group, dtype):
    channels = (8, 8) if group == "z2" else (16, 16)
    model, planted = planted_cnn(activation, group=group, channels=channels, seed=2, dtype=dtype,
                                 batchnorm=activation == "relu")
    res = layerwise.extract(model, planted.generators, input_shape=SHAPE)
    assert res.equivariant, res.summary()
    assert planted.characters_match(res)  # channel characters of every group element
    for layer in res.latent:
        for name, act in layer.items():
            assert act.spatial == name and act.matrix.shape == (act.channel.size,) * 2
            if activation in ("relu", "leaky_relu", "gelu"):  # the canonical choice: permutations of channels
                assert act.channel.is_permutation(), act.summary()
    # same function as the input (BatchNorm folded, channels rescaled or flipped canonically)
    x0 = torch.randn(6, 1, 8, 8, dtype=dtype)
    with torch.no_grad():
        change = float((res.model(x0) - model(x0)).norm() / model(x0).norm())
    assert change < (1e-5 if dtype == torch.float32 else 1e-12) * (27 if activation == "power3" else 1)
    # the reported action is what the layer does: layer(T x) == channel(T(layer(x)))
    x = torch.randn(6, 1, 8, 8, dtype=dtype)
    conv, act_mod = res.model[0], res.model[2 if activation == "relu" else 1]
    for name, a in res.latent[0].items():
        with torch.no_grad():
            lhs = act_mod(conv(SPATIAL[name](x)))
            rhs = a(act_mod(conv(x)))
        assert float((lhs - rhs).norm() / rhs.norm()) < (1e-5 if dtype == torch.float32 else 1e-12)
    # a slightly perturbed network is rejected
    bad = layerwise.extract(perturb(model, 1e-3 if dtype == torch.float32 else 1e-6), planted.generators,
                            input_shape=SHAPE)
    assert not bad.equivariant and bad.first_failure


def test_a_symmetric_cnn_under_the_wrong_group_is_rejected():
    model, planted = planted_cnn("tanh", group="z2", seed=0, dtype=torch.float64)
    res = layerwise.extract(model, {"vflip": ("vflip", None)}, input_shape=SHAPE)
    assert not res.equivariant


@pytest.mark.parametrize("conv,match", [
    (nn.Conv2d(1, 4, 3, padding=1, stride=2), "stride"),
    (nn.Conv2d(1, 4, 3, padding=1, dilation=2), "dilation"),
    (nn.Conv2d(2, 4, 3, padding=1, groups=2), "groups"),
    (nn.Conv2d(1, 4, 3, padding=0), "padding"),
    (nn.Conv2d(1, 4, 2, padding=1), "odd square kernel"),
    (nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), "padding_mode"),
])
def test_unsupported_convolutions_are_refused(conv, match):
    c_in = conv.in_channels
    model = nn.Sequential(conv, nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(LayerwiseError, match=match):
        layerwise.extract(model, {"f": ("hflip", None)}, input_shape=(c_in, 8, 8))


@pytest.mark.parametrize("mods,match", [
    ([nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.MaxPool2d(3), nn.Flatten(), nn.Linear(16, 2)], "MaxPool2d"),
    ([nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(64, 2)],
     "must follow an activation"),
    ([nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.AvgPool2d(3), nn.Flatten(), nn.Linear(16, 2)], "AvgPool2d"),
    ([nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(10, 2)], "expects 10 features"),
    ([nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)],
     "expects 3 channels"),
])
def test_unsupported_layouts_are_refused(mods, match):
    with pytest.raises(LayerwiseError, match=match):
        layerwise.extract(nn.Sequential(*mods), {"f": ("hflip", None)}, input_shape=SHAPE)


def test_cnn_needs_an_input_shape_and_eval_mode_batchnorm():
    model, planted = planted_cnn("relu", seed=0, batchnorm=True)
    with pytest.raises(LayerwiseError, match="input_shape"):
        layerwise.extract(model, planted.generators)
    model.train()
    with pytest.raises(LayerwiseError, match="training mode"):
        layerwise.extract(model, planted.generators, input_shape=SHAPE)


def test_spatial_actions_in_the_oracle_and_clear_refusals_elsewhere():
    model, planted = planted_cnn("tanh", group="d4", channels=(16, 16), seed=0, dtype=torch.float64)
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    assert layerwise.equivariance_error(model, planted.generators, x) < 1e-12
    assert layerwise.equivariance_error(model, {"v": ("vflip", None)}, x) < 1e-12  # D4 contains vflip
    with pytest.raises(LayerwiseError, match="only so far"):
        layerwise.layer_equivariance_errors(model, [], planted.generators, x)
    with pytest.raises(LayerwiseError, match="spatial action"):
        layerwise.equivariance_error(model, {"s": ("shear", None)}, x)


@pytest.mark.parametrize("source", ["data", "weights"])
@pytest.mark.parametrize("group", ["z2", "d4"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu"])
def test_cnn_symmetrize_is_certified_and_a_fixed_point(activation, group, source):
    channels = (8, 8) if group == "z2" else (16, 16)
    model, planted = planted_cnn(activation, group=group, channels=channels, seed=4, dtype=torch.float64,
                                 batchnorm=activation == "relu")
    x = torch.randn(200, 1, 8, 8, dtype=torch.float64)
    data = x if source == "data" else None
    with torch.no_grad():
        # an equivariant CNN is a fixed point
        sym = layerwise.symmetrize(model, planted.generators, data)
        assert float((sym(x) - model(x)).norm() / model(x).norm()) < 1e-12
        # a perturbed one becomes exactly equivariant, a CNN again (BatchNorm folded), certified
        noisy = perturb(model, 0.05, seed=1)
        before = copy.deepcopy(noisy.state_dict())
        sym = layerwise.symmetrize(noisy, planted.generators, data)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sym)
    assert layerwise.equivariance_error(sym, planted.generators, x) < 1e-12
    assert layerwise.extract(sym, planted.generators, input_shape=SHAPE).equivariant
    for k, v in noisy.state_dict().items():
        assert torch.equal(v, before[k])


def test_cnn_naive_average_is_not_the_aligned_one():
    model, planted = planted_cnn("tanh", group="d4", channels=(16, 16), seed=0, dtype=torch.float64)
    x = torch.randn(100, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        naive = layerwise.naive_average(model, planted.generators)
        assert float((naive(x) - model(x)).norm() / model(x).norm()) > 1e-2


def test_cnn_symmetrize_refuses_what_it_cannot_average():
    model, planted = planted_cnn("tanh", seed=0)
    with pytest.raises(LayerwiseError, match="spatial action"):
        layerwise.symmetrize(model, {"f": (torch.arange(64), None)})
    with pytest.raises(LayerwiseError, match="data"):
        layerwise.symmetrize(model, planted.generators, torch.randn(10, 64))
    no_head = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 2, 3, padding=1))
    with pytest.raises(LayerwiseError, match="final Linear"):
        layerwise.symmetrize(no_head, planted.generators)


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_pooling_between_convolutions(activation, pool):
    model, planted = planted_cnn(activation, group="d4", channels=(16, 16), seed=5, dtype=torch.float64, pool=pool)
    res = layerwise.extract(model, planted.generators, input_shape=SHAPE)
    assert res.equivariant and planted.characters_match(res)
    assert not layerwise.extract(perturb(model, 1e-6), planted.generators, input_shape=SHAPE).equivariant


def test_max_pooling_after_a_negated_channel_is_not_equivariant():
    # with average pooling this tanh CNN is equivariant and its first layer has a channel negated by the flip;
    # max(-z) != -max(z), so swapping in max pooling breaks it, and the sweep must say so
    model, planted = planted_cnn("tanh", group="z2", channels=(8, 8), seed=0, dtype=torch.float64, pool="avg")
    res = layerwise.extract(model, planted.generators, input_shape=SHAPE)
    assert res.equivariant and any(a.channel.scale.min() < 0 for a in res.latent[0].values())
    maxed = nn.Sequential(*[nn.MaxPool2d(2) if isinstance(m, nn.AvgPool2d) else m for m in model])
    bad = layerwise.extract(maxed, planted.generators, input_shape=SHAPE)
    assert not bad.equivariant and bad.failed_layer == 0


def test_cnn_metrics_vanish_on_planted_cnns_and_controls_do_not():
    model, planted = planted_cnn("tanh", group="z2", channels=(8, 8), seed=0, dtype=torch.float64, pool="avg")
    x = torch.randn(300, 1, 8, 8, dtype=torch.float64)
    rows = layerwise.layerwise_metrics(model, planted.generators, x)
    assert [r.layer for r in rows] == [1, 2]
    for r in rows:
        assert r.linear < 1e-6 and r.constrained_activations < 1e-10 and r.constrained_weights < 1e-10
        assert r.consistent < 1e-10
    control = layerwise.layerwise_metrics(model, {"vflip": ("vflip", None)}, x)
    assert all(r.constrained_activations > 0.05 for r in control)
    noisy = layerwise.layerwise_metrics(perturb(model, 0.05), planted.generators, x)
    assert all(0 < r.constrained_activations < 0.5 for r in noisy)


def test_cnn_metrics_bad_inputs():
    model, planted = planted_cnn("tanh", seed=0)
    with pytest.raises(LayerwiseError, match=r"\(N, 1, H, W\)"):
        layerwise.layerwise_metrics(model, planted.generators, torch.randn(10, 64))
    with pytest.raises(LayerwiseError, match="spatial action"):
        layerwise.layerwise_metrics(model, {"f": (torch.arange(64), None)}, torch.randn(10, 1, 8, 8))


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_dead_and_duplicated_channels_are_reduced(activation):
    model, planted = planted_cnn(activation, group="d4", channels=(16, 16), seed=3, dtype=torch.float64)
    conv1, conv2 = model[0], model[2]
    factor = {"relu": 2.0, "tanh": -1.0, "gelu": 1.0}[activation]
    fam = layerwise.hidden.family_of(model[1], "a")
    mult = float(fam.latent(torch.tensor([factor], dtype=torch.float64))[0])
    with torch.no_grad():  # channel 16: a copy of channel 3 (times factor); channel 17: dead
        w1 = torch.cat([conv1.weight, factor * conv1.weight[3:4], torch.randn(1, 1, 3, 3, dtype=torch.float64)])
        b1 = torch.cat([conv1.bias, factor * conv1.bias[3:4], torch.randn(1, dtype=torch.float64)])
        split = 0.3 * conv2.weight[:, 3:4]
        w2 = torch.cat([conv2.weight, split, torch.zeros_like(split)], 1)
        w2[:, 3:4] -= mult * split  # the copy carries part of channel 3's outgoing weights
        big1 = nn.Conv2d(1, 18, 3, padding=1, dtype=torch.float64)
        big2 = nn.Conv2d(18, 16, 3, padding=1, dtype=torch.float64)
        big1.weight.copy_(w1)
        big1.bias.copy_(b1)
        big2.weight.copy_(w2)
        big2.bias.copy_(conv2.bias)
    bigger = nn.Sequential(big1, model[1], big2, *list(model)[3:])
    x = torch.randn(20, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert float((bigger(x) - model(x)).norm() / model(x).norm()) < 1e-12
    res = layerwise.extract(bigger, planted.generators, input_shape=SHAPE)
    assert res.equivariant and planted.characters_match(res)
    assert res.reduction[0].dead == [17] and res.reduction[0].merged == [(16, 3)]
    with torch.no_grad():
        assert float((res.model(x) - model(x)).norm() / model(x).norm()) < 1e-12


def _symmetric_cnn(act, pool=None):
    torch.manual_seed(0)
    c1, c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():  # mirror-symmetric filters: every channel is fixed by the flip
        c1.weight.copy_((c1.weight + c1.weight.flip(-1)) / 2)
        c2.weight.copy_((c2.weight + c2.weight.flip(-1)) / 2)
    mods = [c1, act(), *([pool] if pool else []), c2, act(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)]
    return nn.Sequential(*mods).double()


def test_sigmoid_cnns_are_analysed_and_symmetrized():
    model = _symmetric_cnn(nn.Sigmoid)
    gens = {"hflip": ("hflip", None)}
    assert layerwise.extract(model, gens, input_shape=SHAPE).equivariant
    x = torch.randn(100, 1, 8, 8, dtype=torch.float64)
    sym = layerwise.symmetrize(perturb(model, 0.05), gens, x)
    assert layerwise.extract(sym, gens, input_shape=SHAPE).equivariant
    assert layerwise.equivariance_error(sym, gens, x) < 1e-12


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_symmetrize_and_metrics_through_max_pooling(activation):
    model, planted = planted_cnn(activation, group="d4", channels=(16, 16), seed=2, dtype=torch.float64, pool="max")
    x = torch.randn(100, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        sym = layerwise.symmetrize(model, planted.generators, x)
        assert float((sym(x) - model(x)).norm() / model(x).norm()) < 1e-12  # a fixed point
        noisy = layerwise.symmetrize(perturb(model, 0.05), planted.generators)
    assert layerwise.extract(noisy, planted.generators, input_shape=SHAPE).equivariant
    assert layerwise.equivariance_error(noisy, planted.generators, x) < 1e-12
    assert all(r.constrained_activations < 1e-10 for r in layerwise.layerwise_metrics(model, planted.generators, x))


@pytest.mark.parametrize("source", ["data", "weights"])
def test_flatten_head_is_symmetrized_with_the_spatial_action_on_its_inputs(source):
    model, planted = planted_cnn("tanh", group="d4", channels=(16, 16), seed=0, dtype=torch.float64, pool="avg")
    flat = nn.Sequential(*list(model)[:-3], nn.Flatten(), nn.Linear(16 * 16, 3, dtype=torch.float64))
    x = torch.randn(100, 1, 8, 8, dtype=torch.float64)
    sym = layerwise.symmetrize(flat, planted.generators, x if source == "data" else None)
    assert layerwise.extract(sym, planted.generators, input_shape=SHAPE).equivariant
    assert layerwise.equivariance_error(sym, planted.generators, x) < 1e-12
    with torch.no_grad():
        again = layerwise.symmetrize(sym, planted.generators, x if source == "data" else None)
        assert float((again(x) - sym(x)).norm() / sym(x).norm()) < 1e-12
    rows = layerwise.layerwise_metrics(sym, planted.generators, x)
    assert all(r.constrained_activations < 1e-10 for r in rows)


def test_align_on_a_cnn_returns_channel_actions():
    model, planted = planted_cnn("tanh", group="d4", channels=(16, 16), seed=0, dtype=torch.float64)
    x = torch.randn(100, 1, 8, 8, dtype=torch.float64)
    al = layerwise.align(model, planted.generators, x)
    assert len(al) == 2 and all(a.latent["hflip"].size == 16 for a in al)
    assert all(0.99 <= a.quality <= 1.0 + 1e-12 for a in al)


def _cnn(act=nn.Tanh, pool=None, c_in=3, bias=True, seed=2):
    torch.manual_seed(seed)
    mods = [nn.Conv2d(c_in, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), act()] + ([pool] if pool else [])
    mods += [nn.Conv2d(8, 8, 3, padding=1, bias=bias), act(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
             nn.Linear(8, 12), act(), nn.Linear(12, 4)]
    return nn.Sequential(*mods).double().eval()


@pytest.mark.parametrize("act,pool", [(nn.Tanh, nn.MaxPool2d(2)), (nn.Sigmoid, nn.AvgPool2d(2)), (nn.ReLU, None)])
def test_symmetrized_cnns_with_a_dense_hidden_head_are_certified(act, pool):
    # review finding: duplicated units of the dense head (a tanh pair averaged into opposite rows) must be reduced
    gens = {"rot90": ("rot90", None), "hflip": ("hflip", None)}
    x = torch.randn(50, 3, 10, 10, dtype=torch.float64)
    for seed in (2, 5):
        sym = layerwise.symmetrize(_cnn(act, pool, seed=seed), gens, x)
        assert layerwise.equivariance_error(sym, gens, x) < 1e-12
        assert layerwise.extract(sym, gens, input_shape=(3, 10, 10)).equivariant


@pytest.mark.parametrize("pool", [nn.AvgPool2d(3), nn.MaxPool2d(3), nn.AvgPool2d(2, stride=1),
                                  nn.MaxPool2d(2, padding=1), nn.AdaptiveAvgPool2d(2)])
def test_symmetrize_refuses_pooling_it_cannot_carry(pool):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), pool, nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(LayerwiseError, match="Pool"):
        layerwise.symmetrize(model, {"f": ("hflip", None)})


def test_review_fixes_for_cnn_inputs():
    gens = {"rot90": ("rot90", None)}
    model = _cnn(nn.ReLU, c_in=1, bias=False)
    flat = nn.Sequential(*list(model)[:5], nn.Flatten(), nn.Linear(8 * 64, 4).double())
    assert layerwise.extract(layerwise.symmetrize(flat, gens), gens, input_shape=(1, 8, 8)).equivariant  # ReLU+Flatten
    rows = layerwise.layerwise_metrics(model, gens, torch.randn(20, 1, 8, 8, dtype=torch.float64))  # bias=False
    assert len(rows) == 3
    for bad, match in [(torch.full((5, 1, 8, 8), float("nan")), "finite"), (torch.zeros(0, 1, 8, 8), "non-empty"),
                       (torch.randn(5, 1, 8, 6), "square")]:
        with pytest.raises(LayerwiseError, match=match):
            layerwise.symmetrize(model, gens, bad)
    import numpy as np

    res = layerwise.extract(model, gens, input_shape=(np.int64(1), 8, 8))  # numpy integers are fine
    assert isinstance(res.equivariant, bool)
