"""Chunked plain-torch backend of the hidden-state path: the CPU default and the tests' oracle.

Vocabulary-outer, rows-inner: for each vocabulary chunk W_c (upcast once to the accumulator
dtype) and each row chunk X_r, z = X_r W_c^T / T. The forward folds the chunk's
:func:`~aepo.kernels.reference.piece_rows` statistics into per-row state with
:func:`~aepo.kernels.reference.merge_pieces`; the backward recomputes z, forms dL/dlogits with
:func:`~aepo.kernels.reference.backward_rows`, adds dz W_c into an accumulator-dtype dX and
accumulates dz^T X_r into dW_c, written once into dW (in the weight's dtype: no V x H fp32
buffer). Peak extra memory: a few [ROW_CHUNK, VOCAB_CHUNK] and one [VOCAB_CHUNK, H] buffer in
the accumulator dtype, plus dX [N, H].

:func:`loss_block` is this backend's row block of the 6NHV single pass
(:mod:`aepo.kernels.linear_single_pass`): in place on z, one exp per element, with two
[rows, V] accumulator-dtype buffers (rows sized by LOSS_BUFFER_BYTES).
"""

from __future__ import annotations

import torch

from aepo.kernels.reference import accumulator_dtype, backward_rows, merge_pieces, piece_rows

VOCAB_CHUNK = 4096
ROW_CHUNK = 512
LOSS_BUFFER_BYTES = 128 << 20  # the single pass's [rows, V] buffers together


def _chunk_labels(local: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """Column of each row's label within [start, start + width), -1 when outside."""
    shifted = local - start
    inside = (local >= 0) & (shifted < width) & (shifted >= 0)
    return torch.where(inside, shifted, torch.full_like(shifted, -1))


def linear_forward(
    x: torch.Tensor, w: torch.Tensor, local: torch.Tensor, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Piece statistics (m, s, u, z_y) [N] of this weight's vocabulary for every row.

    Args:
        x: [N, H] hidden states; w: [V, H] weight (one shard of the vocabulary, or all of it);
        local: [N] int64 label column in ``w``, or -1 when the label is in another shard.
    """
    n, acc = x.shape[0], accumulator_dtype(x.dtype)
    m = torch.full((n,), float("-inf"), dtype=acc, device=x.device)
    s, u, z_y = (torch.zeros(n, dtype=acc, device=x.device) for _ in range(3))
    for v0 in range(0, w.shape[0], VOCAB_CHUNK):
        wc = w[v0 : v0 + VOCAB_CHUNK].to(acc)  # [Vc, H]
        labels = _chunk_labels(local, v0, wc.shape[0])
        for r0 in range(0, n, ROW_CHUNK):
            r = slice(r0, r0 + ROW_CHUNK)
            piece = piece_rows(x[r].to(acc) @ wc.T, labels[r], inv_temperature)
            m[r], s[r], u[r], z_y[r] = merge_pieces((m[r], s[r], u[r], z_y[r]), piece)
    return m, s, u, z_y


def linear_backward(
    x: torch.Tensor,
    w: torch.Tensor,
    local: torch.Tensor,
    m: torch.Tensor,
    log_s: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    inv_temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX [N, H] in the accumulator dtype, dW [V, H] in w's dtype) from the whole rows' saved
    (m, log_s, entropy) [N] and the upstream gradients [N] (None for zero)."""
    n, acc = x.shape[0], accumulator_dtype(x.dtype)
    dx = torch.zeros(n, x.shape[1], dtype=acc, device=x.device)
    dw = torch.empty_like(w)
    pick = lambda t, r: None if t is None else t[r]
    for v0 in range(0, w.shape[0], VOCAB_CHUNK):
        wc = w[v0 : v0 + VOCAB_CHUNK].to(acc)  # [Vc, H]
        labels = _chunk_labels(local, v0, wc.shape[0])
        dwc = torch.zeros_like(wc)
        for r0 in range(0, n, ROW_CHUNK):
            r = slice(r0, r0 + ROW_CHUNK)
            xr = x[r].to(acc)
            dz = backward_rows(
                xr @ wc.T,
                labels[r],
                m[r],
                log_s[r],
                entropy[r],
                pick(grad_logp, r),
                pick(grad_entropy, r),
                inv_temperature,
                ignore_index=-100,
            )  # [Rc, Vc] dL/dlogits
            dx[r].addmm_(dz, wc)
            dwc.addmm_(dz.T, xr)
        dw[v0 : v0 + VOCAB_CHUNK] = dwc
    return dx, dw


def _softmax_rows(z: torch.Tensor, local: torch.Tensor):
    """In place on the [R, V] scaled logits z: z becomes log p. Returns (logp [R], H [R], p).

    The same statistics as :func:`~aepo.kernels.reference.forward_rows` (everything relative
    to the row max, H = log s - u / s), one exp per element and no copy of z.
    """
    z.sub_(z.amax(dim=-1, keepdim=True))  # z - m
    p = z.exp()  # e, made p below
    s = p.sum(-1, keepdim=True)
    u = torch.bmm(p.unsqueeze(1), z.unsqueeze(-1)).view(-1, 1)  # sum e (z - m), no temporary
    log_s = s.log()
    entropy = (log_s - u / s).squeeze(-1)
    z.sub_(log_s)  # log p
    p.div_(s)
    logp = z.gather(-1, local.unsqueeze(-1)).squeeze(-1)
    return logp, entropy, p


def _grad_rows_(log_p, p, local, entropy, g_lp, g_h):
    """In place on log p [R, V]: dL/dz = g_lp (1[j=y] - p_j) - g_H p_j (log p_j + H) (see
    :func:`~aepo.kernels.reference.backward_rows`); g_lp, g_h [R] (g_h may be None)."""
    g_lp = g_lp.unsqueeze(-1)
    if g_h is None:
        grad = log_p.copy_(p).mul_(-g_lp)
    else:
        g_h = g_h.unsqueeze(-1)
        grad = log_p.mul_(-g_h).sub_(g_h * entropy.unsqueeze(-1) + g_lp).mul_(p)
    return grad.scatter_add_(-1, local.unsqueeze(-1), g_lp)


def loss_block(z, labels, inv_temperature, token_grads, rows, dz_dtype):
    """One block of the single pass (:mod:`aepo.kernels.linear_single_pass`), in place on the
    block's unscaled logits z [R, V] (accumulator dtype): (logp [R], H [R], dL/dlogits [R, V]
    in ``dz_dtype``; z itself when that is z's dtype). Extra memory: p [R, V] while z becomes
    log p and then dz, and the ``dz_dtype`` copy for a 16-bit weight."""
    if inv_temperature != 1.0:
        z.mul_(inv_temperature)
    logp, entropy, p = _softmax_rows(z, labels)
    g_lp, g_h = token_grads(rows, logp, entropy)
    scale = lambda g: None if g is None else g.to(z.dtype) * inv_temperature  # dz/dlogits = 1/T
    dz = _grad_rows_(z, p, labels, entropy, scale(g_lp), scale(g_h))
    del p
    return logp, entropy, dz.to(dz_dtype)


def loss_block_bytes(acc: torch.dtype, dz_dtype: torch.dtype) -> int:
    """Bytes per element of a :func:`loss_block` block: z and p, plus a 16-bit dz."""
    size = lambda t: torch.empty((), dtype=t).element_size()
    return 2 * size(acc) + (0 if dz_dtype == acc else size(dz_dtype))
