"""The command line on checkpoints: exit codes 0 (certified / within tolerance), 1 (not equivariant), 2 (bad input)."""

import json

import pytest
import torch

from layerwise.cli import main
from layerwise.testing import perturb, planted_mlp

ARCH = "mlp:auto:tanh"


@pytest.fixture
def ckpts(tmp_path):
    model, _ = planted_mlp("tanh", group="d4", widths=(24, 16), seed=0, dtype=torch.float64)
    good = tmp_path / "good.pt"
    bad = tmp_path / "bad.pt"
    torch.save(model.state_dict(), good)
    torch.save(perturb(model, 1e-3).state_dict(), bad)
    return good, bad


def _run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_extract_certifies_and_writes_json(ckpts, tmp_path, capsys):
    good, bad = ckpts
    code, out, _ = _run(["extract", good, "--arch", ARCH, "--symmetry", "d4:4x4", "--json", "--out", tmp_path / "o"],
                        capsys)
    assert code == 0
    payload = json.loads(out)
    assert payload["equivariant"] is True and payload["residual"] <= 1e-8
    assert json.loads((tmp_path / "o" / "extract.json").read_text())["equivariant"] is True
    code, out, _ = _run(["extract", bad, "--arch", ARCH, "--symmetry", "d4:4x4"], capsys)
    assert code == 1 and "NOT layerwise equivariant" in out


def test_check_exit_codes(ckpts, capsys):
    good, bad = ckpts
    assert _run(["check", good, "--arch", ARCH, "--symmetry", "d4:4x4"], capsys)[0] == 0
    code, out, _ = _run(["check", bad, "--arch", ARCH, "--symmetry", "d4:4x4"], capsys)
    assert code == 1 and "NOT equivariant" in out
    assert _run(["check", bad, "--arch", ARCH, "--symmetry", "d4:4x4", "--tol", "0.5"], capsys)[0] == 0


def test_symmetrize_writes_a_new_checkpoint_and_never_overwrites(ckpts, tmp_path, capsys):
    good, bad = ckpts
    original = bad.read_bytes()
    code, out, _ = _run(["symmetrize", bad, "--arch", ARCH, "--symmetry", "d4:4x4"], capsys)
    assert code == 0, out
    written = bad.with_name("bad.symmetrized.pt")
    assert written.exists() and bad.read_bytes() == original
    assert _run(["extract", written, "--arch", ARCH, "--symmetry", "d4:4x4"], capsys)[0] == 0
    code, _, err = _run(["symmetrize", bad, "--arch", ARCH, "--symmetry", "d4:4x4"], capsys)
    assert code == 2 and "exists" in err
    code, _, err = _run(["symmetrize", bad, "--arch", ARCH, "--symmetry", "d4:4x4", "--save", bad], capsys)
    assert code == 2 and "input checkpoint" in err and bad.read_bytes() == original
    code, _, _ = _run(["symmetrize", bad, "--arch", ARCH, "--symmetry", "d4:4x4", "--save", written, "--overwrite"],
                      capsys)
    assert code == 0


@pytest.mark.parametrize("argv,match", [
    (["extract", "{good}", "--arch", "mlp:16-8-3:tanh", "--symmetry", "d4:4x4"], "keys do not match"),
    (["extract", "{good}", "--arch", ARCH, "--symmetry", "hflip:8x8"], "64 pixels"),
    (["extract", "{good}", "--arch", ARCH, "--symmetry", "hflip"], "image tensors"),
    (["extract", "{good}", "--symmetry", "hflip:4x4"], "--arch: required"),
    (["check", "{missing}", "--arch", ARCH, "--symmetry", "hflip:4x4"], "no such file"),
])
def test_bad_input_exits_2_with_a_message(ckpts, tmp_path, capsys, argv, match):
    good, _ = ckpts
    argv = [a.replace("{good}", str(good)).replace("{missing}", str(tmp_path / "nope.pt")) for a in argv]
    code, _, err = _run(argv, capsys)
    assert code == 2 and match in err


def test_full_pickle_needs_trust(ckpts, tmp_path, capsys):
    model, _ = planted_mlp("tanh", group="z2", widths=(8,), seed=0)
    torch.save(model, tmp_path / "full.pt")
    code, _, err = _run(["extract", tmp_path / "full.pt", "--symmetry", "hflip:4x4"], capsys)
    assert code == 2 and "--trust-checkpoint" in err
    code, _, _ = _run(["extract", tmp_path / "full.pt", "--symmetry", "hflip:4x4", "--trust-checkpoint"], capsys)
    assert code == 0


def test_review_fixes_data_tolerance_samples_out(ckpts, tmp_path, capsys, monkeypatch):
    good, bad = ckpts
    torch.save(torch.randn(50, 16, dtype=torch.float64), tmp_path / "x.pt")  # a bare tensor, as the help says
    assert _run(["check", good, "--arch", ARCH, "--symmetry", "d4:4x4", "--data", tmp_path / "x.pt"], capsys)[0] == 0
    code, _, err = _run(["check", good, "--arch", ARCH, "--symmetry", "d4:4x4", "--tol", "-1"], capsys)
    assert code == 2 and "--tol" in err
    code, _, err = _run(["check", good, "--arch", ARCH, "--symmetry", "d4:4x4", "--samples", "-3"], capsys)
    assert code == 2 and "--samples" in err
    (tmp_path / "afile").write_text("x")
    code, _, err = _run(["extract", good, "--arch", ARCH, "--symmetry", "d4:4x4", "--out", tmp_path / "afile"],
                        capsys)
    assert code == 2 and "not a folder" in err
    # module:function from the current folder, as the console script sees it
    (tmp_path / "my_cli_arch.py").write_text(
        "import torch\nfrom layerwise.io import build_arch\n"
        f"def make():\n    return build_arch('{ARCH}', torch.load(r'{good}', weights_only=True)).double()\n")
    monkeypatch.chdir(tmp_path)
    assert _run(["extract", good, "--arch", "my_cli_arch:make", "--symmetry", "d4:4x4"], capsys)[0] == 0


def test_written_checkpoint_has_normal_permissions(ckpts, tmp_path, capsys):
    import os

    _, bad = ckpts
    out = tmp_path / "sym.pt"
    assert _run(["symmetrize", bad, "--arch", ARCH, "--symmetry", "d4:4x4", "--save", out], capsys)[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == (0o666 & ~umask)
