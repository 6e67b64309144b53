"""Policy loss straight from vocabulary logits: one fused pass forward, one fused pass backward.

The forward kernel gives per-token (logp, H) and the saved row statistics; the objective runs
on those [N]-sized tensors with autograd to get the per-token scalars g_lp = dL/dlogp and
g_H = dL/dH (only with an entropy bonus); the backward kernel turns them into dL/dlogits in one
read and one write of the logits. No autograd graph over [N, V] is ever built. With ``rows``
(a packed tree, :mod:`aepo.kernels.tree_rows`) both passes run once over the unique rows.
"""

from __future__ import annotations

import torch

from aepo.kernels import _buffers, _launch
from aepo.kernels._checks import check_logits_labels, check_temperature, mask_to_labels
from aepo.kernels.api import logprobs_and_entropy, resolve_backend
from aepo.kernels.logprob_entropy import logprobs_entropy_bwd, logprobs_entropy_fwd
from aepo.kernels.torch_backend import chunked_backward, chunked_forward
from aepo.kernels.tree_rows import (
    Edges,
    check_rows,
    first_of_row,
    to_flat,
    unique_edges,
    unique_table,
)
from aepo.objectives import per_token, policy_loss, to_device


def forward_stats(logits, labels, inv_temperature, ignore_index, backend):
    """(logp, entropy, m, log_s), each shaped like ``labels``, without autograd."""
    if backend == "triton":
        with torch.no_grad():
            return logprobs_entropy_fwd(logits, labels, inv_temperature, ignore_index, False)
    vocab = logits.shape[-1]
    stats = chunked_forward(
        logits.detach().reshape(-1, vocab), labels.reshape(-1), inv_temperature, ignore_index
    )
    return tuple(t.view(labels.shape) for t in stats)


def backward_logits(
    logits, labels, stats, g_lp, g_h, inv_temperature, ignore_index, backend, inplace_grad
) -> torch.Tensor:
    """dL/dlogits shaped like ``logits`` from per-token upstream gradients (None = zero)."""
    _, entropy, m, log_s = stats
    if backend == "triton":
        grad = logits.detach() if inplace_grad else _buffers.empty_like(logits)
        logprobs_entropy_bwd(
            logits, labels, m, log_s, entropy, g_lp, g_h, grad, inv_temperature, ignore_index
        )
        return grad
    vocab = logits.shape[-1]
    x = logits.detach().reshape(-1, vocab)  # a view, or a private copy of an odd layout
    grad = x if inplace_grad else _buffers.empty_like(x)
    flat = [None if t is None else t.reshape(-1) for t in (m, log_s, entropy, g_lp, g_h)]
    chunked_backward(x, labels.reshape(-1), *flat, grad, inv_temperature, ignore_index)
    return grad.reshape(logits.shape)


class _AttachGradient(torch.autograd.Function):
    """Returns ``loss`` unchanged; its backward scales the precomputed per-token gradients by
    the incoming dL and runs the fused backward over the logits. ``fix`` (unique tree rows):
    (rows [U], cols [U], delta [U]) added to dL/dlogits there, also scaled by dL."""

    @staticmethod
    def forward(
        ctx, logits, loss, labels, stats, g_lp, g_h, inv_t, ignore_index, backend, inplace_grad, fix
    ):
        ctx.save_for_backward(logits, labels, *stats, g_lp, g_h)
        ctx.args, ctx.fix = (inv_t, ignore_index, backend, inplace_grad), fix
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, labels, *stats, g_lp, g_h = ctx.saved_tensors
        g_lp = None if g_lp is None else g_lp * grad_loss
        g_h = None if g_h is None else g_h * grad_loss
        grad = backward_logits(logits, labels, stats, g_lp, g_h, *ctx.args)
        if ctx.fix is not None:  # in fp32 / fp64, rounded once to the logits' dtype
            r, c, delta = ctx.fix
            table = unique_table(grad, "grad")
            table[r, c] = (table[r, c].to(delta.dtype) + delta * grad_loss).to(table.dtype)
        return grad, *([None] * 10)


