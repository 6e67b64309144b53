"""Fused per-token log-prob and entropy over vocabulary logits, as Triton kernels.

Forward reads each [V] row once (online max / sum-exp / sum p*z, fp32, in base 2) and writes 4
floats per row; backward reads the row once and writes its gradient once (in place if asked).
Saved per row: the max m and log s (lse = m + log s), plus the entropy it returns (S = lse - H).
Per element both cost about 8.6 SASS instructions (sm_90, bf16) and one exp2, so they are
bound by the bytes they move: :func:`cost_model` has the FLOP, byte, exp2 and instruction
counts and the time each allows on an H200.

Math and notation: :mod:`aepo.kernels.reference` (the plain-torch twin of these kernels).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from aepo.kernels import _autograd, _buffers
from aepo.kernels._launch import launch, register_op

# Sentinel below every finite fp32 logit: starting the running max here keeps exp2(m - m_new)
# finite when a lane has seen only -inf (masked vocabulary), where -inf would give NaN.
_NEG_BIG: tl.constexpr = tl.constexpr(-3.0e38)
# Floor of the base-2 exponents w = z - m (and log2 p): exp2 of it is 0, and 0 * w stays 0
# where w = -inf (a -inf logit) would give NaN. One max instead of a compare and a select.
_W_FLOOR: tl.constexpr = tl.constexpr(-1.0e30)
_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _row_base(ptr, row, T, stride_b, stride_t):
    """Address of row ``row`` of a [B, T, V] strided view (int64 arithmetic)."""
    return ptr + (row // T) * stride_b + (row % T) * stride_t


@triton.jit
def _block_offsets(BLOCK_V: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr):
    """[BLOCK_V / (LANES VEC), LANES VEC] offsets of one block (see :func:`_lanes`)."""
    K: tl.constexpr = BLOCK_V // (LANES * VEC)
    return tl.arange(0, K)[:, None] * (LANES * VEC) + tl.arange(0, LANES * VEC)[None, :]


@triton.jit
def _lanes(x, LANES: tl.constexpr, VEC: tl.constexpr):
    """A [K, LANES VEC] block as [K, LANES, VEC]: lane t holds VEC contiguous elements (one
    16-byte load) every LANES * VEC. With LANES = the threads of the program, reductions over
    axes 0 and 2 stay inside a thread (no shuffles, no barriers). Loaded 2-D and reshaped, so
    that Triton's coalescing (3.6 and 3.9 alike) lays threads along the lanes."""
    return tl.reshape(x, [x.shape[0], LANES, VEC])


@triton.jit
def _load_block(base, idx, V, other, MASKED: tl.constexpr):
    """Logits ``base[idx]`` as fp32; ``MASKED`` only for the last, partial block."""
    x = tl.load(base + idx, mask=idx < V, other=other) if MASKED else tl.load(base + idx)
    return x.to(tl.float32)


@triton.jit
def _fwd_block(x, mx, m, s, c, scale):
    """Fold one [K, LANES, VEC] block of raw logits x into each lane's running statistics.

    mx = max x; base 2, with z2 = x * scale (scale = log2(e) / T): m = max z2 (mx * scale
    rounded: scale > 0 and rounding is monotone), e = exp2(z2 - m), s = sum e,
    c = sum e (z2 - m), rescaled by alpha = exp2(m - m_new) when the max grows. z2 - m is one
    fma and exp2 one instruction (MUFU.EX2; tl.exp adds a denormal-output fix-up).
    """
    bx = tl.max(tl.max(x, 2), 0)  # [LANES]
    m_new = tl.maximum(m, bx * scale)
    d = m - m_new  # <= 0
    alpha = tl.exp2(d)
    w = tl.maximum(tl.fma(x, scale, -m_new[None, :, None]), _W_FLOOR)
    e = tl.exp2(w)  # 0 outside the row and at -inf logits
    c = alpha * (c + d * s) + tl.sum(tl.sum(e * w, 2), 0)
    s = alpha * s + tl.sum(tl.sum(e, 2), 0)
    return tl.maximum(mx, bx), m_new, s, c


