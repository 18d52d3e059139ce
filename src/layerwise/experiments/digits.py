"""Training side of the digits experiments: MLPs taught a mirror symmetry, by augmentation or by a soft loss.

The paper (THEORY §6) trains a depth-4 MLP on CIFAR-10 with a soft left-right mirror-equivariance loss in the second
half of training and then measures how close each layer is to equivariant. This module does the same on
scikit-learn's bundled 8x8 digits (offline, seconds on a CPU), for a classifier (invariant outputs) and an autoencoder
(outputs flip with the input), with a control network trained without the symmetry.

>>> import layerwise
>>> from layerwise.experiments.digits import TrainConfig, evaluate, load_digits_split, train
>>> from layerwise.testing import hflip_permutation
>>> data = load_digits_split(seed=0)
>>> cfg = TrainConfig(task="classifier", first_activation="tanh", widths=(32, 32, 16), symmetry="augment", epochs=2)
>>> res = train(cfg, data, progress=False)
>>> 0.0 <= evaluate(res.model, data, "classifier")["accuracy"] <= 1.0
True
>>> err = layerwise.equivariance_error(res.model, {"hflip": (hflip_permutation(8), None)}, data.x_test)
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from .._errors import LayerwiseError
from .._oracle import _eval_mode
from ..testing import hflip_permutation

TASKS = ("classifier", "autoencoder")
FIRST_ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "relu": nn.ReLU}
SYMMETRIES = ("augment", "loss", "none")
IMAGE = 8
N_FEATURES = IMAGE * IMAGE
N_CLASSES = 10


@dataclass(frozen=True)
class DigitsData:
    """A seeded, stratified train/test split of the 8x8 digits, flattened and standardized.

    Pixels are scaled to ``[0, 1]`` (divided by 16), then standardized with one scalar ``mean`` and ``std`` of the
    train split: a global affine map commutes with every pixel permutation, so a flip acts on the standardized inputs
    exactly as on the images (``x[:, p]``).

    Attributes:
        x_train, x_test: float tensors ``(N, 64)``, row-major flattened 8x8 images.
        y_train, y_test: long tensors ``(N,)`` of labels 0-9.
        mean, std: the scalars used to standardize (``raw = x * std + mean``).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: float
    std: float


def _check_dtype(dtype, where: str) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise LayerwiseError(f"{where}: expected torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def load_digits_split(seed: int = 0, test_fraction: float = 0.25, dtype: torch.dtype = torch.float32) -> DigitsData:
    """Load scikit-learn's bundled digits (no download) and split them, stratified by label and seeded.

    >>> data = load_digits_split(seed=0)
    >>> tuple(data.x_train.shape), tuple(data.x_test.shape)
    ((1347, 64), (450, 64))
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not (isinstance(test_fraction, (int, float)) and 0.0 < test_fraction < 1.0):
        raise LayerwiseError(f"test_fraction: expected a number strictly between 0 and 1, got {test_fraction!r}")
    _check_dtype(dtype, "dtype")
    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float64) / 16.0
    y = np.asarray(digits.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    return DigitsData(
        x_train=torch.as_tensor((x_tr - mean) / std, dtype=dtype),
        y_train=torch.as_tensor(y_tr, dtype=torch.long),
        x_test=torch.as_tensor((x_te - mean) / std, dtype=dtype),
        y_test=torch.as_tensor(y_te, dtype=torch.long),
        mean=mean,
        std=std,
    )


def _check_widths(widths, where: str) -> tuple[int, ...]:
    try:
        out = tuple(widths)
    except TypeError:
        raise LayerwiseError(f"{where}: expected a sequence of positive ints, got {widths!r}") from None
    if not out or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in out):
        raise LayerwiseError(f"{where}: expected a non-empty sequence of positive ints, got {widths!r}")
    return out


def _linear(n_in: int, n_out: int, dtype: torch.dtype, gen: torch.Generator) -> nn.Linear:
    """An ``nn.Linear`` with PyTorch's default initialization drawn from ``gen``; ``skip_init`` keeps the
    constructor's own draw off the global generator."""
    lin = nn.utils.skip_init(nn.Linear, n_in, n_out, dtype=dtype)
    with torch.no_grad():
        nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=gen)
        bound = 1.0 / math.sqrt(n_in)
        nn.init.uniform_(lin.bias, -bound, bound, generator=gen)
    return lin


