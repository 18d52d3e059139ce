"""The attention modules: SelfAttention agrees with nn.MultiheadAttention and exposes its heads and maps."""

import pytest
import torch
from torch import nn

from layerwise import LayerwiseError
from layerwise.nn import PositionalEncoding, SelfAttention

from ..conftest import DTYPES, FUNCTION_RTOL


@pytest.mark.parametrize("dtype", DTYPES)
def test_heads_and_output_projection_give_the_forward_pass(dtype):
    layer = SelfAttention(12, 3, dtype=dtype).eval()
    x = torch.randn(4, 7, 12, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        via_heads = layer.heads(x) @ layer.attn.out_proj.weight.T + layer.attn.out_proj.bias
        ref = layer.attn(x, x, x, need_weights=True, average_attn_weights=False)
    assert float((y - via_heads).norm() / y.norm()) <= FUNCTION_RTOL[dtype]
    maps = layer.attention_maps(x)
    assert torch.allclose(maps, ref[1], atol=10 * FUNCTION_RTOL[dtype])
    assert torch.allclose(maps.sum(-1), torch.ones(4, 3, 7, dtype=dtype))


def test_from_module_shares_the_weights_and_checks_the_settings():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    layer = SelfAttention.from_module(mha)
    assert layer.attn is mha and layer.num_heads == 2 and layer.head_dim == 4
    with pytest.raises(LayerwiseError, match="batch_first"):
        SelfAttention.from_module(nn.MultiheadAttention(8, 2))
    with pytest.raises(LayerwiseError, match="add_bias_kv"):
        SelfAttention.from_module(nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True))
    with pytest.raises(LayerwiseError, match="kdim"):
        SelfAttention.from_module(nn.MultiheadAttention(8, 2, batch_first=True, kdim=4))
    with pytest.raises(LayerwiseError, match="mha"):
        SelfAttention.from_module(nn.Linear(3, 3))


def test_bad_arguments_and_shapes_are_named():
    with pytest.raises(LayerwiseError, match="not divisible"):
        SelfAttention(10, 3)
    with pytest.raises(LayerwiseError, match="num_heads"):
        SelfAttention(8, 0)
    with pytest.raises(LayerwiseError, match=r"\(N, T, 8\)"):
        SelfAttention(8, 2)(torch.randn(3, 8))
    pe = PositionalEncoding(5, 3)
    with pytest.raises(LayerwiseError, match=r"\(N, 5, 3\)"):
        pe(torch.randn(2, 4, 3))
    with pytest.raises(LayerwiseError, match="num_tokens"):
        PositionalEncoding(0, 3)
