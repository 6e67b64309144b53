"""Triton backend of the hidden-state path: logits tiles from ``tl.dot``, never stored whole.

Forward (2 kernels): a 1-D grid of cdiv(N, BLOCK_N) x S programs (row tile fastest, so programs
that share a weight split run together); each computes [BLOCK_N x BLOCK_V] tiles of
z = x W^T / T over H in fp32 for the columns of its vocabulary split (SPLIT_V columns, fixed,
so a row's result does not depend on the batch it is in) and keeps per-row online statistics
(m, s, u, z_y); a small second kernel merges the S splits per row, in split order, with the
exact piece merge of :mod:`aepo.kernels.linear`. Partials: 4 S N fp32.

Backward: dz split along the vocabulary with a bounded workspace. For each slice of Vs columns a
kernel recomputes the logit tiles and writes dz = dL/dlogits [N, Vs] in the input dtype
(formed in fp32 from the saved (m, log s, H) and the upstream g_lp, g_H, rounded once); then
dW[slice] = dz^T X (one GEMM, fp32 accumulation, written once: no V x H fp32 buffer, no atomics)
and dX += dz W[slice] into an fp32 [N, H] accumulator. Chosen over (a) two recompute passes
(dX over V, dW over N), which recompute the 2NHV-FLOP logits twice instead of once and need the
dX/dW reductions inside Triton, and (b) fused fp32 atomics, which are nondeterministic and need
zero-initialised fp32 dW. Cost: 6NHV FLOPs (recompute + 2 GEMMs), deterministic. Memory bound:
the workspace (``WORKSPACE_BYTES``, at least one BLOCK_V column slice) + dX fp32 (4 N H bytes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from aepo.kernels import _buffers
from aepo.kernels._launch import INTERPRET, launch, register_op

_NEG_BIG: tl.constexpr = tl.constexpr(-3.0e38)  # below every finite fp32 logit

# GPU launch configuration (tiles, warps, pipeline stages) for both kernels that multiply.
GPU_CONFIG = {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3}
SPLIT_V = 4096  # vocabulary columns per forward program (a multiple of BLOCK_V)
MERGE_BLOCK = 256  # rows per program of the merge kernel
WORKSPACE_BYTES = 512 << 20  # the backward's dz slice [N, Vs]


@triton.jit
def _logit_tile(
    x_ptr,
    w_ptr,
    rows,
    cols,
    row_ok,
    col_ok,
    H,
    inv_t,
    BLOCK_H: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """z = x[rows] W[cols]^T / T as a [BLOCK_N, BLOCK_V] fp32 tile (x, W row-major [*, H])."""
    acc = tl.zeros((rows.shape[0], cols.shape[0]), tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        xt = tl.load(x_ptr + rows[:, None] * H + ks[None, :], row_ok[:, None] & k_ok[None, :], 0.0)
        wt = tl.load(w_ptr + cols[:, None] * H + ks[None, :], col_ok[:, None] & k_ok[None, :], 0.0)
        if DOT_FP32:  # fp32 inputs, or 16-bit under the interpreter (its bf16 dot is wrong)
            xt, wt = xt.to(tl.float32), wt.to(tl.float32)
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(wt), acc)
    return acc * inv_t


# Sizes that only bound masks are not specialised (fewer binaries, same code); H and the dz row
# stride Vs stay specialised: their 16-divisibility gives vectorised loads and stores.
@triton.jit(do_not_specialize=["N", "V", "S", "split_v"])
def _linear_fwd_kernel(
    x_ptr,  # [N, H] row-major
    w_ptr,  # [V, H] row-major
    local_ptr,  # [N] int64: label column in W, or -1
    part_ptr,  # [4, S, N] fp32 out: m, s, u, z_y per split
    N,
    V,
    H,
    S,
    split_v,
    inv_t,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_n, pid_s = pid % num_n, pid // num_n
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    label = tl.load(local_ptr + rows, row_ok, -1)
    start = pid_s * split_v
    end = tl.minimum(start + split_v, V)
    m = tl.full((BLOCK_N,), _NEG_BIG, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    u = tl.zeros((BLOCK_N,), tl.float32)
    z_y = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(start, end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < end
        z = _logit_tile(x_ptr, w_ptr, rows, cols, row_ok, col_ok, H, inv_t, BLOCK_H, DOT_FP32)
        m_new = tl.maximum(m, tl.max(tl.where(col_ok[None, :], z, float("-inf")), 1))
        alpha = tl.exp(m - m_new)
        shift = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)
        e = tl.where(col_ok[None, :], tl.exp(shift), 0.0)  # [BLOCK_N, BLOCK_V]
        u = alpha * (u + (m - m_new) * s) + tl.sum(e * shift, 1)
        s = alpha * s + tl.sum(e, 1)
        hit = (cols[None, :] == label[:, None]) & col_ok[None, :]
        z_y += tl.sum(tl.where(hit, z, 0.0), 1)
        m = m_new
    base = part_ptr + pid_s * N + rows
    tl.store(base, m, row_ok)
    tl.store(base + S * N, s, row_ok)
    tl.store(base + 2 * S * N, u, row_ok)
    tl.store(base + 3 * S * N, z_y, row_ok)


@triton.jit(do_not_specialize=["N", "S"])
def _linear_merge_kernel(
    part_ptr,  # [4, S, N] fp32 partials
    out_ptr,  # [4, N] fp32 out: merged m, s, u, z_y
    N,
    S,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = rows < N
    m = tl.full((BLOCK,), _NEG_BIG, tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    u = tl.zeros((BLOCK,), tl.float32)
    z_y = tl.zeros((BLOCK,), tl.float32)
    for k in range(0, S):
        base = part_ptr + k * N + rows
        mk = tl.load(base, ok, _NEG_BIG)
        sk = tl.load(base + S * N, ok, 0.0)
        uk = tl.load(base + 2 * S * N, ok, 0.0)
        m_new = tl.maximum(m, mk)
        a, b = tl.exp(m - m_new), tl.exp(mk - m_new)
        u = a * (u + (m - m_new) * s) + b * (uk + (mk - m_new) * sk)
        s = a * s + b * sk
        z_y += tl.load(base + 3 * S * N, ok, 0.0)
        m = m_new
    tl.store(out_ptr + rows, m, ok)
    tl.store(out_ptr + N + rows, s, ok)
    tl.store(out_ptr + 2 * N + rows, u, ok)
    tl.store(out_ptr + 3 * N + rows, z_y, ok)


@triton.jit(do_not_specialize=["N", "v_start", "v_end"])
def _linear_dz_kernel(
    x_ptr,  # [N, H]
    w_ptr,  # [V, H]
    local_ptr,  # [N] int64
    m_ptr,  # [N] fp32 row max of z (whole vocabulary)
    log_s_ptr,  # [N] fp32 log sum exp(z - m)
    ent_ptr,  # [N] fp32 entropy
    glp_ptr,  # [N] fp32 dL/dlogp (read only if HAS_LOGP_GRAD)
    gh_ptr,  # [N] fp32 dL/dH (read only if HAS_ENTROPY_GRAD)
    dz_ptr,  # [N, Vs] out (row stride Vs): dL/dlogits of columns [v_start, v_end)
    N,
    H,
    v_start,
    v_end,
    Vs,
    inv_t,
    HAS_LOGP_GRAD: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_n, pid_v = pid % num_n, pid // num_n
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = v_start + pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    row_ok, col_ok = rows < N, cols < v_end
    z = _logit_tile(x_ptr, w_ptr, rows, cols, row_ok, col_ok, H, inv_t, BLOCK_H, DOT_FP32)
    lse = tl.load(m_ptr + rows, row_ok, 0.0) + tl.load(log_s_ptr + rows, row_ok, 0.0)
    lp = tl.where(col_ok[None, :], z - lse[:, None], float("-inf"))  # log p_j
    p = tl.exp(lp)  # [BLOCK_N, BLOCK_V], 0 outside the slice
    dz = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if HAS_LOGP_GRAD:
        g_lp = tl.load(glp_ptr + rows, row_ok, 0.0)[:, None]
        hit = cols[None, :] == tl.load(local_ptr + rows, row_ok, -1)[:, None]
        dz += tl.where(hit, g_lp, 0.0) - g_lp * p
    if HAS_ENTROPY_GRAD:
        g_h = tl.load(gh_ptr + rows, row_ok, 0.0)[:, None]
        h = tl.load(ent_ptr + rows, row_ok, 0.0)[:, None]
        dz -= g_h * p * tl.where(p > 0, lp + h, 0.0)  # z_j - S = log p_j + H
    out = dz_ptr + rows[:, None] * Vs + (cols - v_start)[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(out, (dz * inv_t).to(dz_ptr.dtype.element_ty), ok)


def _dot_fp32(x: torch.Tensor) -> bool:
    return INTERPRET or x.dtype == torch.float32


def _forward_fake(x, w, local, inv_temperature):
    return x.new_empty((4, x.shape[0]), dtype=torch.float32)


@register_op("aepo::linear_forward", mutates_args=(), fake=_forward_fake)
def _linear_forward_op(
    x: torch.Tensor, w: torch.Tensor, local: torch.Tensor, inv_temperature: float
) -> torch.Tensor:
    """[4, N] fp32 piece statistics (m, s, u, z_y): see :func:`linear_forward`."""
    x, w, local = x.contiguous(), w.contiguous(), local.contiguous()
    (n, h), vocab = x.shape, w.shape[0]
    out = _buffers.empty((4, n), torch.float32, x.device)
    if n == 0:
        return out
    splits = triton.cdiv(vocab, SPLIT_V)
    parts = _buffers.empty((4, splits, n), torch.float32, x.device)
    grid = (triton.cdiv(n, GPU_CONFIG["BLOCK_N"]) * splits,)
    args = (x, w, local, parts, n, vocab, h, splits, SPLIT_V, inv_temperature)
    launch(_linear_fwd_kernel, grid, *args, DOT_FP32=_dot_fp32(x), **GPU_CONFIG)
    launch(
        _linear_merge_kernel,
        (triton.cdiv(n, MERGE_BLOCK),),
        parts,
        out,
        n,
        splits,
        BLOCK=MERGE_BLOCK,
        num_warps=4,
    )
    return out


def linear_forward(
    x: torch.Tensor, w: torch.Tensor, local: torch.Tensor, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Piece statistics (m, s, u, z_y) [N] fp32 of w's vocabulary (see linear_torch)."""
    return tuple(_linear_forward_op(x, w, local, inv_temperature))