def fused_policy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
    inplace_grad: bool = False,
    rows: torch.Tensor | None = None,
    **policy_loss_kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`aepo.objectives.policy_loss` computed from logits with the fused kernels.

    Args:
        logits: [..., T, V] (e.g. ``lm_head`` output, or a ``[:, :-1]`` slice of it).
        labels: [..., T] sampled tokens; positions with mask 0 are skipped by the kernels
            (their labels may be anything, e.g. padding or -100).
        old_logp, advantages, mask: [..., T], as in :func:`aepo.objectives.policy_loss`.
        temperature: the sampling temperature (logits / T).
        backend, inplace_grad: as in :func:`aepo.kernels.logprobs_and_entropy`.
        rows: [..., T] int64 like ``labels``, or None. Given, ``logits`` is the [R, V] (or
            [1, R, V]) unique rows of a packed tree and position (..., t) predicts
            ``labels[..., t]`` from row ``rows[..., t]`` (-1 at padding; >= 0 where mask != 0).
            The objective runs per position, as on the flat [..., T, V] logits
            ``logits[rows]``; the fused forward and backward run once over the R rows.
        **policy_loss_kwargs: objective, eps_low, eps_high, entropy_adv_coef, entropy_coef,
            ref_logp, kl_coef, agg, normalizer, ... (see ``policy_loss``).
        ``labels`` (and ``rows``) must be on ``logits``'s device; the other tensors (old_logp,
        advantages, mask, ref_logp, entropy_stats, group_ids, normalizer) may be on the host.
    Returns:
        (loss, metrics): equal in value and gradient to
        ``policy_loss(*logprobs_and_entropy(logits, labels), ...)``, which is what it runs
        under torch.compile.
    Memory: the gradient buffer [..., T, V] in the logits dtype (none with inplace_grad) and a
    few [..., T] fp32 vectors; nothing else of size V. With ``rows``: the [R, V] gradient
    buffer (none with inplace_grad), a few [K] and [R] vectors (K kept positions) and O(X)
    scalars for the X extra labels of rows with several (fork points): no [E, V] or [X, V]
    buffer. Under torch.compile with ``rows``: an [X, V] copy of the fork rows and its
    gradient, and autograd's [R, V] sum of the two gradients.
    """
    inv_t = check_temperature(temperature)
    ignore_index = -100
    moved = to_device((old_logp, advantages, mask, policy_loss_kwargs), logits.device)
    old_logp, advantages, mask, policy_loss_kwargs = moved  # host inputs, as policy_loss
    advantages = per_token(advantages, mask)  # per-sequence ones broadcast over the tokens
    labels = mask_to_labels(mask, labels, ignore_index)
    if rows is not None:
        args = (temperature, backend, inplace_grad, policy_loss_kwargs)
        return _tree_policy_loss(logits, labels, rows, old_logp, advantages, mask, *args)
    labels = check_logits_labels(logits, labels, ignore_index)
    backend = resolve_backend(backend, logits)
    _check_inplace(inplace_grad, logits)
    if torch.compiler.is_compiling():
        # Dynamo cannot trace the torch.autograd.grad below; AOTAutograd derives the same
        # backward (objective, then the fused logits backward) from the composition.
        logp, entropy = logprobs_and_entropy(
            logits, labels, temperature=temperature, backend=backend, inplace_grad=inplace_grad
        )
        return policy_loss(logp, old_logp, advantages, mask, entropy=entropy, **policy_loss_kwargs)
    stats = forward_stats(logits, labels, inv_t, ignore_index, backend)
    train = logits.requires_grad and torch.is_grad_enabled()
    lp = stats[0].detach().requires_grad_(train)
    needs_h = train and policy_loss_kwargs.get("entropy_coef", 0.0) != 0
    h = stats[1].detach().requires_grad_(needs_h)
    loss, metrics = policy_loss(lp, old_logp, advantages, mask, entropy=h, **policy_loss_kwargs)
    if not train:
        return loss, metrics
    wrt = (lp, h) if needs_h else (lp,)
    grads = torch.autograd.grad(loss, wrt)
    g_h = grads[1] if needs_h else None
    loss = _AttachGradient.apply(
        logits,
        loss.detach(),
        labels,
        stats,
        grads[0],
        g_h,
        inv_t,
        ignore_index,
        backend,
        inplace_grad,
        None,
    )
    return loss, metrics


def _tree_policy_loss(
    logits, labels, rows, old_logp, advantages, mask, temperature, backend, inplace_grad, kw
):
    """:func:`fused_policy_loss` on the [R, V] unique rows of a packed tree: the kernels run
    once over them with each row's first label (its "primary" edge); an extra label's logp is
    its scaled logit minus the row's log-sum-exp, and its gradient a correction at two logits
    of its row (the kernel's g_row (1[j = y0] - p_j) with g_row the sum over the row's edges,
    moved from y0 to the extra label by -g_x at y0 and +g_x at y_x, times 1 / T)."""
    inv_t, ignore_index = check_temperature(temperature), -100
    table, keep, edges, first, row_labels = _tree_edges(logits, labels, rows, ignore_index)
    backend = resolve_backend(backend, logits)
    _check_inplace(inplace_grad, logits)
    if torch.compiler.is_compiling():
        logp_e, ent_e = _edge_logprobs(logits, row_labels, edges, first, temperature, backend)
        logp, entropy = to_flat(logp_e, edges, keep), to_flat(ent_e, edges, keep)
        return policy_loss(logp, old_logp, advantages, mask, entropy=entropy, **kw)
    stats = forward_stats(logits, row_labels, inv_t, ignore_index, backend)
    extra = (~first).nonzero().squeeze(1)  # [X]
    logp_e, ent_e = _edge_stats(table, stats, edges, extra, inv_t)
    train = logits.requires_grad and torch.is_grad_enabled()
    lp = to_flat(logp_e, edges, keep).requires_grad_(train)
    needs_h = train and kw.get("entropy_coef", 0.0) != 0
    h = to_flat(ent_e, edges, keep).requires_grad_(needs_h)
    loss, metrics = policy_loss(lp, old_logp, advantages, mask, entropy=h, **kw)
    if not train:
        return loss, metrics
    grads = torch.autograd.grad(loss, (lp, h) if needs_h else (lp,))
    g_e = _edge_sum(grads[0], edges, keep)  # [E]
    on_rows = lambda g: g.new_zeros(table.shape[0]).index_add_(0, edges.rows, g)
    g_lp = on_rows(g_e).view(row_labels.shape)
    g_h = on_rows(_edge_sum(grads[1], edges, keep)).view(row_labels.shape) if needs_h else None
    fix = _extra_label_fix(edges, extra, row_labels.view(-1), g_e * inv_t, table.shape[-1])
    args = (inv_t, ignore_index, backend, inplace_grad, fix)
    loss = _AttachGradient.apply(logits, loss.detach(), row_labels, stats, g_lp, g_h, *args)
    return loss, metrics


def tree_logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    rows: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`aepo.kernels.logprobs_and_entropy` of every position of a packed tree, from the
    logits of its unique rows only.

    Args:
        logits: [R, V] or [1, R, V], the unique rows (see :func:`fused_policy_loss`'s ``rows``).
        labels: [...] int64 (``ignore_index`` = skip), the flat positions' labels.
        rows: [...] int64 like ``labels``: the row each position reads (-1 at padding).
        temperature, ignore_index, backend: as in ``logprobs_and_entropy``.
    Returns:
        (logp, entropy), each [...] fp32, 0 at skipped positions; differentiable. The kernels
        run once over the R rows (each with its first label); a row's further labels (fork
        points) take their log-probs from an [X, V] copy of those rows.
    """
    _, keep, edges, first, row_labels = _tree_edges(logits, labels, rows, ignore_index)
    backend = resolve_backend(backend, logits)
    logp_e, ent_e = _edge_logprobs(logits, row_labels, edges, first, temperature, backend)
    return to_flat(logp_e, edges, keep), to_flat(ent_e, edges, keep)


