import torch

#: Stated tolerances by dtype for "unchanged function" checks (relative, Frobenius over a batch).
FUNCTION_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float64]
