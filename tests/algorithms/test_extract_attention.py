"""Exact extraction on planted attention models: heads in swapped pairs (or regular orbits) and fixed heads, hidden by
a head permutation, per-head GL(d_head) changes of queries/keys and values, key biases, value biases moved into the
output bias and a constant shift of the positional encoding."""

import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import layerwise
from layerwise import LayerwiseError, TokenAction
from layerwise.nn import PositionalEncoding, SelfAttention
from layerwise.testing import patch_generators, planted_attention

from ..conftest import DTYPES, FUNCTION_RTOL

#: certificate residuals of a planted model stay far below the default tolerances (1e-4 float32, 1e-8 float64)
ORTHO_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
CASES = {
    "z2 pairs+fixed, tanh tail": ("z2", {}),
    "z2 no tail": ("z2", {"tail": None}),
    "z2 no positional encoding": ("z2", {"positional": False}),
    "z2 relu tail, invariant features": ("z2", {"tail": "relu", "out": "invariant"}),
    "d4 regular orbit of 8 heads": ("d4", {"channels": 4, "fixed_heads": 0}),
}


def _tokens(model, n=16, seed=1):
    att = next(m for m in model if isinstance(m, SelfAttention))
    pe = [m for m in model if isinstance(m, PositionalEncoding)]
    t = pe[0].num_tokens if pe else 16
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, att.attn.embed_dim, generator=g).to(next(model.parameters()).dtype)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_planted_attention_is_certified_and_its_head_action_recovered(case, dtype):
    group, kw = CASES[case]
    model, planted = planted_attention(group, dtype=dtype, seed=3, **kw)
    before = copy.deepcopy(model.state_dict())
    res = layerwise.extract(model, planted.generators)
    assert res.equivariant, res.first_failure
    assert res.residual <= res.tol
    assert res.notes == []
    # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # head permutations: the planted cycle type for every generator, and the planted character for every element
    heads = res.latent[planted.attention_layer]
    for name, cycle_type in planted.cycle_types().items():
        assert heads[name].cycle_type() == cycle_type
    got = np.array([a.character() for a in res.group_latent[planted.attention_layer]])
    np.testing.assert_allclose(got, planted.characters(), atol=1e-6)
    # canonical choice: every per-head map orthogonal, and the action linear
    for act in res.group_latent[planted.attention_layer]:
        assert act.orthogonality() <= ORTHO_TOL[dtype]
        assert float(act.offset.abs().max()) <= ORTHO_TOL[dtype] * 10
    # the returned model computes the same function
    x = _tokens(model)
    with torch.no_grad():
        assert _rel(res.model(x), model(x)) <= 10 * FUNCTION_RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_head_action_verifies_on_the_heads_outputs(dtype):
    """heads(g x) = k(heads(x)) with the tokens permuted as the input's, on the returned model."""
    model, planted = planted_attention("d4", channels=4, fixed_heads=0, dtype=dtype, seed=5)
    res = layerwise.extract(model, planted.generators)
    assert res.equivariant
    pe, att = res.model[0], res.model[1]
    x = _tokens(model)
    for name, (act_in, _) in planted.generators.items():
        k = res.latent[0][name]
        with torch.no_grad():
            lhs = att.heads(pe(act_in.apply(x)))
            rhs = k(att.heads(pe(x))[:, k.tokens])
        assert _rel(lhs, rhs) <= 10 * FUNCTION_RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_without_the_canonical_move_the_hidden_head_maps_are_not_orthogonal(dtype):
    model, planted = planted_attention("z2", dtype=dtype, seed=2)
    res = layerwise.extract(model, planted.generators, canonical=False)
    assert res.equivariant
    assert max(a.orthogonality() for a in res.group_latent[0]) > 0.05  # the hidden GL(d_head) changes
    assert sum(float(a.offset.abs().max()) for a in res.group_latent[0]) > 1e-3  # the moved value biases
    with torch.no_grad():
        x = _tokens(model)
        assert torch.equal(res.model(x), model(x))  # the parameterization is kept


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["query", "value", "tail"])
def test_non_equivariant_controls_are_rejected_where_they_break(where, dtype):
    model, planted = planted_attention("z2", dtype=dtype, seed=4)
    rel = {torch.float32: 1e-3, torch.float64: 1e-6}[dtype]
    bad = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if where == "tail":
            w = bad[2].weight
            w.add_(rel * w.norm() / w.numel() ** 0.5 * torch.randn(w.shape, generator=g).to(w.dtype))
        else:
            w = bad[1].attn.in_proj_weight
            rows = slice(0, 2) if where == "query" else slice(16, 18)
            w[rows] += rel * w[rows].norm() * torch.randn(w[rows].shape, generator=g).to(w.dtype)
    res = layerwise.extract(bad, planted.generators)
    assert not res.equivariant
    assert res.failed_layer == (1 if where == "tail" else 0)
    assert ("attention" in res.first_failure) == (where != "tail")


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_permutations_without_positional_encoding_fix_every_head(dtype):
    """Self-attention without positions commutes with any token permutation: every head is fixed, maps identity.
    With a positional encoding the same permutation is not a symmetry (the control)."""
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(16, generator=g)
    gens = {"shuffle": (TokenAction(perm, None), TokenAction(perm, None))}
    model, _ = planted_attention("z2", positional=False, dtype=dtype, seed=1)
    res = layerwise.extract(model, gens)
    assert res.equivariant
    act = res.latent[0]["shuffle"]
    assert act.cycle_type() == [1] * act.num_heads
    assert float((act.mats - torch.eye(act.head_dim, dtype=torch.float64)).abs().max()) <= ORTHO_TOL[dtype]
    with_pe, _ = planted_attention("z2", positional=True, dtype=dtype, seed=1)
    control = layerwise.extract(with_pe, gens)
    assert not control.equivariant and control.failed_layer == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_feature_action_alone_is_rejected_when_the_positional_encoding_needs_the_token_permutation(dtype):
    model, planted = planted_attention("z2", dtype=dtype, seed=6)
    feats_only = {name: (act.features, act.features) for name, (act, _) in planted.generators.items()}
    res = layerwise.extract(model, feats_only)
    assert not res.equivariant


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_embedding_and_positional_encoding_fold_into_the_attention(dtype):
    """Sequential(PE, Linear L, SelfAttention with W_in L^-1): same function, same certificate."""
    model, planted = planted_attention("z2", tail=None, dtype=dtype, seed=7)
    pe, att = model[0], model[1]
    d = att.attn.embed_dim
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(d, d, dtype=dtype)
    att2 = copy.deepcopy(att)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(d) + 0.3 * torch.randn(d, d, generator=g))
        lin.bias.copy_(torch.randn(d, generator=g))
        inv = torch.linalg.inv(lin.weight.double())
        w_in = att.attn.in_proj_weight.double()
        att2.attn.in_proj_weight.copy_(w_in @ inv)
        att2.attn.in_proj_bias.copy_(att.attn.in_proj_bias.double() - w_in @ inv @ lin.bias.double())
    folded = nn.Sequential(copy.deepcopy(pe), lin, att2)
    x = _tokens(model)
    with torch.no_grad():
        assert _rel(folded(x), model(x)) <= 100 * FUNCTION_RTOL[dtype]
    res = layerwise.extract(folded, planted.generators)
    assert res.equivariant, res.first_failure
    assert res.latent[0]["hflip"].cycle_type() == planted.cycle_types()["hflip"]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), group=st.sampled_from(["z2", "z2v", "d4"]), positional=st.booleans(),
       tail=st.sampled_from([None, "tanh", "relu", "gelu"]), dtype=st.sampled_from(DTYPES))
