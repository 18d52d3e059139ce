"""Tests of the digits training experiments (float32 unless stated; thresholds measured over seeds 0-2 with margin)."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import layerwise
from layerwise import LayerwiseError
from layerwise.experiments.digits import (
    DigitsData,
    TrainConfig,
    TrainResult,
    build_mlp,
    evaluate,
    flip_accuracy,
    load_digits_split,
    train,
)
from layerwise.testing import hflip_permutation, vflip_permutation

HFLIP = hflip_permutation(8)
SMALL = (64, 64, 32)


@pytest.fixture(scope="module")
def data() -> DigitsData:
    return load_digits_split(seed=0)


@pytest.fixture(scope="module")
def raw_split():
    """The same split computed directly with scikit-learn, unscaled pixels 0..16 in float64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    return train_test_split(d.data.astype(np.float64), d.target, test_size=0.25, random_state=0, stratify=d.target)


@pytest.fixture(scope="module")
def classifier_none(data) -> TrainResult:
    """The control classifier (no symmetry), shared by the augmentation and soft-loss tests."""
    return train(TrainConfig("classifier", "tanh", widths=SMALL, symmetry="none", epochs=40), data, progress=False)


def _invariance_error(model, data) -> float:
    return layerwise.equivariance_error(model, {"hflip": (HFLIP, None)}, data.x_test)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- data -------------------------------------------------------------------------------------------------------


def test_split_shapes_dtypes_and_stratification(data, raw_split):
    x_tr, x_te, y_tr, y_te = raw_split
    assert data.x_train.shape == (1347, 64) and data.x_test.shape == (450, 64)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.long
    assert torch.equal(data.y_train, torch.as_tensor(y_tr)) and torch.equal(data.y_test, torch.as_tensor(y_te))
    # stratified: each class's share of the test split is within one sample of 25 %
    counts_all = np.bincount(np.concatenate([y_tr, y_te]), minlength=10)
    counts_test = np.bincount(data.y_test.numpy(), minlength=10)
    assert np.all(np.abs(counts_test - 0.25 * counts_all) <= 1.0)


def test_standardization_uses_one_global_scalar_from_the_train_split(data, raw_split):
    x_tr, x_te, _, _ = raw_split
    assert isinstance(data.mean, float) and isinstance(data.std, float)
    assert math.isclose(data.mean, (x_tr / 16).mean(), rel_tol=1e-12)
    assert math.isclose(data.std, (x_tr / 16).std(), rel_tol=1e-12)
    # float32, tolerance 1e-5: the train split is standardized as a whole ...
    assert abs(float(data.x_train.double().mean())) < 1e-5
    assert abs(float(data.x_train.double().std(unbiased=False)) - 1.0) < 1e-5
    # ... and undoing the scalars gives back the integer pixels exactly (per-pixel statistics would not)
    pixels = (data.x_test.double() * data.std + data.mean) * 16
    assert torch.allclose(pixels, torch.as_tensor(x_te), atol=1e-4)
    assert float(pixels.min()) > -1e-4 and float(pixels.max()) < 16 + 1e-4


def test_flips_act_exactly_on_standardized_inputs(raw_split):
    x_tr, x_te, _, _ = raw_split
    data = load_digits_split(seed=0, dtype=torch.float64)
    assert data.x_test.dtype == torch.float64
    for perm in (HFLIP, vflip_permutation(8)):
        flipped_then_standardized = torch.as_tensor((x_te[:, perm.numpy()] / 16 - data.mean) / data.std)
        assert torch.equal(data.x_test[:, perm], flipped_then_standardized)  # bit for bit
    # the permutation is the image flip: x.reshape(8, 8).flip(-1)
    img = data.x_train[:5].reshape(5, 8, 8)
    assert torch.equal(data.x_train[:5, HFLIP], img.flip(-1).reshape(5, 64))


def test_split_is_seeded_and_validated():
    a, b, c = load_digits_split(seed=3), load_digits_split(seed=3), load_digits_split(seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_test, c.y_test)
    assert load_digits_split(test_fraction=0.5).x_test.shape[0] == 899
    with pytest.raises(LayerwiseError, match="test_fraction"):
        load_digits_split(test_fraction=1.5)
    with pytest.raises(LayerwiseError, match="dtype"):
        load_digits_split(dtype=torch.int64)


