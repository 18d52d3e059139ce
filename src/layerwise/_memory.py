"""Allocation of wide matrices.

A fresh CPU tensor of tens of megabytes is mapped page by page as it is first written: at width 4096 (64 MB) the
page faults cost 3x more than filling it (25 ms against 7 ms on the development machine). NumPy asks the kernel for
transparent huge pages for its large arrays (``madvise(MADV_HUGEPAGE)``, as it has since version 1.16), which
removes most of that cost, and ``torch.from_numpy`` shares the memory without a copy. So the wide arrays that the
algorithms fill anyway are allocated through NumPy; everything else is plain ``torch.empty``.
"""

from __future__ import annotations

import numpy as np
import torch

#: NumPy's own threshold for huge-page advice.
_LARGE = 4 << 20
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``; large CPU float tensors come from NumPy (see above)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or dtype not in _NUMPY or int(np.prod(shape, dtype=np.int64)) * itemsize < _LARGE:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(shape, dtype=_NUMPY[dtype]))
