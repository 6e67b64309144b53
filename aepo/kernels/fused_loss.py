"""Policy loss straight from vocabulary logits: one fused pass forward, one fused pass backward.

The forward kernel gives per-token (logp, H) and the saved row statistics; the objective runs
on those [N]-sized tensors with autograd to get the per-token scalars g_lp = dL/dlogp and
g_H = dL/dH (only with an entropy bonus); the backward kernel turns them into dL/dlogits in one
read and one write of the logits. No autograd graph over [N, V] is ever built.
"""

from __future__ import annotations

import torch

from aepo.kernels import _buffers, _launch
from aepo.kernels._checks import check_logits_labels, check_temperature, mask_to_labels
from aepo.kernels.api import logprobs_and_entropy, resolve_backend
from aepo.kernels.logprob_entropy import logprobs_entropy_bwd, logprobs_entropy_fwd
from aepo.kernels.torch_backend import chunked_backward, chunked_forward
from aepo.objectives import policy_loss


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
    the incoming dL and runs the fused backward over the logits."""

    @staticmethod
    def forward(
        ctx, logits, loss, labels, stats, g_lp, g_h, inv_t, ignore_index, backend, inplace_grad
    ):
        ctx.save_for_backward(logits, labels, *stats, g_lp, g_h)
        ctx.args = (inv_t, ignore_index, backend, inplace_grad)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, labels, *stats, g_lp, g_h = ctx.saved_tensors
        g_lp = None if g_lp is None else g_lp * grad_loss
        g_h = None if g_h is None else g_h * grad_loss
        grad = backward_logits(logits, labels, stats, g_lp, g_h, *ctx.args)
        return grad, *([None] * 9)


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
        **policy_loss_kwargs: objective, eps_low, eps_high, entropy_adv_coef, entropy_coef,
            ref_logp, kl_coef, agg, normalizer, ... (see ``policy_loss``).
    Returns:
        (loss, metrics): equal in value and gradient to
        ``policy_loss(*logprobs_and_entropy(logits, labels), ...)``, which is what it runs
        under torch.compile.
    Memory: the gradient buffer [..., T, V] in the logits dtype (none with inplace_grad) and a
    few [..., T] fp32 vectors; nothing else of size V.
    """
    inv_t = check_temperature(temperature)
    ignore_index = -100
    labels = mask_to_labels(mask, labels, ignore_index)
    labels = check_logits_labels(logits, labels, ignore_index)
    backend = resolve_backend(backend, logits)
    if inplace_grad and logits.requires_grad and logits.is_leaf:
        raise ValueError("inplace_grad=True would overwrite a leaf tensor with its gradient")
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
    )
    return loss, metrics


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
