import subprocess
import sys

from layerwise.cli import main


def test_demo_runs_and_certifies(capsys):
    assert main(["demo", "--widths", "32,16", "--image", "4"]) == 0
    out = capsys.readouterr().out
    assert "CERTIFIED layerwise equivariant" in out
    assert "recovered characters equal the planted ones: True" in out


def test_demo_default_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "layerwise", "demo", "--activation", "relu"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "CERTIFIED" in proc.stdout


def test_bad_usage_exits_2(capsys):
    try:
        main(["demo", "--widths", "0,a"])
    except SystemExit as exc:
        assert exc.code == 2
    else:  # pragma: no cover
        raise AssertionError("argparse should have exited")