@triton.jit
def _merge_lanes(mx, m, s, c):
    """The row's (max x, m, s, c) from the lanes' (same online merge as across blocks)."""
    m_row = tl.max(m, 0)
    alpha = tl.exp2(m - m_row)  # 0 for lanes that saw only -inf (m = _NEG_BIG, s = c = 0)
    c_row = tl.sum(alpha * (c + (m - m_row) * s), 0)
    return tl.max(mx, 0), m_row, tl.sum(alpha * s, 0), c_row


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
    LANES: tl.constexpr,
    VEC: tl.constexpr,
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
    x_y = tl.load(base + label).to(tl.float32)
    offs = _block_offsets(BLOCK_V, LANES, VEC)
    scale = inv_t * _LOG2E
    mx = tl.full([LANES], float("-inf"), tl.float32)
    m = tl.full([LANES], _NEG_BIG, tl.float32)
    s = tl.zeros([LANES], tl.float32)
    c = tl.zeros([LANES], tl.float32)
    v_full = (V // BLOCK_V) * BLOCK_V
    for start in range(0, v_full, BLOCK_V):  # full blocks: no masks
        x = _load_block(base, start + offs, V, float("-inf"), False)
        mx, m, s, c = _fwd_block(_lanes(x, LANES, VEC), mx, m, s, c, scale)
    if v_full < V:
        x = _load_block(base, v_full + offs, V, float("-inf"), True)
        mx, m, s, c = _fwd_block(_lanes(x, LANES, VEC), mx, m, s, c, scale)
    mx, m, s, c = _merge_lanes(mx, m, s, c)
    # Natural units. The saved max is mx / T rounded (what z = x / T holds); log_s absorbs the
    # rounding residuals of both maxima (base 2: r, natural: rho), so that (x / T - m) - log_s
    # is log p without them. The entropy is shift-invariant: they cancel there.
    m_nat = mx * inv_t
    r = tl.fma(mx, scale, -m)
    rho = tl.fma(mx, inv_t, -m_nat)
    log2_s = tl.log2(s)
    log_s = (log2_s - r) * _LN2 + rho
    tl.store(logp_ptr + row, tl.fma(x_y, inv_t, -m_nat) - log_s)
    tl.store(entropy_ptr + row, (log2_s - c / s) * _LN2)
    tl.store(m_ptr + row, m_nat)
    tl.store(log_s_ptr + row, log_s)


@triton.jit
def _bwd_block(x, inv_t, m, log2_s, a, b, HAS_ENTROPY_GRAD: tl.constexpr):
    """dL/dx without the label term: p (a + b log2 p), log2 p in two fmas ((x / T - m), then
    to base 2 less log2 s: as exact as the natural (z - m) - log s), p one exp2."""
    lp2 = tl.fma(tl.fma(x, inv_t, -m), _LOG2E, -log2_s)  # log2 p_j
    if HAS_ENTROPY_GRAD:
        lp2 = tl.maximum(lp2, _W_FLOOR)  # -inf logits: p = 0 and b * lp2 finite
        return tl.exp2(lp2) * tl.fma(b, lp2, a)
    return tl.exp2(lp2) * a


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
    log2_s = tl.load(log_s_ptr + row) * _LOG2E
    h = tl.load(entropy_ptr + row)
    g_lp = tl.load(glp_ptr + row).to(tl.float32) if HAS_LOGP_GRAD else 0.0
    g_h = tl.load(gh_ptr + row).to(tl.float32) if HAS_ENTROPY_GRAD else 0.0
    # dL/dx_j = (g_lp (1[j=y] - p_j) - g_h p_j (log p_j + H)) / T = p_j (a + b log2 p_j) + the
    # label term g_lp / T at j = y, added after the loop.
    a = -(g_lp + g_h * h) * inv_t
    b = -(g_h * _LN2) * inv_t
    if HAS_LOGP_GRAD:
        # The label's logit, read before any thread overwrites it (grad may alias logits).
        x_y = tl.load(base + label).to(tl.float32)
        tl.debug_barrier()
    v_full = (V // BLOCK_V) * BLOCK_V
    for start in range(0, v_full, BLOCK_V):  # full blocks: no masks
        x = _load_block(base, start + cols, V, float("-inf"), False)
        dx = _bwd_block(x, inv_t, m, log2_s, a, b, HAS_ENTROPY_GRAD)
        tl.store(gbase + start + cols, dx.to(out_ty))
    if v_full < V:
        idx = v_full + cols
        x = _load_block(base, idx, V, float("-inf"), True)  # p = 0 past V: no exp2 overflow
        dx = _bwd_block(x, inv_t, m, log2_s, a, b, HAS_ENTROPY_GRAD)
        tl.store(gbase + idx, dx.to(out_ty), mask=idx < V)
    if HAS_LOGP_GRAD:
        dx_y = _bwd_block(x_y, inv_t, m, log2_s, a, b, HAS_ENTROPY_GRAD) + g_lp * inv_t
        tl.debug_barrier()  # the loop's store of the label's element lands first
        tl.store(gbase + label, dx_y.to(out_ty))


# GPU launch configuration per logits element size: (BLOCK_V, num_warps), 16 KiB of input per
# loop iteration whatever the vocabulary (a small vocabulary only masks lanes), so the compile
# gate sees every configuration the launchers can produce.
GPU_CONFIGS = {4: (4096, 8), 2: (8192, 8)}

# The interpreter pays ~1 ms per block iteration, so it gets big blocks (tests lower this to
# exercise the multi-block online accumulation), and a few lanes (to exercise their merge).
INTERPRET_MAX_BLOCK = 16384
INTERPRET_LANES = 8
INTERPRET_VEC = 2


def _layout(block: int, lanes: int, vec: int) -> dict:
    """Constexprs of one block: BLOCK_V = K * LANES * VEC, with VEC at most ``vec``."""
    lanes = min(lanes, block)
    return {"BLOCK_V": block, "LANES": lanes, "VEC": min(vec, block // lanes)}


def launch_config(element_size: int) -> dict:
    """GPU launch keywords (BLOCK_V, num_warps) for logits of this element size."""
    block, warps = GPU_CONFIGS[element_size]
    return {"BLOCK_V": block, "num_warps": warps}


def fwd_launch_config(element_size: int, aligned: bool) -> dict:
    """:func:`launch_config` plus the forward's block layout: LANES = the program's threads,
    VEC = one 16-byte load when the rows are 16-element aligned (``aligned``: what lets Triton
    vectorise), else 1 (a VEC the loads cannot have makes Triton spread it across threads and
    shuffle every reduction)."""
    config = launch_config(element_size)
    lanes = 32 * config["num_warps"]
    return {**_layout(config["BLOCK_V"], lanes, 16 // element_size if aligned else 1), **config}


def rows_aligned(x: torch.Tensor, stride_b: int, stride_t: int) -> bool:
    """Whether every row of ``x`` starts 16 elements into alignment (the strides and the storage
    offset are multiples of 16, as Triton's specialisation sees them)."""
    return all(v % 16 == 0 for v in (stride_b, stride_t, x.storage_offset()))


def _interpret_block(vocab: int) -> dict:
    return {"BLOCK_V": min(triton.next_power_of_2(vocab), INTERPRET_MAX_BLOCK)}


def _interpret_fwd_block(vocab: int) -> dict:
    return _layout(_interpret_block(vocab)["BLOCK_V"], INTERPRET_LANES, INTERPRET_VEC)


# The constexpr that sizes one main-loop iteration of each kernel (BLOCK_V elements per
# program): the compile gate's SASS instructions per element (compile_gate.loop_elements).
SASS_LOOP_BLOCK = {"_logp_entropy_fwd_kernel": "BLOCK_V", "_logp_entropy_bwd_kernel": "BLOCK_V"}

# Cost model. Ceilings of an H200 SXM (GH100: 132 SMs, 4 schedulers per SM issuing one warp
# instruction per clock each, 16 MUFU (exp2) and 128 FP32 lanes per SM, 1.98 GHz boost clock);
# bandwidth: a measured device copy (8.6 GB read + written in 2.0 ms).
H200 = {
    "bytes_per_s": 4.3e12,
    "instructions_per_s": 132 * 4 * 32 * 1.98e9,  # thread instructions: 3.35e13
    "exp2_per_s": 132 * 16 * 1.98e9,  # 4.18e12
    "flops_per_s": 132 * 128 * 2 * 1.98e9,  # fp32 FMA: 66.9e12
}
# Per vocabulary element, as the kernels are written (fp32; an fma is 2 FLOPs, a max 1).
# Forward: max, fma (z2 - m), floor, exp2, e * w and two sums. Backward: two fmas (log2 p),
# exp2, and p * a (dL/dlogp only) or floor, fma, mul (with dL/dH).
FLOPS_PER_ELEMENT = {"fwd": 7, "bwd": 8, "bwd_logp": 5}
# SASS instructions per element of the main loop on sm_90 at the shipped launch configuration
# (aligned rows, the backward with both gradients; Triton 3.9, 3.6 gives fwd bf16 8.3, fp32
# 7.6 and the same backward): tests/kernels/test_compile_gate.py keeps these within 10% of
# what the compile gate measures. Used for every backward (dL/dlogp alone takes 6.8 and 5.6).
SASS_PER_ELEMENT = {("fwd", 2): 8.6, ("fwd", 4): 7.8, ("bwd", 2): 8.8, ("bwd", 4): 7.6}


def max_instructions_per_element(bytes_per_element: int, device: dict = H200) -> float:
    """SASS instructions per element a kernel can spend and still keep up with the memory: the
    issue rate over the element rate the bandwidth allows. H200, bf16: forward 2 B / element
    -> 4.3e12 / 2 = 2.15e12 elements/s against 3.35e13 instructions/s: 15.6; backward (read
    and write, 4 B / element): 31.1; fp32 twice those."""
    return device["instructions_per_s"] / (device["bytes_per_s"] / bytes_per_element)


def cost_model(
    op: str, n: int, vocab: int, element_size: int, grads: int = 2, device: dict = H200
) -> dict:
    """FLOP / byte / exp2 / instruction model of one launch over ``n`` rows (none ignored).

    ``op``: "fwd" or "bwd" (``grads`` = 1 for dL/dlogp only, 2 with dL/dH). Bytes: the
    logits read once (and the gradient written once), plus per row the label, the label's
    logit and the [N] fp32 statistics. Returns the totals, the time each ceiling of
    ``device`` alone allows, ``model_ms`` (the largest: the resources work in parallel) and
    ``bound`` (which ceiling it is).
    """
    elements = n * vocab
    passes, per_row = (1, 8 + element_size + 16) if op == "fwd" else (2, 20 + 4 * grads)
    if op == "bwd":
        per_row += 2 * element_size  # the label's logit read and its gradient written again
    flops = FLOPS_PER_ELEMENT[op if op == "fwd" or grads == 2 else "bwd_logp"]
    totals = {
        "bytes": passes * elements * element_size + n * per_row,
        "flops": flops * elements,
        "exp2": elements,
        "instructions": SASS_PER_ELEMENT[(op, element_size)] * elements,
    }
    rates = ("bytes_per_s", "flops_per_s", "exp2_per_s", "instructions_per_s")
    floors = {k: 1e3 * totals[k] / device[r] for k, r in zip(totals, rates, strict=True)}
    bound = max(floors, key=floors.get)
    return {**totals, "floors_ms": floors, "model_ms": floors[bound], "bound": bound}


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
            interpret=_interpret_fwd_block(logits.shape[-1]),
            **fwd_launch_config(logits.element_size(), rows_aligned(x, stride_b, stride_t)),
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
