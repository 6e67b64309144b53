"""Plain-torch reference of the per-token log-prob / entropy math (AEPO_SPEC section 4).

The one reference that tests, benchmarks and the torch backend import:

* :func:`naive_logprobs_and_entropy` is the textbook autograd formulation (log_softmax, gather,
  softmax entropy). Run in float64 it is the ground truth; run in the input dtype it is the
  "plain torch" baseline the tolerance rule and the benchmark compare against.
* :func:`naive_linear_logprobs_and_entropy` is the same from hidden states and an lm_head
  weight (the matmul, then the above).
* :func:`forward_rows` / :func:`backward_rows` are the analytic statistics and gradient the
  Triton kernels implement, on a block of rows; the torch backends run them chunk by chunk.
  :func:`piece_rows` / :func:`merge_pieces` / :func:`finish_pieces` split the forward over
  vocabulary pieces (chunks, kernel splits, tensor-parallel shards) and merge them exactly.

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


def naive_linear_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Autograd reference from hidden states: ``naive_logprobs_and_entropy(hidden @ weight.T)``.

    Args:
        hidden: [..., H]; weight: [V, H] (same dtype); labels: [...].
    Returns:
        (logp, entropy), each [...] in the inputs' dtype. Memory: the [..., V] logits and all
        the naive temporaries.
    """
    return naive_logprobs_and_entropy(hidden @ weight.T, labels, temperature, ignore_index)


def _scaled(x: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """[R, V] rows -> a fresh accumulator-dtype copy of x / T with -inf clamped to the lowest
    finite value (so p = 0 and p * z = 0 there instead of NaN)."""
    acc = accumulator_dtype(x.dtype)
    z = x.to(acc, copy=True)
    if inv_temperature != 1.0:
        z.mul_(inv_temperature)
    return z.clamp_(min=torch.finfo(acc).min)


def piece_rows(
    x: torch.Tensor, labels: torch.Tensor, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics of a block of rows over one piece of the vocabulary (all of it, a chunk, or one
    rank's shard), relative to the piece's max so that nothing large is ever subtracted.

    Args:
        x: [R, Vp] logits of the piece (any float dtype; scaled here by 1 / T).
        labels: [R] int64 column of the label within this piece, or -1 when the label lies
            elsewhere (another piece, or an ignored row).
    Returns:
        (m, s, u, z_y), each [R] in the accumulator dtype: m = max z, s = sum e,
        u = sum e (z - m) with e = exp(z - m), and z_y the label's scaled logit (0 where -1).
        Pieces combine exactly with :func:`merge_pieces`. Extra memory: one [R, Vp] buffer.
    """
    z = _scaled(x, inv_temperature)  # [R, Vp]
    owned = labels >= 0
    z_y = z.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    z_y = torch.where(owned, z_y, torch.zeros((), dtype=z.dtype, device=z.device))
    m = z.amax(dim=-1, keepdim=True)  # [R, 1]
    z.sub_(m)  # z - m
    e = z.exp()  # [R, Vp], the one exp per element
    s = e.sum(-1)
    u = e.mul_(z).sum(-1)
    return m.squeeze(-1), s, u, z_y


def merge_pieces(a: tuple, b: tuple) -> tuple[torch.Tensor, ...]:
    """Merge the (m, s, u, z_y) statistics of two disjoint vocabulary pieces (exact).

    M = max(m_a, m_b), w_k = exp(m_k - M) (0 for an empty piece, m_k = -inf),
    s = sum_k w_k s_k, u = sum_k w_k (u_k + (m_k - M) s_k), z_y = z_y_a + z_y_b (one owner).
    """
    m = torch.maximum(a[0], b[0])
    merged_s, merged_u = torch.zeros_like(a[1]), torch.zeros_like(a[2])
    for mk, sk, uk, _ in (a, b):
        live = mk > float("-inf")
        shift = torch.where(live, mk - m, torch.zeros_like(mk))
        w = torch.where(live, shift.exp(), torch.zeros_like(mk))
        merged_s = merged_s + w * sk
        merged_u = merged_u + w * (uk + shift * sk)
    return m, merged_s, merged_u, a[3] + b[3]


def finish_pieces(
    m: torch.Tensor, s: torch.Tensor, u: torch.Tensor, z_y: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, m, log_s) of whole rows from their merged (m, s, u, z_y), each [R]:
    logp = (z_y - m) - log s, H = log s - u / s; 0 where ``valid`` is False."""
    log_s = s.log()
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    logp = torch.where(valid, (z_y - m) - log_s, zero)
    entropy = torch.where(valid, log_s - u / s, zero)
    return logp, entropy, m, log_s


def forward_rows(
    x: torch.Tensor, labels: torch.Tensor, inv_temperature: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward statistics of a block of whole rows: :func:`piece_rows` over the full vocabulary,
    then :func:`finish_pieces`.

    Everything is taken relative to the row max m, so that H = log s - u / s and
    logp = (z_y - m) - log s never subtract two large numbers (the naive H = lse - S loses
    eps * |lse| when the distribution is peaked and the logits are large).

    Args:
        x: [R, V] logits rows (any float dtype).
        labels: [R] int64.
    Returns:
        (logp, entropy, m, log_s), each [R] in the accumulator dtype; logp and entropy are 0 on
        ignored rows. lse = m + log_s; the backward needs (m, log_s, entropy) only.
        Extra memory: one [R, V] accumulator-dtype buffer.
    """
    valid = labels != ignore_index
    local = torch.where(valid, labels, torch.full_like(labels, -1))
    return finish_pieces(*piece_rows(x, local, inv_temperature), valid)


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
        x: [R, V] logits rows (or one vocabulary piece of them); labels: [R] int64, the label's
            column in ``x``, -1 for a row whose label lies in another piece, or
            ``ignore_index``; m, log_s, entropy: [R] of the whole rows (:func:`forward_rows`,
            or merged pieces).
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
        owned = valid & (labels >= 0)  # the label is a column of this piece
        index = torch.where(owned, labels, torch.zeros_like(labels)).unsqueeze(-1)
        grad.scatter_add_(-1, index, g * owned.unsqueeze(-1))
    if inv_temperature != 1.0:
        grad.mul_(inv_temperature)
    return grad.masked_fill_(~valid.unsqueeze(-1), 0.0)
