"""Fuzz the public API and the CLI with random and malformed input: only LayerwiseError (or exit 2) may come out."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import layerwise
from layerwise import LayerwiseError
from layerwise.cli import main
from layerwise.testing import hflip_permutation, planted_mlp

SIZES = st.sampled_from([0, 1, 3, 4, 16])
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")


def _action():
    ints = st.lists(st.integers(-3, 20), min_size=0, max_size=17)
    return st.one_of(
        st.none(),
        st.integers(-5, 5),
        st.floats(allow_nan=True),
        st.text(max_size=5),
        ints,
        ints.map(lambda v: torch.tensor(v, dtype=torch.long)),
        st.just(hflip_permutation(4)),
        st.just(hflip_permutation(4).float()),
        st.just(torch.eye(16)),
        st.just(torch.zeros(16, 16)),
        st.just(2 * torch.eye(16)),
        st.just(torch.full((16, 16), float("nan"))),
        st.just(np.eye(16, dtype=np.complex64)),
        st.just(np.eye(16, dtype=bool)),
        st.just(torch.eye(16, dtype=torch.float16)),
        st.just(np.ones((16, 16, 2))),
        st.just([[1, 0], [0, 1]]),
        st.just([["a"]]),
        st.just({"x": 1}),
        SIZES.map(lambda n: torch.randperm(n)),
    )


GENERATORS = st.one_of(
    st.dictionaries(st.one_of(st.text(max_size=3), st.integers()), st.tuples(_action(), _action()), max_size=3),
    st.dictionaries(st.text(max_size=3), st.one_of(_action(), st.lists(_action(), max_size=3)), max_size=2),
    st.just({}),
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.just({"hflip": (hflip_permutation(4), None)}),
)


def _module(draw_sizes):
    return st.one_of(
        st.tuples(SIZES, SIZES).map(lambda s: nn.Linear(max(s[0], 1) if s[0] else 16, s[1])),
        st.sampled_from([nn.ReLU(), nn.Tanh(), nn.GELU(), nn.Sigmoid(), layerwise.nn.Power(2), nn.Hardswish(),
                         nn.Flatten(), nn.Dropout(0.1), nn.Identity(), nn.LayerNorm(4), nn.Conv1d(1, 1, 1)]),
    )


MODELS = st.one_of(
    st.lists(_module(SIZES), max_size=5).map(lambda mods: nn.Sequential(*mods)),
    st.just(nn.Linear(16, 3)),
    st.just("not a model"),
    st.sampled_from(["nan", "inf", "half", "double", "ok"]).map(lambda kind: _planted(kind)),
)


def _planted(kind: str):
    model, _ = planted_mlp("tanh", group="z2", widths=(8,), seed=0)
    if kind == "nan":
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
    elif kind == "inf":
        with torch.no_grad():
            model[2].bias[0] = float("inf")
    elif kind == "half":
        model = model.half()
    elif kind == "double":
        model = model.double()
    return model


INPUTS = st.one_of(
    st.just(torch.randn(8, 16)),
    st.just(torch.randn(8, 4, 4)),
    st.just(torch.randn(3, 16)),
    st.just(torch.randn(8, 15)),
    st.just(torch.zeros(0, 16)),
    st.just(torch.ones(8, 16, dtype=torch.long)),
    st.just(torch.full((8, 16), float("nan"))),
    st.just(torch.randn(16)),
    st.just([[0.0] * 16]),
    st.none(),
)


def _call(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except LayerwiseError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(model=MODELS, generators=GENERATORS, inputs=INPUTS)
def test_public_api_raises_only_layerwise_error(model, generators, inputs):
    state = {k: v.clone() for k, v in model.state_dict().items()} if isinstance(model, nn.Module) else None
    _call(layerwise.extract, model, generators)
    _call(layerwise.equivariance_error, model, generators, inputs)
    _call(layerwise.symmetrize, model, generators, inputs)
    _call(layerwise.symmetrize, model, generators)
    _call(layerwise.align, model, generators, inputs)
    _call(layerwise.layerwise_metrics, model, generators, inputs)
    _call(layerwise.naive_average, model, generators)
    if state is not None:  # never a modified input model
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]) or (torch.isnan(v) & torch.isnan(state[k])).any()


TOKENS = ["check", "extract", "symmetrize", "demo", "planted", "--arch", "mlp:16-8-3:tanh", "mlp:auto:tanh",
          "mlp:16-x-3:tanh", "mlp:16-8-3:nope", "mlp:16-8-3", "os:getcwd", "nosuchmodule:f", "--symmetry",
          "hflip:4x4", "d4:4x4", "hflip", "rot90:3x5", "vflip:8x8", "nope.json", "--json", "--tol", "-1", "nan",
          "--output-action", "equivariant", "--save", "--overwrite", "--data", "--samples", "0", "--seed", "x",
          "--trust-checkpoint", "--widths", "0", "--image", "{ckpt}", "{junk}", "{missing}", "{gens}", "{badjson}"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    model, _ = planted_mlp("tanh", group="z2", widths=(8,), seed=0)
    torch.save(model.state_dict(), d / "ckpt.pt")
    (d / "junk.pt").write_bytes(b"\x00garbage")
    (d / "gens.json").write_text('{"f": {"input": [3,2,1,0,7,6,5,4,11,10,9,8,15,14,13,12], "output": null}}')
    (d / "bad.json").write_text('{"f": {"input": "x"}')
    return {"{ckpt}": str(d / "ckpt.pt"), "{junk}": str(d / "junk.pt"), "{missing}": str(d / "missing.pt"),
            "{gens}": str(d / "gens.json"), "{badjson}": str(d / "bad.json")}


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(argv=st.lists(st.sampled_from(TOKENS), max_size=8))
def test_cli_exits_cleanly(files, argv, tmp_path_factory, capsys):
    argv = [files.get(a, a) for a in argv]
    if argv and argv[0] == "demo" or "--overwrite" in argv:
        return  # the demo trains for a while; overwriting the shared checkpoint would change later examples
    if "--save" in argv:  # keep written files away from the fixtures
        argv[argv.index("--save") + 1 : argv.index("--save") + 1] = [str(tmp_path_factory.mktemp("out") / "o.pt")]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    capsys.readouterr()
    assert code in (0, 1, 2)


def _token_action():
    perms = st.one_of(st.none(), st.just(torch.arange(16).flip(0)), st.just(torch.arange(9)),
                      st.just([0.5] * 16), st.just(torch.zeros(4, 4, dtype=torch.long)), st.just("tokens"),
                      SIZES.map(lambda n: torch.randperm(n)))
    feats = st.one_of(st.none(), st.just(torch.arange(8).flip(0)), st.just(torch.eye(8)), st.just(torch.zeros(8, 8)),
                      st.just(torch.arange(5)), st.just(torch.full((8, 8), float("nan"))), st.just("hflip"))
    return st.one_of(st.builds(layerwise.TokenAction, perms, feats), feats)


def _token_model():
    from layerwise.nn import PositionalEncoding, SelfAttention

    pieces = st.sampled_from([
        lambda: PositionalEncoding(16, 8), lambda: PositionalEncoding(9, 8), lambda: SelfAttention(8, 2),
        lambda: SelfAttention(8, 4, bias=False), lambda: nn.Linear(8, 8), lambda: nn.Linear(8, 5), lambda: nn.Tanh(),
        lambda: nn.ReLU(), lambda: nn.Flatten(), lambda: nn.LayerNorm(8), lambda: SelfAttention(8, 2).half(),
        lambda: nn.MultiheadAttention(8, 2, batch_first=True),
    ])
    return st.lists(pieces, min_size=1, max_size=5).map(lambda fs: nn.Sequential(*(f() for f in fs)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=_token_model(), act_in=_token_action(), act_out=_token_action(),
       data=st.sampled_from([torch.randn(3, 16, 8), torch.randn(3, 9, 8), torch.randn(3, 8), torch.randn(0, 16, 8)]),
       canonical=st.booleans())
def test_token_models_raise_only_layerwise_error(model, act_in, act_out, data, canonical):
    """Attention models with malformed pieces, generators and data: only LayerwiseError, the model untouched."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gens = {"g": (act_in, act_out)}
    calls = [lambda: layerwise.extract(model, gens, canonical=canonical),
             lambda: layerwise.equivariance_error(model, gens, data),
             lambda: layerwise.head_metrics(model, gens, data),
             lambda: layerwise.symmetrize(model, gens)]
    for call in calls:
        try:
            call()
        except LayerwiseError:
            pass
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
