"""Chunked plain-torch backend of the hidden-state path: the CPU default and the tests' oracle.

Vocabulary-outer, rows-inner: for each vocabulary chunk W_c (upcast once to the accumulator
dtype) and each row chunk X_r, z = X_r W_c^T / T. The forward folds the chunk's
:func:`~aepo.kernels.reference.piece_rows` statistics into per-row state with
:func:`~aepo.kernels.reference.merge_pieces`; the backward recomputes z, forms dL/dlogits with
:func:`~aepo.kernels.reference.backward_rows`, adds dz W_c into an accumulator-dtype dX and
accumulates dz^T X_r into dW_c, written once into dW (in the weight's dtype: no V x H fp32
buffer). Peak extra memory: a few [ROW_CHUNK, VOCAB_CHUNK] and one [VOCAB_CHUNK, H] buffer in
the accumulator dtype, plus dX [N, H].
"""

from __future__ import annotations

import torch

from aepo.kernels.reference import accumulator_dtype, backward_rows, merge_pieces, piece_rows

VOCAB_CHUNK = 4096
ROW_CHUNK = 512


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
