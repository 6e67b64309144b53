"""FLOP and byte models of the hidden-state paths, and the time a roofline predicts for them.

Each path lists its kernels (GEMMs, row kernels, casts) with the FLOPs they do and the bytes
they must move at least (operands read once, outputs written once, an accumulator read and
written); :func:`roofline_ms` charges every kernel the larger of its compute and its memory
time at the given ceilings and sums them (no overlap between kernels, launch latency
ignored). A measured time well above the prediction says which kernel to look at first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# Measured ceilings on an H200 (dense bf16 cuBLAS GEMM, HBM3e copy bandwidth).
H200_TFLOPS = 770.0
H200_TBPS = 4.3


@dataclass(frozen=True)
class Kernel:
    """One kernel of a path: ``flops`` and ``bytes`` summed over its ``count`` launches (of
    about equal size, so that the roofline of the sum is the sum of the rooflines)."""

    name: str
    flops: float
    bytes: float
    count: int = 1


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def model(kernels: list[Kernel], **extra) -> dict:
    """{"flops", "bytes", "kernels": [...], **extra}: totals over the launches."""
    kernels = [k for k in kernels if k.count > 0]
    return {
        "flops": sum(k.flops for k in kernels),
        "bytes": sum(k.bytes for k in kernels),
        "kernels": [asdict(k) for k in kernels],
        **extra,
    }


def roofline_ms(cost: dict, tflops: float = H200_TFLOPS, tbps: float = H200_TBPS) -> float:
    """Predicted milliseconds: sum over kernels of max(flops / peak, bytes / bandwidth)."""
    per = (max(k["flops"] / (tflops * 1e12), k["bytes"] / (tbps * 1e12)) for k in cost["kernels"])
    return 1e3 * sum(per)
