"""Fused per-token log-prob and entropy over vocabulary logits, as Triton kernels.

Forward reads each [V] row once (online max / sum-exp / sum p*z, fp32) and writes 4 floats per
row; backward reads the row once and writes its gradient once (in place if asked). Saved per
row: the max m and log s (lse = m + log s), plus the entropy it returns (S = lse - H).

Math and notation: :mod:`aepo.kernels.reference` (the plain-torch twin of these kernels).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from aepo.kernels import _autograd, _buffers
from aepo.kernels._launch import launch, register_op

# Sentinel below every finite fp32 logit: starting the running max here keeps exp(m - m_new)
# finite when a whole block is -inf (masked vocabulary), where -inf would give NaN.
_NEG_BIG: tl.constexpr = tl.constexpr(-3.0e38)


@triton.jit
def _row_base(ptr, row, T, stride_b, stride_t):
    """Address of row ``row`` of a [B, T, V] strided view (int64 arithmetic)."""
    return ptr + (row // T) * stride_b + (row % T) * stride_t


@triton.jit
def _logp_entropy_fwd_kernel(
    logits_ptr,  # [B, T, V] strided view, last dim contiguous
    labels_ptr,  # [N] int64, N = B * T
    logp_ptr,  # [N] fp32 out
    entropy_ptr,  # [N] fp32 out
    m_ptr,  # [N] fp32 out: row max of z, saved for backward
    log_s_ptr,  # [N] fp32 out: log sum exp(z - m), saved for backward
    T,
    stride_b,
    stride_t,
    V,
    inv_t,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        tl.store(m_ptr + row, 0.0)
        tl.store(log_s_ptr + row, 0.0)
        return
    base = _row_base(logits_ptr, row, T, stride_b, stride_t)
    cols = tl.arange(0, BLOCK_V)
    # Online over blocks, relative to the running max m: s = sum e, c = sum e (z - m) with
    # e = exp(z - m); rescaled by alpha = exp(m - m_new) when the max grows.
    m = tl.full((), _NEG_BIG, tl.float32)
    s = tl.zeros((), tl.float32)
    c = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        z = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, 0))
        alpha = tl.exp(m - m_new)
        w = z - m_new
        e = tl.exp(w)  # [BLOCK_V], 0 outside the row and at -inf logits
        c = alpha * (c + (m - m_new) * s) + tl.sum(e * tl.where(e > 0, w, 0.0), 0)
        s = alpha * s + tl.sum(e, 0)
        m = m_new
    log_s = tl.log(s)
    z_y = tl.load(base + label).to(tl.float32) * inv_t
    tl.store(logp_ptr + row, (z_y - m) - log_s)
    tl.store(entropy_ptr + row, log_s - c / s)
    tl.store(m_ptr + row, m)
    tl.store(log_s_ptr + row, log_s)


@triton.jit
def _logp_entropy_bwd_kernel(
    logits_ptr,  # [B, T, V] strided view
    grad_ptr,  # [B, T, V] strided view, may alias logits_ptr (in-place gradient)
    labels_ptr,  # [N] int64
    m_ptr,  # [N] fp32
    log_s_ptr,  # [N] fp32
    entropy_ptr,  # [N] fp32
    glp_ptr,  # [N] fp32 dL/dlogp (read only if HAS_LOGP_GRAD)
    gh_ptr,  # [N] fp32 dL/dH (read only if HAS_ENTROPY_GRAD)
    T,
    stride_b,
    stride_t,
    gT,
    gstride_b,
    gstride_t,
    V,
    inv_t,
    ignore_index,
    HAS_LOGP_GRAD: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    base = _row_base(logits_ptr, row, T, stride_b, stride_t)
    gbase = _row_base(grad_ptr, row, gT, gstride_b, gstride_t)
    cols = tl.arange(0, BLOCK_V)
    out_ty = grad_ptr.dtype.element_ty
    if label == ignore_index:
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            tl.store(gbase + idx, tl.zeros([BLOCK_V], tl.float32).to(out_ty), mask=idx < V)
        return
    m = tl.load(m_ptr + row)
    log_s = tl.load(log_s_ptr + row)
    h = tl.load(entropy_ptr + row)
    g_lp = tl.load(glp_ptr + row).to(tl.float32) if HAS_LOGP_GRAD else 0.0
    g_h = tl.load(gh_ptr + row).to(tl.float32) if HAS_ENTROPY_GRAD else 0.0
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        mask = idx < V
        z = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32) * inv_t
        lp = (z - m) - log_s  # log p_j, no cancellation against a large lse
        p = tl.exp(lp)
        dz = tl.zeros([BLOCK_V], tl.float32)
        if HAS_LOGP_GRAD:
            dz += tl.where(idx == label, g_lp, 0.0) - g_lp * p
        if HAS_ENTROPY_GRAD:
            dz -= g_h * p * tl.where(p > 0, lp + h, 0.0)  # z_j - S = log p_j + H
        tl.store(gbase + idx, (dz * inv_t).to(out_ty), mask=mask)


# GPU launch configuration per logits element size: (BLOCK_V, num_warps), 16 KiB of input per
# loop iteration whatever the vocabulary (a small vocabulary only masks lanes), so the compile
# gate sees every configuration the launchers can produce.
GPU_CONFIGS = {4: (4096, 8), 2: (8192, 8)}

# The interpreter pays ~1 ms per block iteration, so it gets big blocks (tests lower this to
# exercise the multi-block online accumulation).
INTERPRET_MAX_BLOCK = 16384


def launch_config(element_size: int) -> dict:
    """GPU launch keywords (BLOCK_V, num_warps) for logits of this element size."""
    block, warps = GPU_CONFIGS[element_size]
    return {"BLOCK_V": block, "num_warps": warps}


def _interpret_block(vocab: int) -> dict:
    return {"BLOCK_V": min(triton.next_power_of_2(vocab), INTERPRET_MAX_BLOCK)}


def _fold(sizes, strides) -> int | None:
    """The stride of dims that fold into one row-major dim (size-1 dims ignored), or None."""
    dims = [(n, st) for n, st in zip(sizes, strides, strict=True) if n != 1]
    if any(outer != inner * n for (_, outer), (n, inner) in itertools.pairwise(dims)):
        return None
    return dims[-1][1] if dims else (strides[-1] if strides else 0)


def rows_in_place(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int] | None:
    """Address the [..., V] rows of ``x`` as [B, T, V] rows, or None when only a copy can (last
    dim not contiguous, or leading dims that do not fold into two strides).

    Returns (x, T, stride_b, stride_t); the row r lives at (r // T) * stride_b +
    (r % T) * stride_t from x's first element. Handles [N, V], [B, T, V] and slices such as
    logits[:, :-1]. Decided from shapes and strides alone (no view attempt, no pointer), so it
    traces on FakeTensors under torch.compile.
    """
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.stride(-1) != 1:
        return None
    sizes, strides = x.shape[:-1], x.stride()[:-1]
    stride = _fold(sizes, strides)
    if stride is not None:
        return x, max(x.numel() // x.shape[-1], 1), 0, stride
    stride_b = _fold(sizes[:-1], strides[:-1])
    if stride_b is None:
        return None
    return x, sizes[-1], stride_b, strides[-1]


def rows_view(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """:func:`rows_in_place`, on a contiguous copy of ``x`` when its layout needs one."""
    return rows_in_place(x) or rows_in_place(x.contiguous())


def _fwd_fake(logits, labels, inv_temperature, ignore_index, inplace_grad):
    return tuple(logits.new_empty(labels.shape, dtype=torch.float32) for _ in range(4))


@register_op("aepo::logprobs_entropy_fwd", mutates_args=(), fake=_fwd_fake)
def logprobs_entropy_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    inplace_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., V] logits, [...] int64 labels -> (logp, entropy, m, log_s), each [...] fp32.

    (m, log_s) are the row max of logits / T and log sum exp(logits / T - m): what the
    backward needs besides the entropy, kept apart so that it forms log p without cancellation.

    ``inplace_grad`` only tells the registered backward to write dL/dlogits into ``logits``.
    """
    outs = tuple(_buffers.empty(labels.shape, torch.float32, logits.device) for _ in range(4))
    n = labels.numel()
    if n:
        x, t, stride_b, stride_t = rows_view(logits)
        launch(
            _logp_entropy_fwd_kernel,
            (n,),
            x,
            labels.contiguous(),
            *outs,
            t,
            stride_b,
            stride_t,
            logits.shape[-1],
            inv_temperature,
            ignore_index,
            interpret=_interpret_block(logits.shape[-1]),
            **launch_config(logits.element_size()),
        )
    return outs


def _bwd_fake(*args) -> None:
    return None


@register_op("aepo::logprobs_entropy_bwd", mutates_args=("grad_logits",), fake=_bwd_fake)
def logprobs_entropy_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    m: torch.Tensor,
    log_s: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    grad_logits: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
) -> None:
    """Write dL/dlogits into ``grad_logits`` ([..., V], may be ``logits`` itself).

    ``grad_logp`` / ``grad_entropy`` are [...] upstream gradients, None for zero (the kernel
    then skips that term at compile time). One read and one write of each row.
    """
    n = labels.numel()
    if n == 0:
        return
    x, t, stride_b, stride_t = rows_view(logits)
    g_rows = rows_in_place(grad_logits)  # the kernel writes into grad_logits, never a copy
    if g_rows is None:
        raise ValueError(
            f"grad_logits {tuple(grad_logits.shape)} with strides {grad_logits.stride()} must "
            "have rows addressable in place (last dim contiguous, leading dims foldable)"
        )
    g, gt, gstride_b, gstride_t = g_rows
    glp = None if grad_logp is None else grad_logp.float().reshape(-1).contiguous()
    gh = None if grad_entropy is None else grad_entropy.float().reshape(-1).contiguous()
    launch(
        _logp_entropy_bwd_kernel,
        (n,),
        x,
        g,
        labels.contiguous(),
        m,
        log_s,
        entropy,
        m if glp is None else glp,
        m if gh is None else gh,
        t,
        stride_b,
        stride_t,
        gt,
        gstride_b,
        gstride_t,
        logits.shape[-1],
        inv_temperature,
        ignore_index,
        HAS_LOGP_GRAD=glp is not None,
        HAS_ENTROPY_GRAD=gh is not None,
        interpret=_interpret_block(logits.shape[-1]),
        **launch_config(logits.element_size()),
    )


def _setup_context(ctx, inputs, output) -> None:
    logits, labels, inv_temperature, ignore_index, inplace_grad = inputs
    _, entropy, m, log_s = output
    ctx.mark_non_differentiable(m, log_s)
    _autograd.save_for_backward(
        ctx, logits, labels, m, log_s, entropy, inv_temperature, ignore_index, inplace_grad
    )


def _backward(ctx, grad_logp, grad_entropy, _grad_m, _grad_log_s):
    grad = _autograd.logits_grad(ctx, logprobs_entropy_bwd, grad_logp, grad_entropy)
    return grad, None, None, None, None


torch.library.register_autograd(
    "aepo::logprobs_entropy_fwd", _backward, setup_context=_setup_context
)
