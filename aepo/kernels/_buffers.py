"""Output allocation for the kernels, with a debug switch that NaN-poisons fresh buffers.

Tests set ``POISON = True`` so that an element a kernel forgets to write shows up as NaN
instead of passing silently with whatever the allocator left there.
"""

from __future__ import annotations

import torch

POISON = False


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a NaN-filled tensor while ``POISON`` is set."""
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """torch.empty_like (same strides for dense inputs), NaN-filled while ``POISON`` is set."""
    out = torch.empty_like(x)
    return out.fill_(float("nan")) if POISON else out