# --- model and configuration --------------------------------------------------------------------------------------


@pytest.mark.parametrize("act,cls", [("tanh", nn.Tanh), ("gelu", nn.GELU), ("relu", nn.ReLU)])
def test_build_mlp_architecture_and_seeded_init(act, cls):
    rng_before = torch.random.get_rng_state()
    model = build_mlp(act, widths=(16, 12, 8), n_out=5, seed=7, dtype=torch.float64)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global generator untouched
    kinds = [type(m) for m in model]
    assert kinds == [nn.Linear, cls, nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in model if isinstance(m, nn.Linear)] == [
        (64, 16), (16, 12), (12, 8), (8, 5)]
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert _same_state(model, build_mlp(act, widths=(16, 12, 8), n_out=5, seed=7, dtype=torch.float64))
    assert not _same_state(model, build_mlp(act, widths=(16, 12, 8), n_out=5, seed=8, dtype=torch.float64))
    # PyTorch's default scale: |W| <= 1 / sqrt(fan_in)
    assert float(model[0].weight.detach().abs().max()) <= 1 / 8 + 1e-12
    assert float(model[0].weight.detach().abs().max()) > 0.9 / 8


def test_build_mlp_rejects_unknown_activation():
    with pytest.raises(LayerwiseError, match=r"first_activation.*'gelu'.*'relu'.*'tanh'.*'sigmoid'"):
        build_mlp("sigmoid")
    with pytest.raises(LayerwiseError, match="widths"):
        build_mlp("tanh", widths=(8, 0))


@pytest.mark.parametrize("kwargs,name", [
    ({"task": "regressor"}, "task"),
    ({"first_activation": "sigmoid"}, "first_activation"),
    ({"symmetry": "rot90"}, "symmetry"),
    ({"widths": ()}, "widths"),
    ({"widths": (32, -1)}, "widths"),
    ({"epochs": 0}, "epochs"),
    ({"epochs": 2.5}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"lr": 0.0}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"weight_decay": -1e-4}, "weight_decay"),
    ({"loss_weight": -1.0}, "loss_weight"),
    ({"seed": -1}, "seed"),
])
def test_bad_configs_raise(kwargs, name):
    base = {"task": "classifier", "first_activation": "tanh"}
    with pytest.raises(LayerwiseError, match=name):
        TrainConfig(**{**base, **kwargs})


def test_config_defaults_and_widths_become_a_tuple():
    cfg = TrainConfig("autoencoder", "gelu", widths=[8, 8])
    assert cfg.widths == (8, 8)
    assert (cfg.symmetry, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.loss_weight, cfg.seed) == (
        "none", 60, 64, 1e-3, 0.0, 1.0, 0)
    assert TrainConfig("classifier", "tanh").widths == (128, 128, 64)


def test_train_rejects_bad_arguments(data):
    cfg = TrainConfig("classifier", "tanh", widths=(8,), epochs=1)
    with pytest.raises(LayerwiseError, match="generator_perm"):
        train(cfg, data, generator_perm=torch.arange(16), progress=False)
    with pytest.raises(LayerwiseError, match="generator_perm"):
        train(cfg, data, generator_perm=torch.zeros(64, dtype=torch.long), progress=False)
    with pytest.raises(LayerwiseError, match="data"):
        train(cfg, (data.x_train, data.y_train), progress=False)
    with pytest.raises(LayerwiseError, match="on_epoch"):
        train(cfg, data, on_epoch=lambda epoch, model: 1.0, progress=False)


# --- training -----------------------------------------------------------------------------------------------------


def test_training_is_deterministic_and_leaves_global_state_alone(data):
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    cfg = TrainConfig("classifier", "relu", widths=(16, 16, 8), symmetry="augment", epochs=3, seed=1)
    a, b = train(cfg, data, progress=False), train(cfg, data, progress=False)
    c = train(TrainConfig("classifier", "relu", widths=(16, 16, 8), symmetry="augment", epochs=3, seed=2), data,
              progress=False)
    assert _same_state(a.model, b.model) and a.train_loss == b.train_loss
    assert not _same_state(a.model, c.model)
    assert _same_state(a.init_model, build_mlp("relu", (16, 16, 8), seed=1))
    assert not _same_state(a.init_model, a.model)
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), rng)
    assert not a.model.training and a.seconds > 0 and math.isfinite(a.train_loss)


