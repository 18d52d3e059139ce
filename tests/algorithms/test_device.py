"""The device= option: the same results on an explicit device as by default, clear errors for unusable devices, and
(where CUDA exists) the same actions on the GPU as on the CPU."""

import pytest
import torch

import layerwise
from layerwise import LayerwiseError
from layerwise.testing import perturb, planted_mlp

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _same(a, b):
    return all(torch.equal(x.perm.cpu(), y.perm.cpu()) and torch.allclose(x.scale.cpu(), y.scale.cpu(), atol=1e-6)
               for x, y in zip(a, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_results_on_a_device_match_the_default(device, activation):
    model, planted = planted_mlp(activation, group="d4", image=4, widths=(24, 16), seed=2)
    gens = planted.generators
    ref = layerwise.extract(model, gens)
    res = layerwise.extract(model, gens, device=device)
    assert res.equivariant and ref.equivariant
    assert all(_same(a.values(), b.values()) for a, b in zip(res.latent, ref.latent))
    noisy = perturb(model, 0.05, seed=1)
    data = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    for x in (None, data):
        al_ref = layerwise.align(noisy, gens, x)
        al_dev = layerwise.align(noisy, gens, x, device=device)
        assert all(_same(a.latent.values(), b.latent.values()) for a, b in zip(al_dev, al_ref))
    sym = layerwise.symmetrize(noisy, gens, data, device=device)
    assert next(sym.parameters()).device.type == device
    assert layerwise.extract(sym.cpu(), gens).equivariant
    naive = layerwise.naive_average(noisy, gens, device=device)
    ref_naive = layerwise.naive_average(noisy, gens)
    assert all(torch.allclose(p.cpu(), q, atol=1e-6) for p, q in zip(naive.parameters(), ref_naive.parameters()))


@pytest.mark.parametrize("device", ["nonsense", "meta", "cuda:99" if torch.cuda.is_available() else "cuda"])
def test_unusable_devices_are_refused_by_name(device):
    model, planted = planted_mlp("tanh", group="z2", widths=(8,), seed=0)
    for call in (lambda: layerwise.extract(model, planted.generators, device=device),
                 lambda: layerwise.align(model, planted.generators, device=device),
                 lambda: layerwise.symmetrize(model, planted.generators, device=device)):
        with pytest.raises(LayerwiseError, match="device"):
            call()


def test_the_device_argument_reaches_the_adapter(monkeypatch):
    """On a CPU-only machine the results cannot differ, so check that the argument is passed through."""
    from layerwise.layers import _dense

    seen = []
    real = _dense.check_device
    monkeypatch.setattr(_dense, "check_device", lambda d: seen.append(d) or real(d))
    model, planted = planted_mlp("tanh", group="z2", widths=(8,), seed=0)
    layerwise.extract(model, planted.generators, device="cpu")
    layerwise.align(model, planted.generators, device="cpu")
    layerwise.symmetrize(model, planted.generators, device="cpu")
    layerwise.naive_average(model, planted.generators, device="cpu")
    assert seen == ["cpu"] * 4
