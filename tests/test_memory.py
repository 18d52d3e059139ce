"""Wide arrays allocated with huge-page advice behave like any tensor, and so does a model built on them."""

import io

import pytest
import torch

import layerwise
from layerwise._memory import _LARGE, empty
from layerwise.testing import planted_mlp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
@pytest.mark.parametrize("n", [3, 2048])
def test_empty_is_an_ordinary_tensor_that_holds_values(dtype, n):
    t = empty((n, n + 1), dtype)
    assert t.shape == (n, n + 1) and t.dtype == dtype and t.device.type == "cpu"
    t.copy_(torch.arange(t.numel(), dtype=dtype).view_as(t))
    assert int(t[-1, -1]) == t.numel() - 1
    assert t.untyped_storage().resizable() and t.data_ptr() % 64 == 0
    assert (t.numel() * t.element_size() >= _LARGE) == (n == 2048)


def test_a_wide_extracted_model_trains_saves_loads_and_resizes():
    """At width 1200 the weight matrices pass the threshold: the returned parameters must take optimizer steps,
    round-trip through torch.save / weights_only load, accept load_state_dict, and free their storage like any
    parameter."""
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
    big[0].data.untyped_storage().resize_(0)  # torch.distributed's way of freeing a parameter's storage
