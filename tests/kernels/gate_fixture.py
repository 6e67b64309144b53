"""Kernels for the compile-gate tests: one the interpreter runs but Triton's compiler refuses
(it reads a plain module global), and one that no exercise launches."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from aepo.kernels._launch import gate_exercise, launch

_SCALE = 2.0  # not a tl.constexpr: the interpreter reads it, the compiler refuses it


@triton.jit
def _reads_global_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * _SCALE, mask=mask)


@triton.jit
def _never_launched_kernel(x_ptr):
    tl.store(x_ptr, 0.0)


def scale(x: torch.Tensor) -> torch.Tensor:
    """[n] float32 -> x * 2 through the broken kernel."""
    out = torch.empty_like(x)
    launch(_reads_global_kernel, (1,), x, out, x.numel(), BLOCK=128, num_warps=4)
    return out


@gate_exercise
def _exercise(dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        scale(torch.zeros(100))
