"""The 6NHV single pass of :func:`~aepo.kernels.fused_linear_policy_loss`: the loss's gradients
formed in the forward, on the fp32 / fp64 / bf16 / fp16 weight of either backend.

It applies when every token's loss gradient depends on that token alone (the aggregation
weights aside). Rows-outer over whole vocabulary rows, per block of R rows:

    z  = X_r W^T                 [R, V] accumulator dtype (tensor-core GEMM, fp32 out, on CUDA)
    logp, H, dz = block(z)       the backend's row block: statistics, the objective's
                                 (dL/dlogp, dL/dH), dz = dL/dlogits in the weight's dtype
    dX_r = dz W                  one GEMM per row block, K = V, written once in x's dtype
    dW  += dz^T X_r              fp32 [V, H] accumulator (addmm epilogue), or written once
                                 when one block holds every row

Three GEMMs, 6 N H V FLOPs against the recompute path's 8 N H V (forward 2, backward 6).

Memory. The block's buffers: R rows of ``impl.loss_block_bytes`` per vocabulary element within
``impl.LOSS_BUFFER_BYTES`` (triton: fp32 z + 16-bit dz, 6 R V bytes in 2 GiB, R ~ 2350 at
V = 152064; torch: z and p, 128 MiB). For a 16-bit weight and more than one block, the fp32 dW
accumulator: 4 V H bytes (3.1 GB at V = 152064, H = 5120), cast to the weight's dtype at the
end (then 2 V H more for that moment). An fp32 / fp64 weight accumulates in dW itself.
Rows cannot be the inner loop: a row's dz needs its whole-vocabulary statistics first, so a
vocabulary-outer pass would recompute the logits (the 8NHV path, whose dW is written once per
slice: :func:`~aepo.kernels.linear_gemm.linear_backward`); the fp32 accumulator is what the
single pass costs (Liger's and QuACK's chunked losses keep the same one).

Numerics: dz is formed in fp32 and rounded once to the weight's dtype, as plain torch's
autograd rounds dL/dlogits; dX is one fp32-accumulated GEMM rounded once; dW is summed in fp32
over the blocks and rounded once.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch

from aepo.kernels import _cost, _gemm, linear_torch
from aepo.kernels._cost import Kernel, itemsize
from aepo.kernels.reference import accumulator_dtype

TokenGrads = Callable[[slice, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def loss_rows(n: int, vocab: int, dtype: torch.dtype, impl: ModuleType = linear_torch) -> int:
    """Rows per block of :func:`linear_loss_single_pass` for ``n`` rows and a weight of
    ``dtype`` on backend module ``impl``: its buffers fit ``impl.LOSS_BUFFER_BYTES``."""
    per_element = impl.loss_block_bytes(accumulator_dtype(dtype), dtype)
    return _gemm.block_rows(n, per_element * vocab, impl.LOSS_BUFFER_BYTES)


class _DwSum:
    """dW = sum over row blocks of dz^T X_r, in the weight's dtype (see the module)."""

    def __init__(self, w: torch.Tensor, blocks: int):
        self.w, self.blocks, self.total = w, blocks, None

    def add(self, dz_t: torch.Tensor, x_r: torch.Tensor) -> None:
        w, acc = self.w, accumulator_dtype(self.w.dtype)
        if self.total is None and self.blocks == 1:  # the only block: written once
            self.total = torch.empty_like(w)
            _gemm.mm_into(self.total, dz_t, x_r)
        elif self.total is None:
            self.total = _gemm.mm_acc(
                dz_t, x_r, out=torch.empty(w.shape, dtype=acc, device=w.device)
            )
        else:
            _gemm.addmm_acc_(self.total, dz_t, x_r)

    def result(self) -> torch.Tensor:
        return self.total.to(self.w.dtype)  # one rounding for a 16-bit weight; else itself


