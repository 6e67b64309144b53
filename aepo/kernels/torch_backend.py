"""Chunked plain-torch backend of :func:`aepo.kernels.logprobs_and_entropy` (the CPU default).

Runs the reference row math (:mod:`aepo.kernels.reference`) over blocks of rows so that the
extra memory stays at a few [chunk, V] fp32 buffers plus the gradient: never an fp32 copy of
the whole [N, V] logits. Saves only (m, log s) per row, plus the entropy it returns, for
the backward.
"""

from __future__ import annotations

import torch

from aepo.kernels import _autograd, _buffers
from aepo.kernels.reference import accumulator_dtype, backward_rows, forward_rows

# Rows per chunk are chosen so one fp32 [chunk, V] buffer is about this size: big enough to
# amortise per-op overhead, small enough to stay near the cache.
CHUNK_BYTES = 4 << 20


def chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk for a vocabulary of ``vocab`` in accumulator dtype of ``dtype``."""
    elt = torch.empty((), dtype=accumulator_dtype(dtype)).element_size()
    return max(1, CHUNK_BYTES // (vocab * elt))


def chunked_forward(
    logits2d: torch.Tensor, labels1d: torch.Tensor, inv_temperature: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, V] logits, [N] labels -> (logp, entropy, m, log_s), each [N] (no autograd)."""
    n, vocab = logits2d.shape
    acc = accumulator_dtype(logits2d.dtype)
    outs = [_buffers.empty((n,), acc, logits2d.device) for _ in range(4)]
    step = chunk_rows(vocab, logits2d.dtype)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        stats = forward_rows(logits2d[rows], labels1d[rows], inv_temperature, ignore_index)
        for out, value in zip(outs, stats, strict=True):
            out[rows] = value
    return tuple(outs)


def chunked_backward(
    logits2d: torch.Tensor,
    labels1d: torch.Tensor,
    m: torch.Tensor,
    log_s: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    grad_out: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
) -> None:
    """Write dL/dlogits [N, V] into ``grad_out`` (may be ``logits2d``), chunk by chunk."""
    step = chunk_rows(logits2d.shape[1], logits2d.dtype)
    for start in range(0, logits2d.shape[0], step):
        rows = slice(start, start + step)
        grad_out[rows] = backward_rows(
            logits2d[rows],
            labels1d[rows],
            m[rows],
            log_s[rows],
            entropy[rows],
            None if grad_logp is None else grad_logp[rows],
            None if grad_entropy is None else grad_entropy[rows],
            inv_temperature,
            ignore_index,
        )


class _ChunkedLogpEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, labels1d, inv_temperature, ignore_index, inplace_grad):
        logp, entropy, m, log_s = chunked_forward(logits2d, labels1d, inv_temperature, ignore_index)
        _autograd.save_for_backward(
            ctx, logits2d, labels1d, m, log_s, entropy, inv_temperature, ignore_index, inplace_grad
        )
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        grad = _autograd.logits_grad(ctx, chunked_backward, grad_logp, grad_entropy)
        return grad, None, None, None, None


def torch_logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    inplace_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated inputs ([..., V] logits, [...] int64 labels) -> (logp, entropy), each [...].

    A leading layout that cannot be viewed as [N, V] is copied once (the Triton backend reads
    [B, T, V] strided views directly).
    """
    vocab = logits.shape[-1]
    logp, entropy = _ChunkedLogpEntropy.apply(
        logits.reshape(-1, vocab), labels.reshape(-1), inv_temperature, ignore_index, inplace_grad
    )
    return logp.view(labels.shape), entropy.view(labels.shape)
