import torch

#: Stated tolerances by dtype for "unchanged function" checks (relative, Frobenius over a batch).
FUNCTION_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float64]


def function_rtol(dtype, activation: str = "", depth: int = 1) -> float:
    """Relative tolerance for an unchanged function: rounding is amplified m-fold per layer by t**m activations."""
    degree = int(activation[5:]) if activation.startswith("power") else 1
    return FUNCTION_RTOL[dtype] * degree**depth


import os  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI runs derandomized (reproducible); locally hypothesis explores new examples on every run.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global random state (tests that want variety use hypothesis)."""
    torch.manual_seed(0)
