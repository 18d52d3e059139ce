import json
import subprocess
import sys

from layerwise.cli import main


def test_planted_runs_and_certifies(capsys):
    assert main(["planted", "--widths", "32,16", "--image", "4"]) == 0
    out = capsys.readouterr().out
    assert "CERTIFIED layerwise equivariant" in out
    assert "recovered characters equal the planted ones: True" in out


def test_demo_quick_end_to_end(tmp_path):
    # the README's main job, in its smoke form, through the console entry point
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "layerwise", "demo", "--quick", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Merge with the mirrored copy" in proc.stdout and "CERTIFIED" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    for key in ("accuracy",):
        assert 0.0 <= report["original"][key] <= 1.0
        assert 0.0 <= report["symmetrized"][key] <= 1.0
        assert 0.0 <= report["naive_average"][key] <= 1.0
    assert report["symmetrized"]["certified"] is True
    assert report["symmetrized"]["equivariance_error"] < 1e-5
    assert report["layer_metrics"] and {"task", "layer", "linear", "constrained_activations"} <= set(
        report["layer_metrics"][0])
    assert report["cnn"]["augment"]["symmetrized"]["certified"] is True
    for name in ("first_layer_tanh", "first_layer_gelu", "metrics", "metrics_constrained", "emergence",
                 "cnn_first_layer"):
        png = out / f"{name}.png"
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_bad_usage_exits_2():
    try:
        main(["planted", "--widths", "0,a"])
    except SystemExit as exc:
        assert exc.code == 2
    else:  # pragma: no cover
        raise AssertionError("argparse should have exited")


def test_train_writes_a_checkpoint_the_other_commands_read(tmp_path, capsys):
    assert main(["train", "--epochs", "3", "--widths", "16,16,8", "--log-metrics", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "hidden-symmetry fit error" in out and (tmp_path / "emergence.png").exists()
    code = main(["check", str(tmp_path / "model.pt"), "--arch", "mlp:auto:tanh,gelu,gelu", "--symmetry", "hflip:8x8"])
    assert code in (0, 1)  # a 3-epoch network is what it is; the point is that the checkpoint loads
