"""Plain-torch reference of the per-token log-prob / entropy math (AEPO_SPEC section 4).

The one reference that tests, benchmarks and the torch backend import:

* :func:`naive_logprobs_and_entropy` is the textbook autograd formulation (log_softmax, gather,
  softmax entropy). Run in float64 it is the ground truth; run in the input dtype it is the
  "plain torch" baseline the tolerance rule and the benchmark compare against.
* :func:`forward_rows` / :func:`backward_rows` are the analytic statistics and gradient the
  Triton kernels implement, on a block of rows; the torch backend runs them chunk by chunk.

Notation: z = logits / T, m = max z, lse = logsumexp(z), p = softmax(z), S = sum_j p_j z_j,
H = lse - S, logp = z_y - lse, and for upstream scalars g_lp = dL/dlogp, g_H = dL/dH:
dL/dz_j = g_lp (1[j=y] - p_j) - g_H p_j (z_j - S), dL/dlogits = dL/dz / T.
"""

from __future__ import annotations

import torch


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for 16/32-bit inputs; fp64 inputs stay fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def naive_logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Autograd reference: log_softmax + gather + softmax entropy, in the dtype of ``logits``.

    Args:
        logits: [..., V] floating point.
        labels: [...] integer, in [0, V) or ``ignore_index``.
    Returns:
        (logp, entropy), each [...] in the dtype of ``logits``; 0 where the label is ignored.
    Memory: several full [..., V] temporaries (log-probs, probs, their product) plus autograd
    buffers; this is the cost the fused kernels remove.
    """
    z = logits / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def _scaled(x: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """[R, V] rows -> a fresh accumulator-dtype copy of x / T with -inf clamped to the lowest
    finite value (so p = 0 and p * z = 0 there instead of NaN)."""
    acc = accumulator_dtype(x.dtype)
    z = x.to(acc, copy=True)
    if inv_temperature != 1.0:
        z.mul_(inv_temperature)
    return z.clamp_(min=torch.finfo(acc).min)


def forward_rows(
    x: torch.Tensor, labels: torch.Tensor, inv_temperature: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward statistics of a block of rows.

    Everything is taken relative to the row max m, so that H = log s - c / s and
    logp = (z_y - m) - log s never subtract two large numbers (the naive H = lse - S loses
    eps * |lse| when the distribution is peaked and the logits are large).

    Args:
        x: [R, V] logits rows (any float dtype).
        labels: [R] int64.
    Returns:
        (logp, entropy, m, log_s), each [R] in the accumulator dtype, with
        s = sum exp(z - m) and c = sum exp(z - m) (z - m); logp and entropy are 0 on ignored
        rows. lse = m + log_s; the backward needs (m, log_s, entropy) only.
        Extra memory: two [R, V] accumulator-dtype buffers.
    """
    w = _scaled(x, inv_temperature)  # [R, V] z
    m = w.amax(dim=-1, keepdim=True)  # [R, 1]
    w.sub_(m)  # z - m
    e = w.exp()  # [R, V], the one exp per element
    s = e.sum(-1)
    c = e.mul_(w).sum(-1)
    log_s = s.log()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    w_y = w.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    logp = torch.where(valid, w_y - log_s, zero)
    entropy = torch.where(valid, log_s - c / s, zero)
    return logp, entropy, m.squeeze(-1), log_s


def backward_rows(
    x: torch.Tensor,
    labels: torch.Tensor,
    m: torch.Tensor,
    log_s: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    inv_temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """dL/dlogits of a block of rows from the saved (m, log_s, H), recomputing p.

    With lp_j = (z_j - m) - log_s: p_j = exp(lp_j) and z_j - S = lp_j + H.

    Args:
        x: [R, V] logits rows; labels: [R] int64; m, log_s, entropy: [R] from
            :func:`forward_rows`.
        grad_logp, grad_entropy: [R] upstream gradients, or None for zero.
    Returns:
        [R, V] gradient in the accumulator dtype, exactly 0 on ignored rows.
        Extra memory: two [R, V] accumulator-dtype buffers (one is returned).
    """
    lp = _scaled(x, inv_temperature)  # [R, V]
    lp.sub_(m.unsqueeze(-1)).sub_(log_s.unsqueeze(-1))  # log p_j
    p = lp.exp()  # [R, V]
    valid = labels != ignore_index
    if grad_entropy is not None:
        grad = lp.add_(entropy.unsqueeze(-1)).mul_(p).mul_(-grad_entropy.unsqueeze(-1))
    else:
        grad = lp.zero_()
    if grad_logp is not None:
        g = grad_logp.to(grad.dtype).unsqueeze(-1)  # [R, 1]
        grad.sub_(p.mul_(g))
        safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
        grad.scatter_add_(-1, safe, g)
    if inv_temperature != 1.0:
        grad.mul_(inv_temperature)
    return grad.masked_fill_(~valid.unsqueeze(-1), 0.0)
