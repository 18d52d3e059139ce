"""Allocation of wide matrices.

A fresh CPU tensor of tens of megabytes is mapped page by page as it is first written: at width 4096 (64 MB) the
page faults cost 3x more than filling it (22 ms against 8 ms on the development machine). Advising the kernel to
back the untouched range with transparent huge pages (``madvise(MADV_HUGEPAGE)``, what NumPy does for its own large
arrays) removes most of that cost. The tensor stays an ordinary PyTorch allocation (resizable, 64-byte aligned);
where the advice is unavailable (not Linux, no libc) it is simply not given.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch

#: NumPy's threshold for huge-page advice.
_LARGE = 4 << 20
_MADV_HUGEPAGE = 14
_PAGE = 4096


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``; a large CPU tensor gets the huge-page advice before it is
    first written (see above)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    advise = _madvise() if out.device.type == "cpu" and nbytes >= _LARGE else None
    if advise is not None:
        start = -(-out.data_ptr() // _PAGE) * _PAGE  # the whole pages inside the allocation
        end = (out.data_ptr() + nbytes) // _PAGE * _PAGE
        if end > start:
            advise(start, end - start, _MADV_HUGEPAGE)  # advice only: a failure changes nothing but speed
    return out
