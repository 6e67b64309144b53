"""The "triton" backend of the hidden-state path: chunked cuBLAS GEMMs for the logits and both
gradients, the Triton logits kernels (:mod:`aepo.kernels.logprob_entropy`) for the per-element
softmax work in between. The CUDA default.

Every multiply is a bf16 / fp16 tensor-core GEMM with fp32 accumulation and an fp32 result
(:mod:`aepo.kernels._gemm`); the logits exist one bounded block at a time, in fp32, and each
element is read by one row kernel per pass (statistics; dL/dlogits, written in the weight's
dtype, as plain torch's autograd rounds it). Three entry points:

* :func:`linear_forward`: rows-outer. For each block of R rows (4 R V bytes within
  ``WORKSPACE_BYTES``): z = X_r W^T [R, V] fp32, then the forward row kernel, whose
  (m, log s, H) become the piece statistics (m, s, u, z_y) of this weight's vocabulary.
  2 N H V FLOPs; bytes ~ 8 N V (z written and read) + W read once per block.
* :func:`linear_backward` (the recompute path): vocabulary-outer. For each slice of Vs
  columns (z fp32 + dz 16-bit [N, Vs] within ``WORKSPACE_BYTES``, Vs >= MIN_SLICE): z again,
  the backward row kernel writes dz (a row whose label is in another slice gets a -inf pad
  column as its label: the row kernels take labels inside the row), dW[slice] = dz^T X (one
  GEMM, written once in the weight's dtype: no V x H fp32 buffer) and dX += dz W[slice] into
  an fp32 [N, H] accumulator (addmm epilogue, beta = 1). 6 N H V FLOPs; bytes ~ 10 N V
  + 8 N H per slice. Extra memory: the workspace + dX fp32 (4 N H bytes).
* :func:`loss_block`: one row block of the 6NHV single pass
  (:func:`aepo.kernels.linear_single_pass.linear_loss_single_pass`).

Why this and not ``tl.dot`` kernels: those (retired, issue 19) recomputed the logits in the
backward (8 N H V for the policy loss) on 64x128 tiles at 214-239 registers, one block per SM;
every 128x256 tile spilled on sm_90 (1.3-1.5 KiB of stack in the forward, 264-416 B in the dz
kernel: the fp32 accumulator alone is 128 registers per thread at 8 warps, and the online
softmax keeps two more tile-sized values live). cuBLAS runs the same GEMMs at ~770-800 TF/s on
an H200, and the single pass needs 6 N H V FLOPs where they needed 8. Unlike fixed-tile
kernels, cuBLAS picks its algorithm per shape, so a row's logits may differ in the last bits
with the batch it is in (no bitwise batch invariance).
"""

from __future__ import annotations

import torch

from aepo.kernels import _buffers, _cost, _gemm
from aepo.kernels._cost import Kernel, itemsize
from aepo.kernels.linear_torch import _chunk_labels
from aepo.kernels.logprob_entropy import logprobs_entropy_bwd, logprobs_entropy_fwd

WORKSPACE_BYTES = 2 << 30  # one block's [rows, V] (or slice's [N, Vs]) buffers together
MIN_SLICE = 2048  # backward columns per slice, at least (dX's fp32 read-modify-write per slice)
PAD = 16  # -inf columns after each backward slice (16-byte aligned rows in fp32 and 16-bit)
LOSS_BUFFER_BYTES = WORKSPACE_BYTES  # the single pass's block
_IGNORE = -100  # kept rows only reach this module: no label equals it


def _forward_impl(
    x: torch.Tensor, w: torch.Tensor, local: torch.Tensor, inv_temperature: float
) -> torch.Tensor:
    """[4, N] fp32 piece statistics (m, s, u, z_y): see :func:`linear_forward`."""
    n, vocab = x.shape[0], w.shape[0]
    out = _buffers.empty((4, n), torch.float32, x.device)
    w_mm, owned, labels = _gemm.operand(w), local >= 0, local.clamp(min=0)
    step = _gemm.block_rows(n, 4 * vocab, WORKSPACE_BYTES)
    for r0 in range(0, n, step):
        r = slice(r0, r0 + step)
        z = _gemm.mm_acc(x[r], w_mm.T)  # [R, V] fp32 logits
        _, entropy, m, log_s = logprobs_entropy_fwd(z, labels[r], inv_temperature, _IGNORE, False)
        z_y = z.gather(1, labels[r].unsqueeze(1)).squeeze(1) * inv_temperature
        s = log_s.exp()
        out[0, r], out[1, r], out[2, r] = m, s, s * (log_s - entropy)  # u = s (log s - H)
        out[3, r] = torch.where(owned[r], z_y, torch.zeros_like(z_y))
    return out


@torch.library.custom_op("aepo::linear_forward", mutates_args=())
def _linear_forward_op(
    x: torch.Tensor, w: torch.Tensor, local: torch.Tensor, inv_temperature: float
) -> torch.Tensor:
    return _forward_impl(x, w, local, inv_temperature)


@_linear_forward_op.register_fake
def _(x, w, local, inv_temperature):
    return x.new_empty((4, x.shape[0]), dtype=torch.float32)


