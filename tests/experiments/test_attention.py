"""The attention experiment: patch tokens agree with the patch generators, the head report is exact on planted
heads, and the quick run produces its table entries and figure."""

import torch

from layerwise.experiments.attention import head_report, image_tokens, run_attention
from layerwise.experiments.digits import load_digits_split
from layerwise.testing import patch_generators, planted_attention


def test_image_tokens_turn_an_image_flip_into_the_patch_generator():
    x = torch.randn(5, 64)
    flipped = x.reshape(5, 8, 8).flip(-1).reshape(5, 64)
    act = patch_generators("z2", 4, 1)["hflip"][0]
    assert torch.equal(act.apply(image_tokens(x)), image_tokens(flipped))


def test_head_report_is_exact_on_planted_heads_and_large_for_the_wrong_flip():
    model, _ = planted_attention("z2", channels=1, fixed_heads=2, orbits=1, seed=0, dtype=torch.float64)
    x = torch.randn(40, 16, 4, dtype=torch.float64)
    good = head_report(model, patch_generators("z2", 4, 1), x)
    assert good["cycle_type"] == [1, 1, 2]
    assert max(good["score_residual"]) < 1e-10 and max(good["map_residual"]) < 1e-8
    wrong = head_report(model, patch_generators("z2v", 4, 1), x)
    assert max(wrong["score_residual"]) > 0.1 and max(wrong["map_residual"]) > 0.1


def test_quick_run_writes_the_figure_and_reports_every_head(tmp_path):
    lines = []
    rep = run_attention(tmp_path, load_digits_split(0), quick=True, log=lines.append)
    assert rep["planted"]["certified"] and rep["planted"]["cycle_type"] == [1, 1, 2]
    assert set(rep["heads"]) == {"trained, left-right", "trained, up-down (control)", "untrained, left-right"}
    assert all(len(r["map_residual"]) == 4 for r in rep["heads"].values())
    assert (tmp_path / "attention_heads.png").stat().st_size > 10_000
    assert any("attention autoencoder" in line for line in lines)


def test_head_report_is_exact_for_a_rotation_of_order_four():
    """rot90 permutes tokens and heads in 4-cycles (not involutions): a swapped p or perm would show here."""
    model, planted = planted_attention("d4", channels=2, fixed_heads=0, seed=1, dtype=torch.float64)
    x = torch.randn(30, 16, 8, dtype=torch.float64)
    rep = head_report(model, {"rot90": planted.generators["rot90"]}, x)
    assert rep["cycle_type"] == [4, 4]
    assert max(rep["map_residual"]) < 1e-8
