"""Checkpoints, architecture specs and symmetry specs for the command line (outside the maths core).

Loading never executes code from a checkpoint: ``torch.load(..., weights_only=True)`` or safetensors; a pickled
full model is refused unless the caller passes ``trust=True``. Writes are atomic (temporary file, then rename).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ._errors import LayerwiseError
from .nn import Power
from .testing import hflip_permutation, rot90_permutation, vflip_permutation

ACTIVATION_NAMES = {
    "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.01), "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU, "silu": nn.SiLU, "softplus": nn.Softplus, "elu": nn.ELU, "softsign": nn.Softsign,
    "power2": lambda: Power(2), "power3": lambda: Power(3),
}
IMAGE_PRESETS = ("hflip", "vflip", "rot90", "d4")


def load_state_dict(path: str | os.PathLike, *, trust: bool = False) -> dict[str, torch.Tensor] | nn.Module:
    """Read a ``state_dict`` saved with ``torch.save`` (loaded with ``weights_only=True``) or a safetensors file.

    A pickled full model cannot be read safely; it is refused unless ``trust=True``, in which case the module is
    returned (loading it runs code from the file).
    """
    path = Path(path)
    if not path.is_file():
        raise LayerwiseError(f"checkpoint: no such file {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise LayerwiseError(f"checkpoint: {path.name} is not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad or unsafe files
        if not trust:
            raise LayerwiseError(
                f"checkpoint: {path.name} cannot be loaded as plain weights ({type(exc).__name__}); if it is a pickled "
                "full model from a source you trust, pass --trust-checkpoint (loading it executes code from the file)"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise LayerwiseError(f"checkpoint: {path.name} is not a torch checkpoint ({type(exc2).__name__})") from None
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in obj.items()):
        raise LayerwiseError(f"checkpoint: {path.name} holds a {type(obj).__name__}, not a state_dict of tensors")
    return dict(obj)


def load_tensor(path: str | os.PathLike) -> torch.Tensor:
    """A tensor of inputs saved with ``torch.save`` (a bare tensor, or a dict holding exactly one tensor)."""
    path = Path(path)
    if not path.is_file():
        raise LayerwiseError(f"--data: no such file {str(path)!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LayerwiseError(f"--data: {path.name} cannot be loaded as plain tensors ({type(exc).__name__})") from None
    if isinstance(obj, Mapping):
        values = list(obj.values())
        obj = values[0] if len(values) == 1 else None
    if not isinstance(obj, torch.Tensor) or not obj.is_floating_point():
        raise LayerwiseError(f"--data: {path.name} must hold one floating-point tensor of inputs")
    return obj


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``state`` atomically (a temporary file in the same folder, then a rename); never half a file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise LayerwiseError(f"output: {str(path)!r} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise LayerwiseError(f"output: folder {str(path.parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, tmp)
        else:
            torch.save(tensors, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a checkpoint gets the usual permissions
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _linear_shapes(state: Mapping[str, torch.Tensor]) -> list[tuple[int, int]]:
    idx = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"(\d+)\.weight", k)))
    return [tuple(state[f"{i}.weight"].shape) for i in idx]  # type: ignore[misc]


def build_arch(spec: str, state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Build a model from a spec.

    - ``mlp:64-128-128-10:tanh``: Linear layers of those sizes with that activation between them; one activation
      name per hidden layer is allowed too (``mlp:64-128-128-64-10:tanh,gelu,gelu``); ``mlp:auto:tanh,gelu``
      reads the sizes from the checkpoint (keys ``0.weight``, ``2.weight``, ... as ``nn.Sequential`` names them).
    - ``module:function``: import ``module`` and call ``function()``, which returns the model.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise LayerwiseError(f"--arch: expected 'mlp:SIZES:ACTIVATION' or 'module:function', got {spec!r}")
    if spec.startswith("mlp:"):
        parts = spec.split(":")
        if len(parts) != 3:
            raise LayerwiseError(f"--arch: expected 'mlp:64-128-10:tanh', got {spec!r}")
        _, sizes_text, acts_text = parts
        if sizes_text == "auto":
            if state is None:
                raise LayerwiseError("--arch: 'mlp:auto:...' needs a checkpoint to read the sizes from")
            shapes = _linear_shapes(state)
            if not shapes:
                raise LayerwiseError("--arch: the checkpoint has no keys '0.weight', '2.weight', ... of an MLP")
            sizes = [shapes[0][1]] + [s[0] for s in shapes]
        else:
            try:
                sizes = [int(t) for t in sizes_text.split("-")]
            except ValueError:
                raise LayerwiseError(f"--arch: sizes must be integers joined by '-', got {sizes_text!r}") from None
        if len(sizes) < 2 or min(sizes) < 1:
            raise LayerwiseError(f"--arch: need at least two positive sizes, got {sizes}")
        acts = acts_text.split(",")
        n_hidden = len(sizes) - 2
        if len(acts) == 1:
            acts = acts * n_hidden
        if len(acts) != n_hidden:
            raise LayerwiseError(f"--arch: {len(acts)} activations given for {n_hidden} hidden layers")
        for a in acts:
            if a not in ACTIVATION_NAMES:
                raise LayerwiseError(f"--arch: unknown activation {a!r}; choose from {sorted(ACTIVATION_NAMES)}")
        mods: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            mods.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < n_hidden:
                mods.append(ACTIVATION_NAMES[acts[i]]())
        return nn.Sequential(*mods)
    module_name, _, func_name = spec.partition(":")
    import sys

    added = os.getcwd() not in sys.path
    if added:  # the console script does not put the current folder on the path; `python -m` does
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LayerwiseError(f"--arch: cannot import module {module_name!r} ({exc})") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    func = getattr(module, func_name, None)
    if not callable(func):
        raise LayerwiseError(f"--arch: {module_name!r} has no function {func_name!r}")
    model = func()
    if not isinstance(model, nn.Module):
        raise LayerwiseError(f"--arch: {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def load_model(checkpoint: str | os.PathLike, arch: str | None, *, trust: bool = False) -> nn.Module:
    """The model of ``checkpoint`` with the architecture ``arch`` (weights loaded strictly), in eval mode."""
    obj = load_state_dict(checkpoint, trust=trust)
    if isinstance(obj, nn.Module):
        return obj.eval()
    if arch is None:
        raise LayerwiseError("--arch: required for a state_dict checkpoint (e.g. mlp:64-128-10:tanh or mlp:auto:tanh)")
    model = build_arch(arch, obj)
    dtypes = {v.dtype for v in obj.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        model = model.to(dtypes.pop())
    expected = model.state_dict()
    missing = sorted(set(expected) - set(obj))
    unexpected = sorted(set(obj) - set(expected))
    if missing or unexpected:
        raise LayerwiseError(f"checkpoint: keys do not match --arch {arch}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    for k, v in expected.items():
        if tuple(v.shape) != tuple(obj[k].shape):
            raise LayerwiseError(f"checkpoint: {k} has shape {tuple(obj[k].shape)}, --arch {arch} expects "
                                 f"{tuple(v.shape)}")
    model.load_state_dict(obj)
    return model.eval()


def parse_symmetry(spec: str, in_features: int, out_features: int, output: str = "invariant") -> dict:
    """Generators from a preset (``hflip:8x8``, ``vflip:8x8``, ``rot90:8x8``, ``d4:8x8`` on flattened images) or a
    JSON file ``{"name": {"input": perm | matrix | null, "output": perm | matrix | null}}``.

    ``output``: ``"invariant"`` (outputs unchanged) or ``"equivariant"`` (outputs transform like the inputs), for
    presets.
    """
    if output not in ("invariant", "equivariant"):
        raise LayerwiseError(f"--output-action: expected 'invariant' or 'equivariant', got {output!r}")
    if spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise LayerwiseError(f"--symmetry: no such file {spec!r}")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LayerwiseError(f"--symmetry: {path.name} is not valid JSON ({exc})") from None
        if not isinstance(raw, dict) or not raw:
            raise LayerwiseError(f"--symmetry: {path.name} must hold a non-empty object of generators")
        gens = {}
        for name, entry in raw.items():
            if not isinstance(entry, dict) or not {"input", "output"} >= set(entry) or "input" not in entry:
                raise LayerwiseError(f"--symmetry: generator {name!r} must be {{'input': ..., 'output': ...}}")
            gens[name] = (_json_action(entry.get("input"), f"{name}.input"),
                          _json_action(entry.get("output"), f"{name}.output"))
        return gens
    name, _, size = spec.partition(":")
    if name in IMAGE_PRESETS and not size:
        raise LayerwiseError(
            f"--symmetry: preset {name!r} acts on image tensors (N, C, H, W), which needs a convolutional model; for "
            f"an MLP on flattened images give the size, e.g. {name}:8x8")
    if name not in IMAGE_PRESETS:
        raise LayerwiseError(f"--symmetry: unknown preset {name!r}; use one of {[p + ':8x8' for p in IMAGE_PRESETS]} "
                             "or a .json file")
    m = re.fullmatch(r"(\d+)x(\d+)", size)
    if not m:
        raise LayerwiseError(f"--symmetry: image size must look like 8x8, got {size!r}")
    h, w = int(m.group(1)), int(m.group(2))
    if h * w != in_features:
        raise LayerwiseError(f"--symmetry: {h}x{w} = {h * w} pixels, but the model takes {in_features} features")
    if name in ("rot90", "d4") and h != w:
        raise LayerwiseError(f"--symmetry: {name} needs a square image, got {h}x{w}")
    if output == "equivariant" and out_features != in_features:
        raise LayerwiseError(f"--output-action equivariant: the model has {out_features} outputs for {in_features} "
                             "inputs")
    perms = {"hflip": {"hflip": hflip_permutation(h, w)}, "vflip": {"vflip": vflip_permutation(h, w)},
             "rot90": {"rot90": None}, "d4": {"rot90": None, "hflip": hflip_permutation(h, w)}}[name]
    if "rot90" in perms:
        perms["rot90"] = rot90_permutation(h)
    return {k: (p, p if output == "equivariant" else None) for k, p in perms.items()}


def _json_action(value, where: str):
    if value is None:
        return None
    try:
        t = torch.tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise LayerwiseError(f"--symmetry: {where} is not a list of numbers ({exc})") from None
    return t
