"""The test oracle, shipped with the library: end-to-end and per-layer equivariance errors, representation checks."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ._errors import LayerwiseError
from .group import FiniteGroup, TokenAction, action_matrix, generator_pairs
from .group._actions import _to_numpy
from .hidden import LatentAction


def _feature_action(action, x: torch.Tensor, where: str) -> torch.Tensor:
    """Apply an action to a batch: on the last axis, or on the flattened features when sizes say so."""
    if action is None:
        return x
    if isinstance(action, TokenAction):
        return action.apply(x)
    if isinstance(action, str):
        from .layers._conv import SPATIAL

        if action not in SPATIAL or x.ndim < 3:
            raise LayerwiseError(f"{where}: spatial action {action!r} needs one of {sorted(SPATIAL)} and inputs of "
                                 f"shape (N, C, H, W), got shape {tuple(x.shape)}")
        return SPATIAL[action](x)
    last = x.shape[-1]
    flat = math.prod(x.shape[1:])
    arr = _to_numpy(action, where)
    if arr.ndim == 0 or arr.ndim > 2:
        raise LayerwiseError(f"{where}: an action must be a permutation, a square matrix or None, got shape "
                             f"{arr.shape}")
    size = arr.shape[0]
    if size == last:
        mat = action_matrix(action, last, where)
        return x @ torch.as_tensor(mat.T, dtype=x.dtype, device=x.device)
    if size == flat:
        mat = action_matrix(action, flat, where)
        y = x.reshape(x.shape[0], -1) @ torch.as_tensor(mat.T, dtype=x.dtype, device=x.device)
        return y.reshape(x.shape)
    raise LayerwiseError(
        f"{where}: action of size {size} matches neither the last axis ({last}) nor the flattened features ({flat})"
    )


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = [m.training for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, f in zip(model.modules(), flags):
            m.training = f


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.get_default_dtype()


def _forward(model: nn.Module, x: torch.Tensor, where: str = "inputs") -> torch.Tensor:
    """Run the model; a shape or dtype mismatch deep inside torch becomes a LayerwiseError naming the inputs."""
    try:
        return model(x)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:  # torch asserts shapes too
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LayerwiseError(
            f"{where}: the model cannot run on a batch of shape {tuple(x.shape)} ({first_line})"
        ) from None


def _check_inputs(inputs, model: nn.Module) -> torch.Tensor:
    if not isinstance(model, nn.Module):
        raise LayerwiseError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, torch.Tensor):
        raise LayerwiseError(f"inputs: expected a tensor, got {type(inputs).__name__}")
    if inputs.ndim < 2 or inputs.shape[0] == 0:
        raise LayerwiseError(f"inputs: expected a non-empty batch (N, ...), got shape {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise LayerwiseError(f"inputs: expected floating point values, got dtype {inputs.dtype}")
    if not torch.isfinite(inputs).all():
        raise LayerwiseError(f"inputs: {int((~torch.isfinite(inputs)).sum())} NaN or infinite values")
    param = next(model.parameters(), None)
    device = param.device if param is not None else inputs.device
    return inputs.to(dtype=_model_dtype(model), device=device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(b.norm())
    return float((a - b).norm()) / max(den, 1e-300)


def equivariance_error(model: nn.Module, generators: dict, inputs: torch.Tensor) -> float:
    """Worst relative end-to-end error ``|f(g x) - g f(x)| / |f(x)|`` (Frobenius over the batch) over generators.

    The model runs in eval mode and without gradients; its training flags are restored.

    >>> import torch, layerwise
    >>> from layerwise.testing import planted_mlp, flip_permutation
    >>> model, _ = planted_mlp("relu", group="z2", image=4, widths=(8,), seed=0, dtype=torch.float64)
    >>> x = torch.randn(32, 16, dtype=torch.float64)
    >>> layerwise.equivariance_error(model, {"flip": (flip_permutation(4), None)}, x) < 1e-12
    True
    """
    pairs = generator_pairs(generators)
    x = _check_inputs(inputs, model)
    worst = 0.0
    with _eval_mode(model):
        fx = _forward(model, x)
        for name, act_in, act_out in pairs:
            gx = _feature_action(act_in, x, f"generators[{name!r}][0] (input action)")
            gfx = _feature_action(act_out, fx, f"generators[{name!r}][1] (output action)")
            worst = max(worst, _rel(_forward(model, gx), gfx))
    return worst


def hidden_outputs(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of every hidden layer (each Linear followed by its activation) of a dense ``nn.Sequential``."""
    from .layers import parse_dense

    net = parse_dense(model)
    marks = {b.act_index for b in net.hidden}
    outs = []
    with _eval_mode(model):
        z = x
        for i, mod in enumerate(net.modules):
            z = _forward(mod, z, f"inputs (at module {i})")
            if i in marks:
                outs.append(z)
    return outs