def test_random_planted_attention_models_certify(seed, group, positional, tail, dtype):
    kw = {"channels": 4, "fixed_heads": 0} if group == "d4" else {}
    if tail is None and group == "d4":
        tail = "tanh"  # a regular orbit of 8 heads is not injective into 16 equivariant output features
    model, planted = planted_attention(group, seed=seed, positional=positional, tail=tail, dtype=dtype, **kw)
    res = layerwise.extract(model, planted.generators)
    assert res.equivariant, res.first_failure
    for name, cycle_type in planted.cycle_types().items():
        assert res.latent[0][name].cycle_type() == cycle_type


def test_unsupported_token_models_and_generators_get_clear_errors():
    model, planted = planted_attention("z2", seed=0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    with pytest.raises(LayerwiseError, match="from_module"):
        layerwise.extract(nn.Sequential(mha), planted.generators)
    with pytest.raises(LayerwiseError, match="PositionalEncoding"):
        layerwise.extract(nn.Sequential(PositionalEncoding(16, 8), nn.Linear(8, 8), nn.Tanh(), SelfAttention(8, 2)),
                          planted.generators)
    with pytest.raises(LayerwiseError, match="Flatten"):
        layerwise.extract(nn.Sequential(SelfAttention(8, 2), nn.Flatten()), planted.generators)
    wrong_tokens = {"hflip": (TokenAction(torch.arange(9), None), TokenAction(torch.arange(9), None))}
    with pytest.raises(LayerwiseError, match="number of tokens"):
        layerwise.extract(model, wrong_tokens)
    act = planted.generators["hflip"][0]
    moved_out = {"hflip": (act, TokenAction(None, act.features))}
    with pytest.raises(LayerwiseError, match="token permutation differs"):
        layerwise.extract(model, moved_out)
    with pytest.raises(LayerwiseError, match="attention models are supported by extract"):
        layerwise.symmetrize(model, planted.generators)
    with pytest.raises(LayerwiseError, match="tokens"):
        TokenAction([0, 0, 1], None).apply(torch.randn(2, 3, 4))


def test_patch_generators_match_cutting_a_flipped_image_into_patches():
    img = torch.randn(3, 2, 8, 8)  # (N, C, H, W), 4x4 grid of 2x2 patches

    def tokens(x):  # (N, C, 4, 2, 4, 2) -> (N, 16 tokens, C * 4 corners)
        n, c = x.shape[:2]
        return x.reshape(n, c, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, 16, c * 4)

    for name, flip in (("hflip", lambda x: x.flip(-1)), ("vflip", lambda x: x.flip(-2)),
                       ("rot90", lambda x: torch.rot90(x, 1, dims=(-2, -1)))):
        group = {"hflip": "z2", "vflip": "z2v", "rot90": "d4"}[name]
        act = patch_generators(group, 4, 2)[name][0]
        assert torch.equal(act.apply(tokens(img)), tokens(flip(img)))


def _verify_heads(res, gens, x, rtol):
    """Every attention layer's HeadAction holds on its heads' outputs in the returned model."""
    mods = list(res.model)
    att_modules = [i for i, m in enumerate(mods) if isinstance(m, SelfAttention)]
    att_layers = [i for i, f in enumerate(res.families) if f.startswith("attention")]
    assert len(att_modules) == len(att_layers)
    for mi, li in zip(att_modules, att_layers):
        pre = nn.Sequential(*mods[:mi])
        for name, (act_in, _) in gens.items():
            k = res.latent[li][name]
            with torch.no_grad():
                lhs = mods[mi].heads(pre(act_in.apply(x)))
                rhs = k(mods[mi].heads(pre(x))[:, k.tokens])
            assert _rel(lhs, rhs) <= rtol


@pytest.mark.parametrize("variant", ["attn,attn", "pe,attn,pe,attn", "attn,dense,attn"])
def test_stacked_attention_layers_with_affine_inputs(variant):
    """Attention after attention (or after a dense layer) sees an affine input action (the previous layer's offsets):
    the moved score forms need their query-only terms dropped and the values their shift. Certified with and without
    the canonical move, head actions hold on the heads' outputs, the function is kept."""
    dtype = torch.float64
    m1, p1 = planted_attention("z2", tail=None, dtype=dtype, seed=3)
    if variant == "attn,dense,attn":
        m3, _ = planted_attention("z2", tail="tanh", positional=False, dtype=dtype, seed=5)
        m2, _ = planted_attention("z2", tail=None, positional=False, dtype=dtype, seed=6)
        model = nn.Sequential(*m1, *m3, *m2)
    else:
        m2, _ = planted_attention("z2", tail=None, positional=variant.count("pe") == 2, dtype=dtype, seed=4)
        model = nn.Sequential(*m1, *m2)
    gens = p1.generators
    x = _tokens(model)
    offsets = []
    for canonical in (False, True):
        res = layerwise.extract(model, gens, canonical=canonical)
        assert res.equivariant, res.first_failure
        _verify_heads(res, gens, x, 1e-10)
        with torch.no_grad():
            assert _rel(res.model(x), model(x)) <= 1e-12
        offsets.append(max(float(a["hflip"].offset.abs().max()) for a, f in zip(res.latent, res.families)
                           if f.startswith("attention")))
    assert offsets[0] > 0.1 and offsets[1] < 1e-10  # affine actions before the canonical move, linear after


@pytest.mark.parametrize("positional", [True, False])
def test_canonical_move_of_a_dense_layer_before_attention_compensates_in_the_attention(positional):
    """Linear, ReLU, [PositionalEncoding], SelfAttention, ...: removing the ReLU layer's rescalings must rescale the
    positional encoding and divide the attention's input columns; the function is kept and certified."""
    dtype = torch.float64
    planted, p = planted_attention("z2", positional=positional, dtype=dtype, seed=3)
    m = torch.as_tensor(layerwise.group.action_matrix(p.generators["hflip"][0].features, 8, "m"))
    g = torch.Generator().manual_seed(0)
    a0 = torch.randn(8, 8, generator=g, dtype=dtype)
    a = (a0 + m.T @ a0 @ m) / 2 + 3 * torch.eye(8, dtype=dtype)  # commutes with the feature action
    d = torch.exp(torch.randn(8, generator=g, dtype=dtype))  # a hidden positive rescaling
    lin = nn.Linear(8, 8, dtype=dtype)
    rest = copy.deepcopy(planted)
    with torch.no_grad():
        lin.weight.copy_(d[:, None] * a)
        lin.bias.zero_()
        for mod in rest:
            if isinstance(mod, PositionalEncoding):
                mod.weight.mul_(d)
        next(mod for mod in rest if isinstance(mod, SelfAttention)).attn.in_proj_weight.div_(d)
    model = nn.Sequential(lin, nn.ReLU(), *rest)
    x = _tokens(model)
    res = layerwise.extract(model, p.generators)
    assert res.equivariant, res.first_failure
    assert res.latent[0]["hflip"].is_permutation()  # the rescalings are gone
    with torch.no_grad():
        assert _rel(res.model(x), model(x)) <= 1e-12


@pytest.mark.parametrize("tail", ["tanh", "relu"])
def test_a_model_ending_with_an_activation_keeps_its_function(tail):
    """The last activation's output is the model's output: no hidden symmetry may change it."""
    dtype = torch.float64
    full, planted = planted_attention("z2", tail=tail, dtype=dtype, seed=3)
    model = nn.Sequential(*list(full)[:-1])
    lat = layerwise.extract(full, planted.generators, canonical=False).latent[1]["hflip"]
    a_in = planted.generators["hflip"][0]
    gens = {"hflip": (a_in, TokenAction(a_in.tokens, lat.matrix))}
    x = _tokens(model)
    assert layerwise.equivariance_error(model, gens, x) < 1e-12
    res = layerwise.extract(model, gens)
    assert res.equivariant, res.first_failure
    with torch.no_grad():
        assert _rel(res.model(x), model(x)) <= 1e-12


def test_non_identifiable_token_models_say_why():
    model, planted = planted_attention("z2", tail="tanh", dtype=torch.float64, seed=3)
    dead = copy.deepcopy(model)
    with torch.no_grad():
        dead[2].weight[:2] = 0.0  # two tanh units with no incoming weights: constants
        dead[2].bias[:2] = 0.0
    res = layerwise.extract(dead, planted.generators)
    assert any("constant" in n and "[0, 1]" in n for n in res.notes)
    zero_head = copy.deepcopy(model)
    with torch.no_grad():
        zero_head[1].attn.in_proj_weight[16:18] = 0.0  # head 0's value map
        zero_head[1].attn.in_proj_bias[16:18] = 0.0
    res = layerwise.extract(zero_head, planted.generators)
    assert any("head 0" in n and "rank below" in n for n in res.notes)
    assert "notes" not in res.summary() or any(n in res.summary() for n in res.notes)


def test_mixed_dtypes_and_non_cpu_devices_are_refused_for_token_models():
    model, planted = planted_attention("z2", seed=0)
    mixed = copy.deepcopy(model)
    mixed[1].half()
    with pytest.raises(LayerwiseError, match="dtype"):
        layerwise.extract(mixed, planted.generators)
    with pytest.raises(LayerwiseError, match="device"):
        layerwise.extract(model, planted.generators, device="meta")
    with pytest.raises(LayerwiseError, match="input_shape"):
        layerwise.extract(model, planted.generators, input_shape=(1, 8, 8))
    with pytest.raises(LayerwiseError, match="integer permutation"):
        TokenAction([0.9, 1.5, 2.2], None).apply(torch.randn(2, 3, 4))