def _tree_edges(logits, labels, rows, ignore_index):
    """Checked tree inputs as (table [R, V], keep [...] bool, edges, first [E] bool, the rows'
    primary labels shaped like ``logits[..., 0]``)."""
    table = unique_table(logits, "logits")  # [R, V]
    labels = check_rows(rows, labels, table, "logits", table.shape[-1], ignore_index)
    keep = labels != ignore_index
    edges = unique_edges(rows, labels, keep)
    first, row_labels = _primary_edges(edges, table.shape[0], ignore_index)
    row_labels = row_labels.view(logits.shape[:-1])
    row_labels = check_logits_labels(logits, row_labels, ignore_index, check_range=False)
    return table, keep, edges, first, row_labels


def _check_inplace(inplace_grad: bool, logits: torch.Tensor) -> None:
    if inplace_grad and logits.requires_grad and logits.is_leaf:
        raise ValueError("inplace_grad=True would overwrite a leaf tensor with its gradient")


def _primary_edges(edges: Edges, n_rows: int, ignore_index: int):
    """(first [E] bool: the edge is its row's first, row_labels [R]: the label of that edge,
    ``ignore_index`` for rows without one). Edges are sorted by row."""
    first = first_of_row(edges)
    row_labels = torch.full((n_rows,), ignore_index, dtype=torch.long, device=edges.rows.device)
    row_labels[edges.rows[first]] = edges.labels[first]
    return first, row_labels