def linear_forward(
    x: torch.Tensor, w: torch.Tensor, local: torch.Tensor, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Piece statistics (m, s, u, z_y) [N] fp32 of w's vocabulary for every row.

    Args:
        x: [N, H] hidden rows; w: [V, H] (this rank's shard, or all of it), same dtype;
        local: [N] int64 label column in ``w``, -1 when the label is in another shard.
    An opaque custom op: torch.compile calls it as it is (its GEMMs keep their fp32 outputs).
    """
    return tuple(_linear_forward_op(x, w, local, inv_temperature))


def slice_width(n: int, vocab: int, dz_itemsize: int) -> int:
    """Backward columns per slice: z fp32 + dz [N, Vs] within WORKSPACE_BYTES, a multiple of
    MIN_SLICE and at least one, at most the vocabulary."""
    fit = WORKSPACE_BYTES // max(1, n * (4 + dz_itemsize)) // MIN_SLICE * MIN_SLICE
    return min(max(MIN_SLICE, fit), vocab)


def _slice_logits(x, ws, local, v0):
    """z [N, Vs + PAD] fp32: the slice's logits, then PAD columns of -inf (p = 0 there), and
    each row's label column: in the slice, or the first pad column when the label lies in
    another slice (the row kernel's label term lands there, outside the GEMMs' columns)."""
    vs = ws.shape[0]
    z = torch.empty(x.shape[0], vs + PAD, dtype=torch.float32, device=x.device)
    _gemm.mm_acc(x, ws.T, out=z[:, :vs])  # cuBLAS writes with the padded row stride
    z[:, vs:] = float("-inf")
    labels = _chunk_labels(local, v0, vs)
    return z, torch.where(labels >= 0, labels, torch.full_like(labels, vs))


def _backward_impl(x, w, local, m, log_s, entropy, grad_logp, grad_entropy, inv_temperature):
    (n, h), vocab = x.shape, w.shape[0]
    dx = torch.zeros(n, h, dtype=torch.float32, device=x.device)
    dw = _buffers.empty(w.shape, w.dtype, w.device)
    if n == 0:
        return dx, dw.zero_()
    w_mm = _gemm.operand(w)
    width = slice_width(n, vocab, w.element_size())
    for v0 in range(0, vocab, width):
        ws = w_mm[v0 : v0 + width]  # [Vs, H]
        z, labels = _slice_logits(x, ws, local, v0)  # [N, Vs + PAD]
        dz = _buffers.empty(z.shape, w.dtype, x.device)
        grads = (grad_logp, grad_entropy, dz, inv_temperature, _IGNORE)
        logprobs_entropy_bwd(z, labels, m, log_s, entropy, *grads)
        del z
        dz = dz[:, : ws.shape[0]]  # [N, Vs], row stride Vs + PAD
        _gemm.mm_into(dw[v0 : v0 + width], dz.T, x)
        _gemm.addmm_acc_(dx, dz, ws)
    return dx, dw


@torch.library.custom_op("aepo::linear_backward", mutates_args=())
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
    """(dX [N, H] fp32, dW [V, H] in w's dtype) from the whole rows' saved (m, log_s, entropy)
    [N] and the upstream gradients [N] fp32 (None for zero); see the module docstring."""
    args = (grad_logp, grad_entropy, inv_temperature)
    return _backward_impl(x, w, local, m, log_s, entropy, *args)


@linear_backward.register_fake
def _(x, w, local, m, log_s, entropy, grad_logp, grad_entropy, inv_temperature):
    return x.new_empty(x.shape, dtype=torch.float32), w.new_empty(w.shape)


def loss_block(z, labels, inv_temperature, token_grads, rows, dz_dtype):
    """One block of the single pass: (logp [R], H [R], dL/dlogits [R, V] in ``dz_dtype``) from
    the block's unscaled fp32 logits z [R, V] (read twice, not written) and the objective's
    ``token_grads`` (see :func:`~aepo.kernels.linear_single_pass.linear_loss_single_pass`)."""
    logp, entropy, m, log_s = logprobs_entropy_fwd(z, labels, inv_temperature, _IGNORE, False)
    g_lp, g_h = token_grads(rows, logp, entropy)
    dz = _buffers.empty(z.shape, dz_dtype, z.device)
    logprobs_entropy_bwd(z, labels, m, log_s, entropy, g_lp, g_h, dz, inv_temperature, _IGNORE)
    return logp, entropy, dz


def loss_block_bytes(acc: torch.dtype, dz_dtype: torch.dtype) -> int:
    """Bytes per element of a :func:`loss_block` block: z (fp32) and dz."""
    return itemsize(acc) + itemsize(dz_dtype)


def cost_forward(n: int, h: int, v: int, dtype: torch.dtype) -> dict:
    """FLOP / byte model of :func:`linear_forward` (:func:`aepo.kernels._cost.roofline_ms`)."""
    e, blocks = itemsize(dtype), -(-n // _gemm.block_rows(n, 4 * v, WORKSPACE_BYTES))
    kernels = [
        Kernel(
            "logits GEMM X_r W^T -> fp32",
            2 * n * h * v,
            e * (n + blocks * v) * h + 4 * n * v,
            blocks,
        ),
        Kernel("forward row kernel", 0, 4 * n * v, blocks),
    ]
    return _cost.model(kernels, blocks=blocks)


def cost_backward(n: int, h: int, v: int, dtype: torch.dtype) -> dict:
    """FLOP / byte model of :func:`linear_backward` (the recompute path's backward)."""
    e, width = itemsize(dtype), slice_width(n, v, itemsize(dtype))
    s = -(-v // width)
    gemm = 2 * n * h * v
    kernels = [
        Kernel("logits GEMM X W_s^T -> fp32", gemm, e * (s * n * h + v * h) + 4 * n * v, s),
        Kernel("backward row kernel -> dz", 0, (4 + e) * n * v, s),
        Kernel("dW_s = dz^T X", gemm, e * (n * v + s * n * h + v * h), s),
        Kernel("dX += dz W_s (fp32)", gemm, e * (n * v + v * h) + 4 * n * h * (2 * s + 1), s),
    ]
    return _cost.model(kernels, slices=s, slice_width=width)
