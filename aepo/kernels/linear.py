"""Log-prob, entropy and the policy loss straight from hidden states x lm_head weight.

The [N, V] logits are never materialised: each backend computes them tile by tile in fp32 and
keeps per-row statistics of its vocabulary piece, (m, s, u, z_y) with e = exp(z - m):
m = max z, s = sum e, u = sum e (z - m), z_y = the label's logit (0 outside its piece).

Merging pieces k (vocabulary chunks, kernel splits, or the shards of a vocab-parallel group)
is exact: M = max_k m_k, w_k = exp(m_k - M) (0 for an empty piece), S = sum_k w_k s_k,
U = sum_k w_k (u_k + (m_k - M) s_k), Z = sum_k z_y_k; then logp = (Z - M) - log S and
H = log S - U / S (:mod:`aepo.kernels.reference`). With ``process_group`` each rank holds a
contiguous shard [V_r, H] of the weight, in rank order; the [4, N] statistics are all-gathered
and merged in rank order on every rank (one collective, bitwise the same result everywhere),
so every rank returns the full-vocabulary logp and entropy. In the backward each rank forms
dz = g_lp (1[j=y] - p_j) - g_H p_j (z_j - S) / T over its shard only, p_j = exp(z_j - M - log S),
keeps its shard's dW, and the hidden gradient is all-reduced (summed) over the group.

Rows whose label is ``ignore_index`` are dropped before any matmul: they cost no FLOPs, return 0
and get exactly zero gradient. With ``rows`` (a packed tree, :mod:`aepo.kernels.tree_rows`) the
kept positions are deduplicated to unique (row, label) edges first and the head runs on those.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from aepo.kernels import _launch, linear_gemm, linear_single_pass, linear_torch
from aepo.kernels._checks import (
    check_hidden_weight,
    check_labels,
    check_temperature,
    mask_to_labels,
)
from aepo.kernels.api import resolve_backend
from aepo.kernels.reference import accumulator_dtype, finish_pieces, merge_pieces
from aepo.kernels.tree_rows import (
    check_rows,
    occurrences,
    row_edges,
    to_flat,
    unique_edges,
    unique_table,
)
from aepo.objectives import (
    aggregation_weights,
    per_token,
    per_token_gradients,
    policy_loss,
    to_device,
)


def _backend_module(backend: str):
    """The module of a resolved backend: "triton" is cuBLAS GEMMs + the Triton row kernels."""
    return linear_gemm if backend == "triton" else linear_torch


def shard_layout(weight: torch.Tensor, process_group) -> tuple[int, int]:
    """(vocab_start, vocab_total) of this rank's weight shard; checks that H agrees."""
    if process_group is None:
        return 0, weight.shape[0]
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    mine = torch.tensor(weight.shape, dtype=torch.int64, device=weight.device)
    shapes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(shapes, mine, group=process_group)
    shapes = [tuple(t.tolist()) for t in shapes]
    if len({h for _, h in shapes}) != 1:
        raise ValueError(
            f"process_group shards disagree in H: weight shapes by rank {shapes}; every rank "
            "must pass its [V_r, H] slice of the same lm_head weight"
        )
    return sum(v for v, _ in shapes[:rank]), sum(v for v, _ in shapes)


def _gather_merge(piece: tuple[torch.Tensor, ...], process_group) -> tuple[torch.Tensor, ...]:
    """All-gather the [4, N] piece statistics and merge them in rank order."""
    mine = torch.stack(piece)  # [4, N]
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(parts, mine, group=process_group)
    merged = tuple(parts[0])
    for part in parts[1:]:
        merged = merge_pieces(merged, tuple(part))
    return merged


class _LinearLogpEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, local, inv_t, backend, group):
        impl = _backend_module(backend)
        with torch.no_grad():
            piece = impl.linear_forward(x, w, local, inv_t)
            if group is not None:
                piece = _gather_merge(piece, group)
            valid = torch.ones_like(local, dtype=torch.bool)
            logp, entropy, m, log_s = finish_pieces(*piece, valid)
        ctx.save_for_backward(x, w, local, m, log_s, entropy)
        ctx.inv_t, ctx.backend, ctx.group = inv_t, backend, group
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        if grad_logp is None and grad_entropy is None:
            return (None,) * 6
        x, w, local, m, log_s, entropy = ctx.saved_tensors
        impl = _backend_module(ctx.backend)
        acc = accumulator_dtype(x.dtype)
        g = [None if t is None else t.to(acc).contiguous() for t in (grad_logp, grad_entropy)]
        dx, dw = impl.linear_backward(x, w, local, m, log_s, entropy, *g, ctx.inv_t)
        if ctx.group is not None:
            dist.all_reduce(dx, group=ctx.group)
        dx = dx.to(x.dtype) if ctx.needs_input_grad[0] else None
        return dx, (dw if ctx.needs_input_grad[1] else None), *(None,) * 4