def build_mlp(
    first_activation: str,
    widths: tuple[int, ...] = (128, 128, 64),
    n_out: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """The paper's depth-4 MLP on flattened 8x8 images: ``first_activation`` after the first Linear, GELU after the
    others, a Linear output layer; seeded with PyTorch's default initialization (global RNG untouched).

    >>> build_mlp("tanh", widths=(8, 8, 4), n_out=3)
    Sequential(
      (0): Linear(in_features=64, out_features=8, bias=True)
      (1): Tanh()
      (2): Linear(in_features=8, out_features=8, bias=True)
      (3): GELU(approximate='none')
      (4): Linear(in_features=8, out_features=4, bias=True)
      (5): GELU(approximate='none')
      (6): Linear(in_features=4, out_features=3, bias=True)
    )
    """
    if first_activation not in FIRST_ACTIVATIONS:
        raise LayerwiseError(f"first_activation: expected one of {sorted(FIRST_ACTIVATIONS)}, got {first_activation!r}")
    widths = _check_widths(widths, "widths")
    if not (isinstance(n_out, int) and not isinstance(n_out, bool) and n_out > 0):
        raise LayerwiseError(f"n_out: expected a positive int, got {n_out!r}")
    _check_dtype(dtype, "dtype")
    gen = torch.Generator().manual_seed(seed)
    dims = (N_FEATURES, *widths)
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        mods.append(_linear(a, b, dtype, gen))
        mods.append(FIRST_ACTIVATIONS[first_activation]() if i == 0 else nn.GELU())
    mods.append(_linear(dims[-1], n_out, dtype, gen))
    return nn.Sequential(*mods)


def build_cnn(
    first_activation: str,
    channels: tuple[int, ...] = (16, 16),
    n_out: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """A small CNN on flattened 8x8 images: ``Unflatten`` to ``(1, 8, 8)``, 3x3 convolutions (zero padding 1) with
    ``first_activation`` then GELU, ``AvgPool2d(2)`` after the first two, ``AdaptiveAvgPool2d(1)``, ``Flatten`` and a
    Linear classifier; seeded.
    ``model[1:]`` is the CNN proper, on ``(N, 1, 8, 8)`` images (what :func:`layerwise.extract` analyses)."""
    if first_activation not in FIRST_ACTIVATIONS:
        raise LayerwiseError(f"first_activation: expected one of {sorted(FIRST_ACTIVATIONS)}, got {first_activation!r}")
    channels = _check_widths(channels, "channels")
    _check_dtype(dtype, "dtype")
    gen = torch.Generator().manual_seed(seed)
    mods: list[nn.Module] = [nn.Unflatten(1, (1, IMAGE, IMAGE))]
    c_in = 1
    for i, c in enumerate(channels):
        conv = nn.utils.skip_init(nn.Conv2d, c_in, c, 3, padding=1, dtype=dtype)
        bound = 1.0 / (c_in * 9) ** 0.5
        with torch.no_grad():
            conv.weight.uniform_(-bound, bound, generator=gen)
            conv.bias.uniform_(-bound, bound, generator=gen)
        mods += [conv, FIRST_ACTIVATIONS[first_activation]() if i == 0 else nn.GELU()]
        if i < min(len(channels) - 1, 2):
            mods.append(nn.AvgPool2d(2))  # 8x8 -> 4x4 -> 2x2
        c_in = c
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), _linear(c_in, n_out, dtype, gen)]
    return nn.Sequential(*mods)


def _choice(value, allowed, where: str) -> None:
    if value not in allowed:
        raise LayerwiseError(f"{where}: expected one of {sorted(allowed)}, got {value!r}")


def _positive_int(value, where: str) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise LayerwiseError(f"{where}: expected a positive int, got {value!r}")


def _nonnegative(value, where: str, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if strict else value >= 0)
    if not ok:
        kind = "positive" if strict else "non-negative"
        raise LayerwiseError(f"{where}: expected a finite {kind} number, got {value!r}")