def test_on_epoch_sees_init_then_every_epoch_in_eval_mode(data):
    calls = []

    def on_epoch(epoch, model):
        calls.append((epoch, model.training))
        return {"epoch": epoch, "state": copy.deepcopy(model.state_dict())}

    res = train(TrainConfig("autoencoder", "tanh", widths=(16, 16, 8), epochs=4), data, on_epoch=on_epoch,
                progress=False)
    assert calls == [(-1, False), (0, False), (1, False), (2, False), (3, False)]
    assert [h["epoch"] for h in res.history] == [-1, 0, 1, 2, 3]
    assert all(torch.equal(res.history[0]["state"][k], v) for k, v in res.init_model.state_dict().items())
    assert all(torch.equal(res.history[-1]["state"][k], v) for k, v in res.model.state_dict().items())
    assert not torch.equal(res.history[1]["state"]["0.weight"], res.history[2]["state"]["0.weight"])
    # returning None records nothing; a shorter run is the same run stopped early
    res2 = train(TrainConfig("autoencoder", "tanh", widths=(16, 16, 8), epochs=2), data,
                 on_epoch=lambda epoch, model: None, progress=False)
    assert res2.history == []
    assert all(torch.equal(res.history[2]["state"][k], v) for k, v in res2.model.state_dict().items())


def test_soft_loss_starts_in_the_second_half(data):
    """Until epoch epochs // 2 the soft-loss run is the control run bit for bit; from then on it differs."""
    snaps = {}

    def recorder(tag):
        def on_epoch(epoch, model):
            snaps[tag, epoch] = copy.deepcopy(model.state_dict())
        return on_epoch

    for sym in ("loss", "none"):
        train(TrainConfig("classifier", "gelu", widths=(16, 16, 8), symmetry=sym, epochs=6), data,
              on_epoch=recorder(sym), progress=False)

    def same(epoch):
        a, b = snaps["loss", epoch], snaps["none", epoch]
        return all(torch.equal(a[k], b[k]) for k in a)

    assert [same(e) for e in range(-1, 6)] == [True, True, True, True, False, False, False]


def test_progress_bar_shows_the_loss(data, capsys):
    train(TrainConfig("classifier", "tanh", widths=(8,), epochs=2), data, progress=True)
    assert "loss=" in capsys.readouterr().err
    train(TrainConfig("classifier", "tanh", widths=(8,), epochs=2), data, progress=False)
    assert capsys.readouterr().err == ""


def test_augmented_classifier_is_nearly_invariant_and_accurate(data, classifier_none):
    aug = train(TrainConfig("classifier", "tanh", widths=SMALL, symmetry="augment", epochs=40), data, progress=False)
    # measured (seeds 0-2): augment 0.09-0.13, none 0.73-0.87
    err_aug, err_none = _invariance_error(aug.model, data), _invariance_error(classifier_none.model, data)
    assert err_aug < 0.25 and err_aug < 0.35 * err_none
    assert evaluate(aug.model, data, "classifier")["accuracy"] > 0.8
    # the diagnostic: flipped test digits are classified about as well as upright ones only by the augmented net
    assert flip_accuracy(aug.model, data, HFLIP) > 0.8
    assert flip_accuracy(classifier_none.model, data, HFLIP) < 0.6


def test_soft_loss_classifier_reduces_the_invariance_error(data, classifier_none):
    soft = train(TrainConfig("classifier", "tanh", widths=SMALL, symmetry="loss", epochs=40), data, progress=False)
    # measured (seeds 0-2): loss 0.055-0.062, none 0.73-0.87
    assert _invariance_error(soft.model, data) < 0.3 * _invariance_error(classifier_none.model, data)
    assert evaluate(soft.model, data, "classifier")["accuracy"] > 0.8


@pytest.fixture(scope="module")
def autoencoder_none(data) -> TrainResult:
    return train(TrainConfig("autoencoder", "tanh", widths=SMALL, symmetry="none", epochs=30), data, progress=False)