def linear_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    process_group=None,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of the label and full-vocabulary entropy of softmax(hidden W^T / T).

    Args:
        hidden: [..., H] last hidden states, float32 / bfloat16 / float16 (float64 on the
            torch backend), CPU or CUDA.
        weight: [V, H] lm_head weight (no bias), same dtype and device; with
            ``process_group``, this rank's contiguous shard [V_r, H] (shards in rank order).
        labels: [...] integer global vocabulary ids in [0, V) or ``ignore_index``.
        temperature: logits / temperature (> 0).
        ignore_index: rows to skip: dropped before any matmul, 0 out, zero gradient (under
            torch.compile, whose shapes cannot depend on the labels, computed and masked).
        backend: "triton" (chunked cuBLAS GEMMs with fp32 logits, the Triton logits kernels
            for the softmax work: :mod:`aepo.kernels.linear_gemm`), "torch" (chunked plain
            torch) or "auto" (triton on CUDA, torch on CPU unless TRITON_INTERPRET=1).
        process_group: a vocab-parallel group, or None.
        rows: [...] int64 like ``labels``, or None. Given, ``hidden`` is the [R, H] (or
            [1, R, H]) unique rows of a packed tree and position i reads row ``rows[i]`` (-1
            where the label is ``ignore_index``); the head runs once per distinct (row, label)
            edge (:func:`~aepo.kernels.tree_rows.unique_edges`) and the results are mapped back
            to every position. Gradients of positions sharing a row sum onto it.
    Returns:
        (logp, entropy), each [...] (the shape of ``labels``) float32 (float64 for float64
        inputs), differentiable with respect to ``hidden`` and ``weight`` (entropy included).
    Memory: no [N, V] tensor. Saves (m, log s, H) per kept row; the backward allocates dX in
    fp32 [N, H], dW like ``weight`` and a bounded workspace (triton: 2 GiB of [N, Vs] slices;
    torch: a few [512, 4096] chunks and one [4096, H] dW chunk).
    ZeRO-3: call it as the lm_head module's forward (as ``aepo train`` does), so that the
    weight is gathered around the forward and the backward and its gradient is accumulated
    while it is whole.
    """
    args = (temperature, ignore_index, backend, process_group)
    if rows is not None:
        inv_t, backend, keep, edges, table, start = _kept_edges(hidden, weight, labels, rows, *args)
        wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        if wants_grad or process_group is not None:  # differentiable: once per (row, label)
            x = table.index_select(0, edges.rows)
            local = _local_labels(edges.labels - start, weight)
            args = (inv_t, backend, process_group)
            logp_e, ent_e = _LinearLogpEntropy.apply(x, weight, local, *args)
        else:
            logp_e, ent_e = _unique_row_logprobs(table, weight, edges, inv_t, backend)
        return to_flat(logp_e, edges, keep), to_flat(ent_e, edges, keep)
    inv_t, backend, keep, x, local = _kept_rows(hidden, weight, labels, *args)
    logp_k, ent_k = _LinearLogpEntropy.apply(x, weight, local, inv_t, backend, process_group)
    return _scatter(logp_k, keep, labels.shape), _scatter(ent_k, keep, labels.shape)


def _kept_rows(hidden, weight, labels, temperature, ignore_index, backend, process_group):
    """Checked inputs as (1 / T, backend, keep, x [K, H], local [K] label column in this rank's
    shard or -1). Eager: ``keep`` is the [K] indices of the rows to compute (one host sync).
    Under torch.compile, whose shapes must not depend on values: ``keep`` is the [N] bool mask
    and every row is computed, ignored rows on zeroed hidden states (masked out after)."""
    inv_t = check_temperature(temperature)
    vocab_start, vocab_total = shard_layout(check_hidden_weight(hidden, weight), process_group)
    labels = check_labels(labels, hidden, "hidden", "hidden", vocab_total, ignore_index)
    backend = resolve_backend(backend, hidden)
    flat = labels.reshape(-1)
    x = hidden.reshape(-1, hidden.shape[-1])
    keep = flat != ignore_index
    if torch.compiler.is_compiling():
        x = torch.where(keep.unsqueeze(1), x, 0)
        y = torch.where(keep, flat - vocab_start, -1)
    else:
        keep = keep.nonzero().squeeze(1)  # one host sync: rows to compute
        x, y = x.index_select(0, keep), flat.index_select(0, keep) - vocab_start
    return inv_t, backend, keep, x, _local_labels(y, weight)


def _kept_edges(hidden, weight, labels, rows, temperature, ignore_index, backend, process_group):
    """Checked inputs on unique tree rows as (1 / T, backend, keep [...] bool kept positions,
    edges (:class:`~aepo.kernels.tree_rows.Edges`), the [R, H] table of unique rows, this
    rank's first vocabulary id)."""
    inv_t = check_temperature(temperature)
    vocab_start, vocab_total = shard_layout(check_hidden_weight(hidden, weight), process_group)
    table = unique_table(hidden, "hidden")  # [R, H]
    labels = check_rows(rows, labels, table, "hidden", vocab_total, ignore_index)
    backend = resolve_backend(backend, hidden)
    keep = labels != ignore_index
    return inv_t, backend, keep, unique_edges(rows, labels, keep), table, vocab_start


def _unique_row_logprobs(table, weight, edges, inv_t, backend):
    """Per-edge (logp [E], entropy [E]), not differentiable, with the head run once per unique
    row (its primary label): a fork row's extra label y gets (z_y - z_y0) / T + logp_y0, the
    same log-sum-exp, from two [X, H] dot products in the accumulator dtype."""
    re = row_edges(edges)
    x = table.index_select(0, re.rows)  # [U, H]
    logp_u, ent_u = _LinearLogpEntropy.apply(x, weight, re.primary, inv_t, backend, None)
    logp_e, ent_e = logp_u[re.local], ent_u[re.local]
    if len(re.starts) - 1 < edges.rows.numel():  # some rows fork
        xr = re.local[re.extra]
        xs = x[xr].to(logp_u.dtype)
        dot = lambda y: (xs * weight[y].to(logp_u.dtype)).sum(-1)
        gap = (dot(edges.labels[re.extra]) - dot(re.primary[xr])) * inv_t
        logp_e[re.extra] = gap + logp_u[xr]
    return logp_e, ent_e


def _local_labels(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Label columns ``y`` [N] within this rank's weight shard, -1 outside it."""
    return torch.where((y >= 0) & (y < weight.shape[0]), y, torch.full_like(y, -1))


def _scatter(values: torch.Tensor, keep: torch.Tensor, shape) -> torch.Tensor:
    """[K, ...] values of the kept rows (``keep`` from :func:`_kept_rows`) -> [*shape, ...]
    with zeros elsewhere."""
    if keep.dtype == torch.bool:  # torch.compile: every row was computed
        values = torch.where(keep.view(-1, *[1] * (values.dim() - 1)), values, 0)
        return values.view(*shape, *values.shape[1:])
    if keep.numel() == shape.numel():
        return values.view(*shape, *values.shape[1:])
    zeros = values.new_zeros((shape.numel(), *values.shape[1:]))
    return zeros.index_put_((keep,), values).view(*shape, *values.shape[1:])


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
    process_group=None,
    rows: torch.Tensor | None = None,
    **policy_loss_kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`aepo.objectives.policy_loss` from hidden states and the lm_head weight.

    Rows with mask 0 (prompt and tool-result tokens) are dropped before any matmul. The
    objective runs on the [N] log-probs and entropies; its per-token gradients reach the hidden
    states and the weight through one backward pass of the linear kernels.

    Args:
        hidden: [..., T, H]; weight: [V, H] (or this rank's shard); labels: [..., T] sampled
            tokens (anything where mask is 0).
        old_logp, advantages, mask: [..., T], as in :func:`aepo.objectives.policy_loss`.
        temperature, backend, process_group: as in :func:`linear_logprobs_and_entropy`.
        rows: [..., T] int64 like ``labels``, or None. Given, ``hidden`` is the [R, H] (or
            [1, R, H]) unique rows of a packed tree and position (..., t) predicts
            ``labels[..., t]`` from row ``rows[..., t]`` (-1 at padding; >= 0 where mask != 0).
            The objective still runs per position (each occurrence of a shared token has its
            own advantage, clipping, weight and metrics, and their gradients are summed onto
            the token), while the head (logits, softmax statistics, dz, the GEMMs) runs once
            per distinct (row, label) edge (:func:`~aepo.kernels.tree_rows.unique_edges`).
            Extra memory: the gathered [E, H] edge rows (as the [K, H] kept rows without
            ``rows``) and a few [K] vectors.
        **policy_loss_kwargs: objective, eps_low, eps_high, entropy_adv_coef, entropy_coef,
            ref_logp, kl_coef, agg, normalizer, ... (see ``policy_loss``).
        ``labels`` (and ``rows``) must be on ``hidden``'s device; the other tensors (old_logp,
        advantages, mask, ref_logp, entropy_stats, group_ids, normalizer) may be on the host.
    Returns:
        (loss, metrics): equal in value and gradient to
        ``policy_loss(*linear_logprobs_and_entropy(hidden, weight, labels), ...)``.
    Single pass: without ``process_group`` and when every token's gradient is its own
    (:func:`aepo.objectives.per_token_gradients`: anything but AEPO's entropy-aware advantage
    without ``entropy_stats``; the trainer always passes them), on either backend and any
    weight dtype, the loss and its gradients are computed together in the forward
    (:func:`aepo.kernels.linear_single_pass.linear_loss_single_pass`: 6 N H V FLOPs instead of
    8 N H V) and the backward only scales them by dL. Its extra memory: one block's buffers
    (triton: 2 GiB; torch: 128 MiB) and, for a bf16 / fp16 weight with more rows than one
    block holds, an fp32 [V, H] dW accumulator (4 V H bytes: 3.1 GB at V = 152064, H = 5120).
    """
    moved = to_device((old_logp, advantages, mask, policy_loss_kwargs), hidden.device)
    old_logp, advantages, mask, policy_loss_kwargs = moved  # host inputs, as policy_loss
    advantages = per_token(advantages, mask)  # per-sequence ones broadcast over the tokens
    labels = mask_to_labels(mask, labels)
    if _single_pass(hidden, weight, process_group, policy_loss_kwargs):
        tokens = (labels, old_logp, advantages, mask)
        kw = policy_loss_kwargs
        return _single_pass_loss(hidden, weight, *tokens, temperature, backend, kw, rows)
    logp, entropy = linear_logprobs_and_entropy(
        hidden,
        weight,
        labels,
        temperature=temperature,
        backend=backend,
        process_group=process_group,
        rows=rows,
    )
    return policy_loss(logp, old_logp, advantages, mask, entropy=entropy, **policy_loss_kwargs)


def _single_pass(hidden, weight, process_group, loss_kwargs) -> bool:
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return (
        wants_grad
        # fp16: the single pass forms dz in fp16 before the backward's (loss-scaled) dL arrives,
        # so small gradients underflow that GradScaler / DeepSpeed's loss scale would keep
        and weight.dtype != torch.float16
        and not torch.compiler.is_compiling()  # it calls torch.autograd.grad in the forward
        and process_group is None
        and per_token_gradients(**loss_kwargs)
    )


def _single_pass_loss(
    hidden, weight, labels, old_logp, advantages, mask, temperature, backend, kw, rows
):
    """The loss with its d hidden / d weight computed in the forward (see
    :func:`fused_linear_policy_loss`); with ``rows``, on the unique edges of a packed tree."""
    with torch.no_grad():  # every argument checked before the expensive pass
        zeros = torch.zeros(mask.shape, dtype=accumulator_dtype(hidden.dtype), device=mask.device)
        policy_loss(zeros, old_logp, advantages, mask, entropy=zeros, **kw)
    tokens = (old_logp, advantages, mask, kw)
    if rows is None:
        inv_t, backend, keep, x, local = _kept_rows(
            hidden, weight, labels, temperature, -100, backend, None
        )
        token_grads = _block_gradients(keep, *tokens)
        to_grid = lambda values: _scatter(values, keep, mask.shape)
        forks = None
    else:  # each unique row once, its extra labels (forks) through the hooks
        inv_t, backend, kept, edges, table, _ = _kept_edges(
            hidden, weight, labels, rows, temperature, -100, backend, None
        )
        occ = occurrences(kept.reshape(-1).nonzero().squeeze(1), edges)
        re = row_edges(edges)
        x, local, token_grads = table.index_select(0, re.rows), re.primary, None
        forks = _ForkHooks(re, edges.labels, _block_gradients(occ.flat, *tokens, occ), inv_t)
        to_grid = lambda values: to_flat(values, edges, kept)
    need_dw, impl = weight.requires_grad, _backend_module(backend)
    logp_k, ent_k, dx, dw = linear_single_pass.linear_loss_single_pass(
        x.detach(), weight.detach(), local, inv_t, token_grads, need_dw, impl, forks
    )
    if forks is not None:  # per unique row -> per edge
        logp_k, ent_k = forks.edge_logp(logp_k), ent_k[re.local]
    logp, entropy = to_grid(logp_k), to_grid(ent_k)
    with torch.no_grad():
        loss, metrics = policy_loss(logp, old_logp, advantages, mask, entropy=entropy, **kw)
    if rows is None:
        d_hidden = _scatter(dx.to(hidden.dtype), keep, mask.shape)
    else:  # onto the unique rows of the table
        d_hidden = hidden.new_zeros(hidden.shape)
        d_hidden.view(-1, hidden.shape[-1]).index_copy_(0, re.rows, dx.to(hidden.dtype))
    return _PrecomputedGradient.apply(hidden, weight, loss, d_hidden, dw), metrics


class _ForkHooks:
    """``forks`` of :func:`~aepo.kernels.linear_single_pass.linear_loss_single_pass` on the
    unique rows of a packed tree (:class:`~aepo.kernels.tree_rows.RowEdges`).

    The pass computes each unique row once, with its primary label y0. A further label y of
    the row (a fork) shares the row's log-sum-exp: logp_y = (z_y - z_y0) / T + logp_y0, read
    from the block's logits before the row work rewrites them. The objective runs on every
    edge of the block (``edge_grads``: over occurrences, :func:`_edge_gradients`); the row
    kernel gets the row's summed (dL/dlogp, dL/dH), which puts sum_e g_e at y0, and
    :meth:`correct` moves each extra edge's g_x / T from y0 to its own label in dz."""

    def __init__(self, re, labels: torch.Tensor, edge_grads, inv_t: float):
        self.re, self.labels, self.edge_grads, self.inv_t = re, labels, edge_grads, inv_t
        self.logp_e: torch.Tensor | None = None  # [E], filled block by block
        self.fix = None

    def bind(self, r: slice, z: torch.Tensor):
        """The block ``r`` of unique rows, its unscaled logits ``z`` [R, V]: token_grads."""
        re = self.re
        e = slice(re.starts[r.start], re.starts[min(r.stop, len(re.starts) - 1)])
        local, extra = re.local[e] - r.start, re.extra[e]  # [E_r] row in the block, is a fork
        xr, xy = local[extra], self.labels[e][extra]
        y0 = re.primary[r][xr]
        gap = (z[xr, xy] - z[xr, y0]) * self.inv_t

        def token_grads(rows: slice, lp: torch.Tensor, h: torch.Tensor):
            lp_e = lp[local].index_put((extra.nonzero().squeeze(1),), gap.to(lp.dtype) + lp[xr])
            if self.logp_e is None:
                self.logp_e = lp.new_empty(re.local.shape[0])
            self.logp_e[e] = lp_e
            g, g_h = self.edge_grads(e, lp_e, h[local])
            on_rows = lambda v: None if v is None else torch.zeros_like(lp).index_add_(0, local, v)
            self.fix = (xr, xy, y0, g[extra] * self.inv_t)
            return on_rows(g), on_rows(g_h)

        return token_grads

    def correct(self, dz: torch.Tensor) -> None:
        """dz [R, V] += g_x / T at (row, y) and -= it at (row, y0), for the block's forks."""
        xr, xy, y0, g = self.fix
        if xr.numel():
            where = (torch.cat([xr, xr]), torch.cat([xy, y0]))
            dz.index_put_(where, torch.cat([g, -g]).to(dz.dtype), accumulate=True)

    def edge_logp(self, logp_rows: torch.Tensor) -> torch.Tensor:
        """[E] per-edge log-probs (every block seen); ``logp_rows`` when there was none."""
        return logp_rows[:0] if self.logp_e is None else self.logp_e


def _block_gradients(index, old_logp, advantages, mask, kw, occ=None):
    """``token_grads`` of :func:`~aepo.kernels.linear_single_pass.linear_loss_single_pass`: the
    objective on one block of kept tokens (flat indices ``index``), summed (agg="constant",
    normalizer 1), its per-token gradients times the whole batch's aggregation weights.

    With ``occ`` (:class:`~aepo.kernels.tree_rows.Occurrences`, ``index`` = ``occ.flat``) the
    blocks are blocks of edges: the objective runs on every occurrence of the block's edges,
    each with its own old_logp / advantage / ref_logp / statistics / weight, and the
    occurrences' (dL/dlogp, dL/dH) are summed onto their edges."""
    # the tensors are on index's device already (fused_linear_policy_loss moved them); a
    # statistic may be a Python number, made a tensor there
    on = lambda t: torch.as_tensor(t, device=index.device)
    pick = lambda t: on(t).expand(mask.shape).reshape(-1).index_select(0, index)
    old, adv = pick(old_logp), pick(advantages)
    weights = pick(aggregation_weights(mask, kw.get("agg", "token-mean"), kw.get("normalizer")))
    ref = None if kw.get("ref_logp") is None else pick(kw["ref_logp"])
    stats = kw.get("entropy_stats")
    stats = None if stats is None else tuple(pick(t) for t in stats)
    block_kw = kw | {"agg": "constant", "normalizer": 1.0, "group_ids": None}
    block_kw |= {"process_group": None, "ref_logp": None, "entropy_stats": None}
    needs_h = kw.get("entropy_coef", 0.0) != 0

    def token_grads(r: slice, lp: torch.Tensor, h: torch.Tensor):
        lp, h = lp.detach().requires_grad_(), h.detach().requires_grad_(needs_h)
        with torch.enable_grad():
            loss, _ = policy_loss(
                lp,
                old[r],
                adv[r],
                torch.ones_like(lp),
                entropy=h,
                **block_kw
                | {
                    "ref_logp": None if ref is None else ref[r],
                    "entropy_stats": None if stats is None else tuple(t[r] for t in stats),
                },
            )
            grads = torch.autograd.grad(loss, (lp, h) if needs_h else (lp,))
        w = weights[r].to(lp.dtype)
        return grads[0] * w, (grads[1] * w if needs_h else None)

    return token_grads if occ is None else _edge_gradients(token_grads, occ)


def _edge_gradients(occurrence_grads, occ):
    """``token_grads`` over blocks of edges from ``occurrence_grads`` over their occurrences
    (contiguous: ``occ`` is sorted by edge): gather each edge's (logp, H) to its occurrences,
    evaluate, and sum the occurrences' gradients back onto the edges."""
    offsets = occ.offsets.tolist()

    def token_grads(r: slice, lp: torch.Tensor, h: torch.Tensor):
        o = slice(offsets[r.start], offsets[r.start + lp.shape[0]])
        local = occ.edge[o] - r.start  # [K_r] edge of each occurrence within the block
        g_lp, g_h = occurrence_grads(o, lp[local], h[local])
        total = lambda g: None if g is None else torch.zeros_like(lp).index_add_(0, local, g)
        return total(g_lp), total(g_h)

    return token_grads


class _PrecomputedGradient(torch.autograd.Function):
    """Returns ``loss``; its backward hands out the d hidden and d weight computed with it,
    scaled in place by dL (so a second backward through it is refused)."""

    @staticmethod
    def forward(ctx, hidden, weight, loss, d_hidden, d_weight):
        ctx.grads, ctx.used = (d_hidden, d_weight), False
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError(
                "fused_linear_policy_loss's single pass keeps one copy of its gradients: "
                "backward through it runs once (retain_graph is not supported)"
            )
        ctx.used = True
        d_hidden, d_weight = ctx.grads
        ctx.grads = None
        scale = lambda g, need: g.mul_(grad_loss.to(g.dtype)) if need and g is not None else None
        d_hidden = scale(d_hidden, ctx.needs_input_grad[0])
        return d_hidden, scale(d_weight, ctx.needs_input_grad[1]), None, None, None


@_launch.gate_exercise
def _gate_exercise(dtype: torch.dtype) -> None:
    """The row kernels as the triton backend launches them (fp32 logits blocks; dz in the
    weight's dtype): the recompute path's forward and its backward with a gradient on logp /
    entropy / both, and the single pass."""
    for n, h, v in ((17, 64, 4353),):
        hidden, weight = torch.zeros(n, h, dtype=dtype), torch.zeros(v, h, dtype=dtype)
        labels = torch.zeros(n, dtype=torch.long)
        for wrt in ((0,), (1,), (0, 1)):
            x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            outs = linear_logprobs_and_entropy(x, w, labels, backend="triton")
            torch.autograd.grad(sum(outs[i].sum() for i in wrt), (x, w))
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        zeros, ones = torch.zeros(n), torch.ones(n)
        loss, _ = fused_linear_policy_loss(x, w, labels, zeros, ones, ones, backend="triton")
        torch.autograd.grad(loss, (x, w))