@dataclass
class TrainConfig:
    """One training run.

    Attributes:
        task: ``"classifier"`` (10 logits, invariant under the symmetry) or ``"autoencoder"`` (64 outputs that flip
            with the input).
        first_activation: ``"tanh"``, ``"gelu"`` or ``"relu"`` after the first Linear (GELU after the others).
        widths: hidden widths.
        symmetry: ``"augment"`` (each sample flipped with probability 1/2), ``"loss"`` (the paper's soft
            equivariance loss in the second half of training) or ``"none"`` (the control).
        epochs, batch_size, lr, weight_decay: Adam training; the last batch of an epoch may be smaller.
        loss_weight: weight of the soft equivariance loss (used only with ``symmetry="loss"``).
        seed: initialization, data order and flips.
        arch: ``"mlp"`` (:func:`build_mlp`) or ``"cnn"`` (:func:`build_cnn`, classifier only; ``widths`` are
            its channels).
    """

    task: str
    first_activation: str
    widths: tuple[int, ...] = (128, 128, 64)
    symmetry: str = "none"
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    loss_weight: float = 1.0
    seed: int = 0
    arch: str = "mlp"

    def __post_init__(self) -> None:
        _choice(self.arch, ("mlp", "cnn"), "arch")
        if self.arch == "cnn" and self.task != "classifier":
            raise LayerwiseError(f"arch: 'cnn' is a classifier only, got task {self.task!r}")
        _choice(self.task, TASKS, "task")
        _choice(self.first_activation, tuple(FIRST_ACTIVATIONS), "first_activation")
        self.widths = _check_widths(self.widths, "widths")
        _choice(self.symmetry, SYMMETRIES, "symmetry")
        _positive_int(self.epochs, "epochs")
        _positive_int(self.batch_size, "batch_size")
        _nonnegative(self.lr, "lr", strict=True)
        _nonnegative(self.weight_decay, "weight_decay")
        _nonnegative(self.loss_weight, "loss_weight")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0):
            raise LayerwiseError(f"seed: expected a non-negative int, got {self.seed!r}")


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained network, in eval mode.
        init_model: a copy of the network before training (the untrained control).
        config: the configuration it was trained with.
        history: the dicts returned by ``on_epoch``: the initialization first, then one per epoch.
        train_loss: mean training loss of the last epoch (task loss plus the soft equivariance loss where active).
        seconds: wall-clock time of the whole call, ``on_epoch`` included.
    """

    model: nn.Sequential
    init_model: nn.Sequential
    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    train_loss: float = float("nan")
    seconds: float = 0.0


def _check_perm(perm, where: str) -> torch.Tensor:
    p = torch.as_tensor(perm)
    if p.ndim != 1 or p.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise LayerwiseError(f"{where}: expected a 1-D integer permutation, got shape {tuple(p.shape)} {p.dtype}")
    p = p.long()
    if len(p) != N_FEATURES:
        raise LayerwiseError(f"{where}: expected a permutation of the {N_FEATURES} pixels, got size {len(p)}")
    if not torch.equal(torch.sort(p).values, torch.arange(N_FEATURES)):
        missing = N_FEATURES - len(torch.unique(p[(p >= 0) & (p < N_FEATURES)]))
        raise LayerwiseError(f"{where}: not a permutation of the {N_FEATURES} pixels ({missing} indices missing)")
    return p


def _check_data(data, where: str = "data") -> None:
    if not isinstance(data, DigitsData):
        raise LayerwiseError(f"{where}: expected a DigitsData (from load_digits_split), got {type(data).__name__}")


def _sub_seeds(seed: int, n: int) -> list[int]:
    """Independent seeds for separate streams (data order, flips), so that changing one leaves the others alone."""
    return [int(s.generate_state(1, np.uint64)[0] >> np.uint64(1)) for s in np.random.SeedSequence(seed).spawn(n)]


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """Run PyTorch ops on ``n`` threads, restoring the previous count afterwards.

    The matrices here are tiny (batch 64, widths ~100): a second thread buys nothing, and when the cores are shared
    with another process the OpenMP workers of each small op wait on each other, which made single runs 10-40 times
    slower (26 s instead of 1.4 s) on a 2-core machine.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    config: TrainConfig,
    data: DigitsData,
    *,
    generator_perm: torch.Tensor | None = None,
    on_epoch: Callable[[int, nn.Sequential], dict] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``build_mlp`` on the digits as ``config`` says, teaching the input symmetry ``generator_perm``.

    The classifier minimizes cross-entropy and its outputs should be invariant; the autoencoder minimizes the
    reconstruction MSE and its outputs should flip with the input, ``f(g x) = g f(x)``. With ``symmetry="loss"``,
    from epoch ``epochs // 2`` on, ``loss_weight * mean((f(g x) - rho_out(g) f(x))**2)`` is added (logits for the
    classifier). Runs are deterministic: the initialization equals ``build_mlp(..., seed=config.seed)``, and data order
    and flips come from their own seeded generators (so "augment" and "none" see the same batches).

    Args:
        generator_perm: the pixel permutation to teach; default the left-right flip ``hflip_permutation(8)``.
        on_epoch: called as ``on_epoch(epoch, model)`` with the model in eval mode, first with ``epoch=-1`` (the
            initialization), then after every epoch (0, 1, ...); a returned mapping is appended to
            ``history`` (``None`` appends nothing).
        progress: show a tqdm bar over epochs with the running loss.
    """
    start = time.perf_counter()
    if not isinstance(config, TrainConfig):
        raise LayerwiseError(f"config: expected a TrainConfig, got {type(config).__name__}")
    _check_data(data)
    if data.x_train.shape[1:] != (N_FEATURES,):
        raise LayerwiseError(f"data.x_train: expected shape (N, {N_FEATURES}), got {tuple(data.x_train.shape)}")
    perm = _check_perm(hflip_permutation(IMAGE) if generator_perm is None else generator_perm, "generator_perm")
    classifier = config.task == "classifier"
    x_all, y_all = data.x_train, data.y_train
    n = x_all.shape[0]

    build = build_cnn if config.arch == "cnn" else build_mlp
    model = build(config.first_activation, config.widths, N_CLASSES if classifier else N_FEATURES,
                  config.seed, x_all.dtype)
    init_model = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    order_seed, flip_seed = _sub_seeds(config.seed, 2)
    order_gen = torch.Generator().manual_seed(order_seed)
    flip_gen = torch.Generator().manual_seed(flip_seed)
    history: list[dict] = []

    def report(epoch: int) -> None:
        if on_epoch is None:
            return
        model.eval()
        try:
            out = on_epoch(epoch, model)
        finally:
            model.train()
        if out is None:
            return
        if not isinstance(out, Mapping):
            raise LayerwiseError(f"on_epoch: expected it to return a dict or None, got {type(out).__name__}")
        history.append(dict(out))

    def task_loss(out: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, yb) if classifier else F.mse_loss(out, xb)

    model.train()
    report(-1)
    epoch_loss = float("nan")
    bar = tqdm(range(config.epochs), disable=not progress, desc=f"{config.task}/{config.symmetry}", unit="epoch")
    for epoch in bar:
        soft = config.symmetry == "loss" and epoch >= config.epochs // 2
        idx_all = torch.randperm(n, generator=order_gen)
        total = 0.0
        with _intra_op_threads(1):  # on_epoch below runs with the caller's thread count
            for lo in range(0, n, config.batch_size):
                idx = idx_all[lo : lo + config.batch_size]
                xb, yb = x_all[idx], y_all[idx]
                if config.symmetry == "augment":
                    flip = torch.rand(len(idx), generator=flip_gen) < 0.5
                    # the autoencoder's target is its input, so flipping the input flips the target with it
                    xb = torch.where(flip[:, None], xb[:, perm], xb)
                if soft:
                    both = model(torch.cat([xb, xb[:, perm]]))
                    out, out_g = both[: len(idx)], both[len(idx) :]
                    target = out if classifier else out[:, perm]  # rho_out(g) f(x): trivial, or the same flip
                    loss = task_loss(out, xb, yb) + config.loss_weight * F.mse_loss(out_g, target)
                else:
                    loss = task_loss(model(xb), xb, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
        epoch_loss = total / n
        bar.set_postfix(loss=f"{epoch_loss:.4f}", refresh=False)
        report(epoch)
    bar.close()
    model.eval()
    return TrainResult(model=model, init_model=init_model, config=config, history=history, train_loss=epoch_loss,
                       seconds=time.perf_counter() - start)


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(iter(model.parameters())).dtype


def evaluate(model: nn.Module, data: DigitsData, task: str) -> dict:
    """Test-split metrics: ``{"accuracy", "loss"}`` (cross-entropy) for a classifier, ``{"mse", "relative_error"}``
    (``|f(x) - x| / |x|``, Frobenius over the test split) for an autoencoder. The model's training flags are kept."""
    _choice(task, TASKS, "task")
    _check_data(data)
    x, y = data.x_test.to(_model_dtype(model)), data.y_test
    with _eval_mode(model):
        out = model(x)
    if task == "classifier":
        _check_outputs(out, N_CLASSES, "classifier")
        return {"accuracy": float((out.argmax(1) == y).double().mean()), "loss": float(F.cross_entropy(out, y))}
    _check_outputs(out, N_FEATURES, "autoencoder")
    return {"mse": float(F.mse_loss(out, x)), "relative_error": float((out - x).norm() / x.norm())}


def _check_outputs(out: torch.Tensor, want: int, task: str) -> None:
    if out.shape[-1] != want:
        raise LayerwiseError(f"model: a {task} has {want} outputs, this model has {out.shape[-1]}")


def flip_accuracy(model: nn.Module, data: DigitsData, perm: torch.Tensor) -> float:
    """Test accuracy of a classifier on the test images transformed by ``perm`` (``x[:, perm]``)."""
    _check_data(data)
    p = _check_perm(perm, "perm")
    x = data.x_test.to(_model_dtype(model))[:, p]
    with _eval_mode(model):
        out = model(x)
    _check_outputs(out, N_CLASSES, "classifier")
    return float((out.argmax(1) == data.y_test).double().mean())
