import json
import os

import pytest
import torch
from torch import nn

from layerwise import LayerwiseError
from layerwise.io import build_arch, load_model, load_state_dict, parse_symmetry, save_state_dict
from layerwise.testing import hflip_permutation, planted_mlp, rot90_permutation


def _model():
    model, planted = planted_mlp("tanh", group="z2", widths=(8,), seed=0)
    return model, planted


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_round_trip(tmp_path, suffix):
    model, _ = _model()
    path = save_state_dict(model.state_dict(), tmp_path / f"m{suffix}")
    loaded = load_state_dict(path)
    assert set(loaded) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[k], v)
    assert sorted(os.listdir(tmp_path)) == [f"m{suffix}"]  # no temporary left behind


def test_save_refuses_to_overwrite_and_is_atomic(tmp_path, monkeypatch):
    model, _ = _model()
    path = save_state_dict(model.state_dict(), tmp_path / "m.pt")
    before = path.read_bytes()
    with pytest.raises(LayerwiseError, match="exists"):
        save_state_dict(model.state_dict(), path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_state_dict(model.state_dict(), path, overwrite=True)
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]  # and no half-written temporary remains


def test_pickled_full_model_is_refused_unless_trusted(tmp_path):
    model, _ = _model()
    torch.save(model, tmp_path / "full.pt")
    with pytest.raises(LayerwiseError, match="--trust-checkpoint"):
        load_state_dict(tmp_path / "full.pt")
    assert isinstance(load_state_dict(tmp_path / "full.pt", trust=True), nn.Module)


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LayerwiseError, match="cannot be loaded as plain weights"):
        load_state_dict(tmp_path / "junk.pt")
    with pytest.raises(LayerwiseError, match="safetensors"):
        load_state_dict(tmp_path / "junk.safetensors")
    with pytest.raises(LayerwiseError, match="no such file"):
        load_state_dict(tmp_path / "missing.pt")
    torch.save({"a": 1}, tmp_path / "notensors.pt")
    with pytest.raises(LayerwiseError, match="not a state_dict"):
        load_state_dict(tmp_path / "notensors.pt")


def test_build_arch_specs():
    m = build_arch("mlp:64-128-128-10:tanh")
    assert [type(x).__name__ for x in m] == ["Linear", "Tanh", "Linear", "Tanh", "Linear"]
    m = build_arch("mlp:64-128-32-10:tanh,gelu")
    assert [type(x).__name__ for x in m] == ["Linear", "Tanh", "Linear", "GELU", "Linear"]
    model, _ = _model()
    m = build_arch("mlp:auto:tanh", model.state_dict())
    assert [x.out_features for x in m if isinstance(x, nn.Linear)] == [
        x.out_features for x in model if isinstance(x, nn.Linear)]
    for spec, match in [("mlp", "expected"), ("mlp:64-x-10:tanh", "integers"), ("mlp:64-10:tanh,tanh", "2 "),
                        ("mlp:64-32-10:swish", "unknown activation"), ("mlp:auto:tanh", "needs a checkpoint"),
                        ("nosuchmodule_xyz:f", "cannot import"), ("os:nosuchfunction", "no function"),
                        ("os:getcwd", "not an nn.Module")]:
        with pytest.raises(LayerwiseError, match=match):
            build_arch(spec)


def test_module_function_arch(tmp_path, monkeypatch):
    (tmp_path / "my_arch_mod.py").write_text(
        "from torch import nn\ndef make():\n    return nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(build_arch("my_arch_mod:make"), nn.Sequential)


def test_load_model_checks_keys_and_shapes(tmp_path):
    model, _ = _model()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with pytest.raises(LayerwiseError, match="keys do not match"):
        load_model(tmp_path / "m.pt", "mlp:16-8-8-3:tanh")
    with pytest.raises(LayerwiseError, match="shape"):
        load_model(tmp_path / "m.pt", f"mlp:16-{model[0].out_features + 1}-3:tanh")
    loaded = load_model(tmp_path / "m.pt", "mlp:auto:tanh")
    x = torch.randn(4, 16)
    assert torch.equal(loaded(x), model(x))
    double = model.double()
    torch.save(double.state_dict(), tmp_path / "d.pt")
    assert next(load_model(tmp_path / "d.pt", "mlp:auto:tanh").parameters()).dtype == torch.float64


def test_parse_symmetry_presets_and_json(tmp_path):
    gens = parse_symmetry("d4:4x4", 16, 3)
    assert set(gens) == {"rot90", "hflip"} and gens["hflip"][1] is None
    assert torch.equal(gens["rot90"][0], rot90_permutation(4))
    gens = parse_symmetry("hflip:4x4", 16, 16, "equivariant")
    assert torch.equal(gens["hflip"][1], hflip_permutation(4))
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"f": {"input": hflip_permutation(4).tolist(), "output": None}}))
    gens = parse_symmetry(str(path), 16, 3)
    assert torch.equal(gens["f"][0], hflip_permutation(4)) and gens["f"][1] is None
    for spec, match in [("hflip", "image tensors"), ("shear:4x4", "unknown preset"), ("hflip:4by4", "8x8"),
                        ("hflip:3x3", "9 pixels"), ("rot90:2x8", "square"), ("missing.json", "no such file")]:
        with pytest.raises(LayerwiseError, match=match):
            parse_symmetry(spec, 16, 3)
    with pytest.raises(LayerwiseError, match="outputs"):
        parse_symmetry("hflip:4x4", 16, 3, "equivariant")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(LayerwiseError, match="not valid JSON"):
        parse_symmetry(str(bad), 16, 3)
