"""Wide arrays allocated through NumPy (huge-page advice) behave like any tensor, and so does a model built on them."""

import io

import pytest
import torch

import layerwise
from layerwise._memory import _LARGE, empty
from layerwise.testing import planted_mlp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [3, 2048])
def test_empty_has_the_requested_shape_and_dtype_and_holds_values(dtype, n):
    t = empty((n, n + 1), dtype)
    assert t.shape == (n, n + 1) and t.dtype == dtype and t.device.type == "cpu"
    t.copy_(torch.arange(t.numel(), dtype=dtype).view_as(t))
    assert float(t[-1, -1]) == t.numel() - 1
    large = t.numel() * t.element_size() >= _LARGE
    assert large == (n == 2048)


def test_non_float_and_small_tensors_are_plain_torch_tensors():
    assert empty((10,), torch.int64).untyped_storage().resizable()
    assert empty((10,), torch.float32).untyped_storage().resizable()


def test_a_wide_extracted_model_trains_saves_and_loads():
    """At width 1200 the weight matrices pass the NumPy threshold: the returned parameters must still take optimizer
    steps, round-trip through torch.save / weights_only load, and accept load_state_dict."""
    model, planted = planted_mlp("tanh", group="z2", image=8, widths=(1200, 1200), seed=0)
    res = layerwise.extract(model, planted.generators)
    assert res.equivariant
    out = res.model
    big = [p for p in out.parameters() if p.numel() * p.element_size() >= _LARGE]
    assert big, "the test needs a weight above the threshold"
    x = torch.randn(16, 64)
    before = out(x).detach()
    opt = torch.optim.SGD(out.parameters(), lr=0.1)
    out(x).square().mean().backward()
    opt.step()
    assert not torch.allclose(out(x), before)
    buf = io.BytesIO()
    torch.save(out.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = layerwise.extract(model, planted.generators).model
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), out(x))