def _edge_stats(table, stats, edges, extra, inv_t):
    """Per-edge (logp [E], entropy [E]) from the rows' forward statistics: every edge of a row
    has its entropy; an extra edge's logp is (z_y - m) - log s with z_y = its logit / T."""
    logp, entropy, m, log_s = (t.reshape(-1) for t in stats)
    logp_e, ent_e = logp[edges.rows], entropy[edges.rows]
    r, y = edges.rows[extra], edges.labels[extra]
    z = table[r, y].to(logp.dtype)
    if inv_t != 1.0:
        z = z * inv_t
    z = z.clamp(min=torch.finfo(z.dtype).min)  # as the kernels read a -inf logit
    logp_e[extra] = (z - m[r]) - log_s[r]
    return logp_e, ent_e


def _edge_sum(g: torch.Tensor, edges: Edges, keep: torch.Tensor) -> torch.Tensor:
    """[*keep.shape] per-position values summed onto their [E] edges."""
    return g.new_zeros(edges.rows.shape[0]).index_add_(0, edges.inverse, g[keep])


def _extra_label_fix(edges, extra, row_labels, g_x, vocab):
    """(rows [U], cols [U], delta [U]) moving each extra edge's g_x [E] (already / T) from its
    row's primary label to its own (see :func:`_tree_policy_loss`); None without extras."""
    if extra.numel() == 0:
        return None
    r, g = edges.rows[extra], g_x[extra]
    cols = torch.cat([edges.labels[extra], row_labels[r]])
    key, where = torch.unique(torch.cat([r, r]) * vocab + cols, return_inverse=True)
    delta = g.new_zeros(key.shape[0]).index_add_(0, where, torch.cat([g, -g]))
    return key // vocab, key % vocab, delta


def _edge_logprobs(logits, row_labels, edges, first, temperature, backend):
    """Differentiable per-edge (logp [E], entropy [E]) (torch.compile, no-loss callers): the
    primary edges on the logits in place, the extra ones on an [X, V] copy of their rows."""
    kw = {"temperature": temperature, "backend": backend}
    logp, entropy = (t.reshape(-1) for t in logprobs_and_entropy(logits, row_labels, **kw))
    extra = ~first
    lp_x, h_x = logprobs_and_entropy(
        unique_table(logits, "logits")[edges.rows[extra]], edges.labels[extra], **kw
    )
    logp_e = torch.where(extra, 0.0, logp[edges.rows]).index_put((extra,), lp_x)
    ent_e = torch.where(extra, 0.0, entropy[edges.rows]).index_put((extra,), h_x)
    return logp_e, ent_e


@_launch.gate_exercise
def _gate_exercise(dtype: torch.dtype) -> None:
    """The fused loss with and without an entropy bonus (backward without / with dL/dH)."""
    for logits in _launch.gate_logits(dtype):
        shape = logits.shape[:-1]
        labels = torch.zeros(shape, dtype=torch.long)
        old_logp, advantages, mask = torch.zeros(shape), torch.ones(shape), torch.ones(shape)
        for entropy_coef in (0.0, 0.01):
            x = logits.clone().requires_grad_()
            loss, _ = fused_policy_loss(
                x, labels, old_logp, advantages, mask, backend="triton", entropy_coef=entropy_coef
            )
            loss.backward()