def linear_loss_single_pass(
    x: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    inv_temperature: float,
    token_grads: TokenGrads,
    need_dw: bool = True,
    impl: ModuleType = linear_torch,
    forks=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logp [N], entropy [N] in the accumulator dtype, dX [N, H] in x's dtype, dW [V, H] in
    w's dtype or None) in one pass over the rows.

    Args:
        x: [N, H] kept hidden rows; w: [V, H] the whole vocabulary, same dtype;
            labels: [N] in [0, V).
        token_grads: ``(rows, logp [R], entropy [R]) -> (dL/dlogp [R], dL/dH [R] or None)``
            for the block ``rows`` of x: the objective's per-token gradients, which must not
            depend on other rows.
        need_dw: False skips the dW GEMM (a frozen weight).
        impl: the backend module whose ``loss_block`` does a block's row work
            (:mod:`~aepo.kernels.linear_torch` or :mod:`~aepo.kernels.linear_gemm`).
        forks: rows with more labels than ``labels`` (packed trees), or None: an object whose
            ``bind(rows, z)`` reads the block's logits before the row work and returns its
            ``token_grads``, and whose ``correct(dz)`` then adds the extra labels' terms to dz
            (``aepo.kernels.linear._ForkHooks``).
    """
    (n, h), acc = x.shape, accumulator_dtype(x.dtype)
    logp, entropy = (torch.empty(n, dtype=acc, device=x.device) for _ in range(2))
    dx = torch.empty(n, h, dtype=x.dtype, device=x.device)
    w_mm = _gemm.operand(w)  # w itself on tensor cores; else upcast once
    step = loss_rows(n, w.shape[0], w.dtype, impl)
    dw = _DwSum(w, -(-n // step)) if need_dw else None
    for r0 in range(0, n, step):
        r = slice(r0, r0 + step)
        z = _gemm.mm_acc(x[r], w_mm.T)  # [R, V] logits, unscaled
        grads = token_grads if forks is None else forks.bind(r, z)
        logp[r], entropy[r], dz = impl.loss_block(z, labels[r], inv_temperature, grads, r, w.dtype)
        if forks is not None:
            forks.correct(dz)
        del z  # before the next block's z (dz may be it)
        _gemm.mm_into(dx[r], dz, w_mm)
        if dw is not None:
            dw.add(dz.T, x[r])
        del dz
    return logp, entropy, dx, (dw.result() if dw is not None and n else _empty_dw(w, need_dw))


def _empty_dw(w: torch.Tensor, need_dw: bool) -> torch.Tensor | None:
    return torch.zeros_like(w) if need_dw else None


def cost_model(n: int, h: int, v: int, dtype: torch.dtype) -> dict:
    """FLOP / byte model of the single pass on the triton backend (fp32 z, dz in ``dtype``),
    for :func:`aepo.kernels._cost.roofline_ms`; ``blocks`` row blocks of balanced size."""
    from aepo.kernels import linear_gemm

    e = itemsize(dtype)
    blocks = -(-n // loss_rows(n, v, dtype, linear_gemm))
    gemm, w_reads = 2 * n * h * v, blocks * e * v * h
    dw_acc = e * v * h if blocks == 1 else 4 * v * h * (2 * blocks - 1)  # first block writes
    kernels = [
        Kernel("logits GEMM X_r W^T -> fp32", gemm, e * n * h + w_reads + 4 * n * v, blocks),
        Kernel("forward row kernel", 0, 4 * n * v, blocks),
        Kernel("backward row kernel -> dz", 0, (4 + e) * n * v, blocks),
        Kernel("dX_r = dz W", gemm, e * (n * v + n * h) + w_reads, blocks),
        Kernel("dW += dz^T X_r (fp32)", gemm, e * (n * v + n * h) + dw_acc, blocks),
    ]
    if blocks > 1 and e != 4:
        kernels.append(Kernel("dW fp32 -> weight dtype", 0, (4 + e) * v * h, 1))
    return _cost.model(kernels, blocks=blocks, rows=-(-n // blocks))