EQUI = {"hflip": (HFLIP, HFLIP)}  # the autoencoder's outputs flip with its inputs


def test_augmented_autoencoder_is_equivariant_with_the_flip_on_its_outputs(data, autoencoder_none):
    aug = train(TrainConfig("autoencoder", "tanh", widths=SMALL, symmetry="augment", epochs=30), data, progress=False)
    # measured (seeds 0-2): augment 0.21-0.23, none 0.39-0.41; as invariance (output action None) about 0.9
    err_aug = layerwise.equivariance_error(aug.model, EQUI, data.x_test)
    assert err_aug < 0.3 and err_aug < 0.75 * layerwise.equivariance_error(autoencoder_none.model, EQUI, data.x_test)
    assert layerwise.equivariance_error(aug.model, {"hflip": (HFLIP, None)}, data.x_test) > 0.6
    metrics = evaluate(aug.model, data, "autoencoder")
    assert set(metrics) == {"mse", "relative_error"} and metrics["relative_error"] < 0.4


def test_soft_loss_autoencoder_compares_with_the_flipped_output(data, autoencoder_none):
    soft = train(TrainConfig("autoencoder", "tanh", widths=SMALL, symmetry="loss", epochs=30), data, progress=False)
    # measured (seeds 0-3): loss 0.12-0.13, none 0.39-0.41; relative reconstruction error 0.31-0.32
    err_soft = layerwise.equivariance_error(soft.model, EQUI, data.x_test)
    assert err_soft < 0.5 * layerwise.equivariance_error(autoencoder_none.model, EQUI, data.x_test)
    assert evaluate(soft.model, data, "autoencoder")["relative_error"] < 0.4


# --- evaluation -------------------------------------------------------------------------------------------------


def test_evaluate_matches_hand_computation_and_keeps_training_flags(data):
    identity = nn.Sequential(nn.Linear(64, 64, bias=False))
    with torch.no_grad():
        identity[0].weight.copy_(torch.eye(64))
    identity.train()
    m = evaluate(identity, data, "autoencoder")
    assert m["mse"] < 1e-12 and m["relative_error"] < 1e-6 and identity.training
    model = build_mlp("tanh", widths=(8,), seed=0)
    model.train()
    logits = model(data.x_test).detach()
    m = evaluate(model, data, "classifier")
    assert m["accuracy"] == pytest.approx(float((logits.argmax(1) == data.y_test).double().mean()), abs=1e-9)
    assert m["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, data.y_test)), rel=1e-6)
    flipped = model(data.x_test[:, HFLIP]).detach()
    assert flip_accuracy(model, data, HFLIP) == pytest.approx(
        float((flipped.argmax(1) == data.y_test).double().mean()), abs=1e-9)
    assert model.training


def test_evaluate_rejects_mismatched_tasks(data):
    autoencoder = build_mlp("tanh", widths=(8,), n_out=64)
    with pytest.raises(LayerwiseError, match="task"):
        evaluate(autoencoder, data, "regressor")
    with pytest.raises(LayerwiseError, match="classifier has 10 outputs"):
        evaluate(autoencoder, data, "classifier")
    with pytest.raises(LayerwiseError, match="classifier has 10 outputs"):
        flip_accuracy(autoencoder, data, HFLIP)
    with pytest.raises(LayerwiseError, match="autoencoder has 64 outputs"):
        evaluate(build_mlp("tanh", widths=(8,)), data, "autoencoder")


def test_cnn_config_and_builder():
    from layerwise.experiments.digits import build_cnn

    model = build_cnn("tanh", (4, 4, 4), n_out=10, seed=0)
    assert isinstance(model[0], nn.Unflatten) and sum(isinstance(m, nn.Conv2d) for m in model) == 3
    assert model(torch.randn(2, 64)).shape == (2, 10)
    a, b = build_cnn("tanh", (4, 4), seed=1), build_cnn("tanh", (4, 4), seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(LayerwiseError, match="classifier only"):
        TrainConfig(task="autoencoder", first_activation="tanh", arch="cnn")
    with pytest.raises(LayerwiseError, match="arch"):
        TrainConfig(task="classifier", first_activation="tanh", arch="transformer")