def slice_width(n: int, vocab: int, element_size: int) -> int:
    """Columns per backward slice: the workspace bound, a multiple of BLOCK_V, at least one."""
    block = GPU_CONFIG["BLOCK_V"]
    fit = WORKSPACE_BYTES // max(1, n * element_size) // block * block
    return max(block, min(fit, triton.cdiv(vocab, block) * block))


def _add_mm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with fp32 accumulation and no low-precision rounding of the sum."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    try:
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    except (TypeError, RuntimeError):  # torch without mm(out_dtype=), or no such kernel here
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _backward_fake(x, w, local, m, log_s, entropy, grad_logp, grad_entropy, inv_temperature):
    return x.new_empty(x.shape, dtype=torch.float32), w.new_empty(w.shape)


@register_op("aepo::linear_backward", mutates_args=(), fake=_backward_fake)
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
    """(dX [N, H] fp32, dW [V, H] in w's dtype); see the module docstring for the scheme."""
    x, w, local = x.contiguous(), w.contiguous(), local.contiguous()
    (n, h), vocab = x.shape, w.shape[0]
    dx = torch.zeros(n, h, dtype=torch.float32, device=x.device)
    dw = _buffers.empty(w.shape, w.dtype, w.device)
    if n == 0:
        return dx, dw.zero_()
    width = slice_width(n, vocab, x.element_size())
    dz = _buffers.empty((n, width), x.dtype, x.device)
    flags = {"HAS_LOGP_GRAD": grad_logp is not None, "HAS_ENTROPY_GRAD": grad_entropy is not None}
    glp = m if grad_logp is None else grad_logp
    gh = m if grad_entropy is None else grad_entropy
    for v0 in range(0, vocab, width):
        v1 = min(v0 + width, vocab)
        tiles = triton.cdiv(v1 - v0, GPU_CONFIG["BLOCK_V"])
        grid = (triton.cdiv(n, GPU_CONFIG["BLOCK_N"]) * tiles,)
        args = (x, w, local, m, log_s, entropy, glp, gh, dz, n, h, v0, v1, width, inv_temperature)
        launch(_linear_dz_kernel, grid, *args, DOT_FP32=_dot_fp32(x), **flags, **GPU_CONFIG)
        dzs = dz[:, : v1 - v0]
        torch.mm(dzs.T, x, out=dw[v0:v1])
        _add_mm_fp32(dx, dzs, w[v0:v1])
    return dx, dw
