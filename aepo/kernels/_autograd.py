"""Autograd plumbing shared by the Triton op and the chunked-torch backend.

Both backends save the same five tensors in the forward and run the same backward: allocate the
logits gradient (or reuse the logits' storage when ``inplace_grad``) and hand it to a
backend-specific writer with the signature of ``logprobs_entropy_bwd``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from aepo.kernels import _buffers

BackwardWriter = Callable[..., None]


def save_for_backward(
    ctx,
    logits: torch.Tensor,
    labels: torch.Tensor,
    m: torch.Tensor,
    log_s: torch.Tensor,
    entropy: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    inplace_grad: bool,
) -> None:
    """Save logits [..., V], labels [...] and the per-row stats (m, log_s, entropy) [...]."""
    ctx.save_for_backward(logits, labels, m, log_s, entropy)
    ctx.inv_temperature, ctx.ignore_index = inv_temperature, ignore_index
    ctx.inplace_grad = inplace_grad
    ctx.set_materialize_grads(False)


def logits_grad(
    ctx,
    write: BackwardWriter,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
) -> torch.Tensor | None:
    """dL/dlogits [..., V] from the saved context; None when no output received a gradient."""
    if grad_logp is None and grad_entropy is None:
        return None
    logits, labels, m, log_s, entropy = ctx.saved_tensors
    grad = logits.detach() if ctx.inplace_grad else _buffers.empty_like(logits)
    write(
        logits,
        labels,
        m,
        log_s,
        entropy,
        grad_logp,
        grad_entropy,
        grad,
        ctx.inv_temperature,
        ctx.ignore_index,
    )
    return grad
