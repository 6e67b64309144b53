"""GEMMs with accumulator-dtype results from 16-bit operands: the tensor-core path of the
hidden-state backends.

On CUDA (torch >= 2.8, compute capability >= 8.0) ``torch.mm`` / ``torch.addmm`` with
``out_dtype=torch.float32`` run cuBLAS on the bf16 / fp16 operands (tensor cores), accumulate
in fp32 and write fp32: no 16-bit rounding of the logits, and ``addmm`` accumulates into an
fp32 buffer in its epilogue (beta = 1) without a temporary. Elsewhere (CPU, older torch or
GPUs, inside torch.compile, whose Inductor cannot lower ``addmm.dtype_out`` yet) the operands
are upcast, which is exact, and multiplied in the accumulator dtype: the same numbers up to
the order of the sum.
"""

from __future__ import annotations

import functools

import torch

from aepo.kernels.reference import accumulator_dtype

LOW_PRECISION = (torch.bfloat16, torch.float16)


@functools.cache
def _has_out_dtype() -> bool:
    """torch >= 2.8: ``mm(..., out_dtype=)`` and ``addmm(..., out_dtype=, out=)`` exist."""
    return torch.torch_version.TorchVersion(torch.__version__) >= (2, 8)


@functools.cache
def _has_fp32_accumulator_addmm() -> bool:
    """torch >= 2.10: ``addmm(fp32 self, bf16, bf16, out_dtype=fp32)``; before pytorch#167931
    the CUDA kernel required ``self`` in the operands' dtype ("self and mat2 must have the same
    dtype")."""
    return torch.torch_version.TorchVersion(torch.__version__) >= (2, 10)


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)


def tensor_cores(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a @ b`` runs on 16-bit tensor cores with an fp32 result (see the module)."""
    return (
        a.is_cuda
        and a.dtype in LOW_PRECISION
        and b.dtype == a.dtype
        and _has_out_dtype()
        and not torch.compiler.is_compiling()
        and _capable(a.device.index if a.device.index is not None else torch.cuda.current_device())
    )


def operand(w: torch.Tensor) -> torch.Tensor:
    """The weight as the GEMMs take it: itself where they run on tensor cores (CUDA), else
    upcast once to the accumulator dtype (so a loop over row blocks does not upcast it again).
    """
    return w if tensor_cores(w, w) else w.to(accumulator_dtype(w.dtype))


def mm_acc(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` [M, K] x [K, P] -> [M, P] in the accumulator dtype (into ``out`` if given)."""
    if tensor_cores(a, b):
        acc = torch.float32
        if out is None:
            return torch.mm(a, b, out_dtype=acc)
        return torch.mm(a, b, out_dtype=acc, out=out)
    acc = accumulator_dtype(a.dtype)
    return torch.mm(a.to(acc), b.to(acc), out=out)


def addmm_acc_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in place, acc in the accumulator dtype, one fp32 sum per element."""
    if tensor_cores(a, b):
        if _has_fp32_accumulator_addmm():
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        else:  # torch 2.8 / 2.9: one fp32 temporary of the block
            acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
        return
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a @ b`` in out's dtype, accumulated in fp32 and rounded once (16-bit out)."""
    if a.dtype == out.dtype and (a.is_cuda or out.dtype not in LOW_PRECISION):
        torch.mm(a, b.to(a.dtype), out=out)  # as plain torch: cuBLAS sums 16-bit GEMMs in fp32
        return
    out.copy_(torch.mm(a.to(accumulator_dtype(a.dtype)), b.to(accumulator_dtype(a.dtype))))


def block_rows(n: int, row_bytes: int, budget: int, minimum: int = 16) -> int:
    """Rows per block when one row of the block's buffers takes ``row_bytes``: as many as
    ``budget`` allows (at least ``minimum``), balanced so that the last block is not a sliver
    (each block costs a pass over a [V, H] accumulator whatever its rows)."""
    cap = max(minimum, budget // max(1, row_bytes))
    blocks = max(1, -(-n // cap))
    return max(1, -(-n // blocks))