def layer_equivariance_errors(
    model: nn.Sequential, latent: list[dict[str, LatentAction]], generators: dict, inputs: torch.Tensor
) -> list[dict[str, float]]:
    """Per hidden layer and generator, ``|f_<=i(g x) - k_i(g) f_<=i(x)| / |f_<=i(x)|`` on ``inputs``.

    ``latent`` is :attr:`ExtractionResult.latent` for ``model`` (``ExtractionResult.model``).
    """
    pairs = generator_pairs(generators)
    x = _check_inputs(inputs, model)
    base = hidden_outputs(model, x)
    if len(base) != len(latent):
        raise LayerwiseError(f"latent: {len(latent)} layers given, the model has {len(base)} hidden layers")
    out: list[dict[str, float]] = [{} for _ in base]
    for name, act_in, _ in pairs:
        moved = hidden_outputs(model, _feature_action(act_in, x, f"generators[{name!r}][0] (input action)"))
        for i, (z, gz) in enumerate(zip(base, moved)):
            out[i][name] = _rel(gz, latent[i][name](z))
    return out


def assert_layerwise_equivariant(result, inputs: torch.Tensor, generators: dict, atol: float | None = None) -> None:
    """Raise ``AssertionError`` unless every hidden layer of ``result.model`` is equivariant under ``result.latent``
    on ``inputs`` (relative error ``<= atol``, default ``10 * result.tol``) and the group relations hold."""
    atol = 10 * result.tol if atol is None else atol
    errs = layer_equivariance_errors(result.model, result.latent, generators, inputs)
    for i, e in enumerate(errs):
        for name, v in e.items():
            assert v <= atol, f"hidden layer {i + 1}, generator {name!r}: error {v:.3g} > {atol:g}"
    for i, acts in enumerate(result.group_latent):
        r = homomorphism_residual(result.group, acts)
        assert r <= atol, f"hidden layer {i + 1}: group relations fail by {r:.3g}"
    e2e = equivariance_error(result.model, generators, inputs)
    assert e2e <= atol, f"end-to-end error {e2e:.3g} > {atol:g}"


def homomorphism_residual(group: FiniteGroup, actions: list[LatentAction]) -> float:
    """Worst deviation of ``k(s) k(h) = k(s h)`` over the Cayley table, and of ``k(e) = 1``."""
    worst = actions[0].distance(LatentAction.identity(actions[0].size, device=actions[0].perm.device))
    for h in range(group.order):
        for s, _ in enumerate(group.names):
            gen = actions[group.generator_index(group.names[s])]
            worst = max(worst, (gen @ actions[h]).distance(actions[int(group.table[h, s])]))
    return worst


def character(actions: list[LatentAction]) -> np.ndarray:
    """Traces of the linear parts of the actions of all group elements."""
    return np.array([a.character() for a in actions])


def matrix_character(mats: np.ndarray) -> np.ndarray:
    """Traces of a stack of representation matrices ``(order, n, n)``."""
    return np.trace(mats, axis1=1, axis2=2)
