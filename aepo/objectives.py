"""AEPO objectives: group advantages, entropy-aware advantages, the policy-loss family.

Pure tensor functions of per-token (logp, old_logp, advantage, mask); formulas and the choices
taken where the paper is ambiguous are in AEPO_SPEC sections 1 and 2. Every objective's
gradient is g_t * d logp_t (plus g_H * d H_t with an entropy bonus), so the fused vocabulary
kernel (:func:`aepo.kernels.fused_policy_loss`) serves them all. No host syncs: metrics come
back as detached tensors.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist

from aepo.distributed import all_reduce

OBJECTIVES = ("aepo", "grpo", "ppo", "dapo", "gppo", "cispo")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant")
ENTROPY_NORMS = ("batch", "micro", "group")
DEFAULT_EPS_HIGH = {"dapo": 0.28}


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(allowed)}")
    return value


def _same_shape(**tensors: torch.Tensor | None) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError("shape mismatch: " + ", ".join(f"{k} {s}" for k, s in shapes.items()))


def per_token(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[..., T] advantages from per-token ones ([..., T], returned as is) or per-sequence ones
    ([...] as :func:`group_advantages` returns them, or [..., 1]), broadcast over T (a view)."""
    if not isinstance(advantages, torch.Tensor) or advantages.shape == mask.shape:
        return advantages
    if advantages.dim() == mask.dim() and advantages.shape[-1] != 1:
        return advantages  # per token, of another shape: the shape checks name what differs
    lead = tuple(mask.shape[:-1])
    if tuple(advantages.shape) in (lead, (*lead, 1)):
        return advantages.reshape(*lead, 1).expand(mask.shape)
    raise ValueError(
        f"advantages {tuple(advantages.shape)} must be per token {tuple(mask.shape)}, or per "
        f"sequence {lead} or {(*lead, 1)} (broadcast over the tokens)"
    )


# ---------------------------------------------------------------------------------------------
# Advantages (AEPO_SPEC section 1)


def to_device(x, device: torch.device):
    """``x`` (a tensor, or a tuple or dict holding tensors; anything else is returned as is)
    on ``device``.

    The policy loss's small inputs are often built on the host (advantages and group ids from
    the rollout, entropy statistics from host copies of the entropies) while the log-probs are
    on the GPU; CUDA refuses an op that mixes them, and an indexing op given even a 0-dim host
    tensor. They are moved where the log-probs are, as Hugging Face losses move the labels."""
    if isinstance(x, torch.Tensor):
        return x if x.device == device else x.to(device, non_blocking=True)
    if isinstance(x, tuple):
        return tuple(to_device(t, device) for t in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO outcome advantage A_i = (R_i - mean_g R) / (std_g R + eps), per trajectory.

    Args:
        rewards: [B] float rewards, one per trajectory.
        group_ids: [B] integer id of each trajectory's group (prompt); groups may differ in
            size and need not be contiguous.
        normalize_std: divide by the group's unbiased std (False: Dr.GRPO, centring only).
    Returns:
        [B] advantages in the dtype of ``rewards``. A group of one gets 0.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [B]; got {tuple(rewards.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    if group_ids.is_floating_point():
        raise TypeError(f"group_ids must be integers, got dtype {group_ids.dtype}")
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    r = rewards.to(torch.float64)
    n_groups = uniq.numel()
    count = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(
        0, inverse, torch.ones_like(r)
    )
    mean = torch.zeros_like(count).index_add_(0, inverse, r) / count
    centred = r - mean[inverse]
    if normalize_std:
        sq = torch.zeros_like(count).index_add_(0, inverse, centred.square())
        std = (sq / (count - 1).clamp(min=1)).sqrt()  # unbiased; 0 for a group of one
        centred = centred / (std[inverse] + eps)
    return centred.to(rewards.dtype)


def entropy_statistics(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    *,
    norm: str = "batch",
    process_group: dist.ProcessGroup | None = None,
    group_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std of the entropy over the masked tokens of a normalisation set.

    Args:
        entropy, mask: [..., T] (mask 1 for policy-sampled tokens).
        norm: "batch" (all masked tokens here, all-reduced over ``process_group`` when one is
            given and torch.distributed is initialised), "micro" (this call's tokens only:
            the released code's behaviour) or "group" (per group; needs ``group_ids``).
        group_ids: [...] (one id per sequence) for norm="group".
    Returns:
        (mean, std) broadcastable to ``entropy``: scalars, or [..., 1] per sequence for
        "group". std is 1 where it is 0 or fewer than two tokens are selected.
    """
    _choice("entropy normalisation", norm, ENTROPY_NORMS)
    w = mask.to(torch.float64)
    h = torch.where(mask.bool(), entropy.detach().to(torch.float64), 0.0)  # garbage-proof
    if norm == "group":
        return _group_entropy_statistics(h, w, group_ids)
    reduce = norm == "batch" and process_group is not None and dist.is_initialized()
    stats = torch.stack([(h * w).sum(), w.sum()])
    if reduce:
        all_reduce(stats, group=process_group)
    mean = stats[0] / stats[1].clamp(min=1)
    sq = ((h - mean).square() * w).sum()
    if reduce:
        all_reduce(sq, group=process_group)
    return mean, _safe_std(sq, stats[1])


def _safe_std(sum_sq: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    std = (sum_sq / (count - 1).clamp(min=1)).sqrt()
    return torch.where((count < 2) | (std == 0), torch.ones_like(std), std)


def _group_entropy_statistics(h, w, group_ids):
    if group_ids is None or group_ids.shape != h.shape[:-1]:
        raise ValueError(
            f"norm='group' needs group_ids of shape {tuple(h.shape[:-1])} (one per sequence), "
            f"got {None if group_ids is None else tuple(group_ids.shape)}"
        )
    uniq, inv = torch.unique(to_device(group_ids, h.device).reshape(-1), return_inverse=True)
    n = uniq.numel()
    seq_sum = (h * w).sum(-1).reshape(-1)
    seq_cnt = w.sum(-1).reshape(-1)
    g_sum = torch.zeros(n, dtype=h.dtype, device=h.device).index_add_(0, inv, seq_sum)
    g_cnt = torch.zeros_like(g_sum).index_add_(0, inv, seq_cnt)
    mean = (g_sum / g_cnt.clamp(min=1))[inv].reshape((*h.shape[:-1], 1))
    seq_sq = ((h - mean).square() * w).sum(-1).reshape(-1)
    g_sq = torch.zeros_like(g_sum).index_add_(0, inv, seq_sq)
    std = _safe_std(g_sq, g_cnt)[inv].reshape((*h.shape[:-1], 1))
    return mean, std


def entropy_aware_advantages(
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    *,
    coef: float = 0.2,
    norm: str = "batch",
    process_group: dist.ProcessGroup | None = None,
    group_ids: torch.Tensor | None = None,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """AEPO entropy-aware advantage A'_t = A_t (1 + coef * (H_t - mean H) / std H).

    Args:
        advantages: [..., T] per-token advantages (a per-sequence one broadcast over T).
        entropy: [..., T] current-policy entropy; detached here (no gradient through it).
        mask: [..., T], 1 for policy-sampled tokens; the statistics use these only.
        coef, norm, process_group, group_ids: see :func:`entropy_statistics`.
        stats: precomputed (mean, std), e.g. over a whole mini-batch before its micro-batches.
    Returns:
        [..., T] modified advantages (equal to ``advantages`` when coef == 0).
    """
    advantages = per_token(advantages, mask)
    _same_shape(advantages=advantages, entropy=entropy, mask=mask)
    if coef == 0:
        return advantages
    mean, std = (
        to_device(stats, entropy.device)
        if stats is not None
        else entropy_statistics(
            entropy, mask, norm=norm, process_group=process_group, group_ids=group_ids
        )
    )
    z = (entropy.detach().to(torch.float64) - mean) / std
    return (advantages * (1 + coef * z)).to(advantages.dtype)


# ---------------------------------------------------------------------------------------------
# Per-token policy losses (AEPO_SPEC section 2)


def _sg_scaled(value: float, keep: torch.Tensor, beta: float) -> torch.Tensor:
    """A tensor equal to ``value`` whose derivative w.r.t. logp is ``beta * value``.

    ``keep`` = r / sg(r) is exactly 1 in value with d keep / d logp = 1, so
    value * (1 + beta * (keep - 1)) is the stop-gradient bound value * r / sg(r) for beta = 1.
    """
    return value * (1 + beta * (keep - 1))


def per_token_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    objective: str,
    eps_low: float,
    eps_high: float,
    clip_ratio_c: float | None,
    gppo_beta_low: float = 1.0,
    gppo_beta_high: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unaggregated loss l_t of one objective; returns (l [..., T], ratio [..., T]).

    ``advantages`` are already the ones the objective sees (A' for aepo). Gradients per token
    (dl/dlogp): ppo/grpo/dapo -A r inside the band, 0 where clipped; gppo -beta (1 +/- eps) A
    where clipped; aepo -(1 + eps_high) A where A > 0 and r > 1 + eps_high; cispo
    -min(r, 1 + eps_high) A. The dual clip (A < 0: loss capped at -c A) applies to all but cispo.
    """
    ratio = torch.exp(logp - old_logp)
    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    if objective == "cispo":
        return -(ratio.clamp(max=hi).detach() * advantages * logp), ratio
    if objective in ("aepo", "gppo"):
        keep = ratio / ratio.detach()
        upper = _sg_scaled(hi, keep, gppo_beta_high if objective == "gppo" else 1.0)
        lower = _sg_scaled(lo, keep, gppo_beta_low) if objective == "gppo" else lo
        lower = torch.as_tensor(lower, dtype=ratio.dtype, device=ratio.device)
        clipped = torch.where(ratio > hi, upper, torch.where(ratio < lo, lower, ratio))
    else:
        clipped = ratio.clamp(lo, hi)
    loss = torch.maximum(-advantages * ratio, -advantages * clipped)
    if clip_ratio_c is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -clip_ratio_c * advantages), loss)
    return loss, ratio


def aggregate(
    loss: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-token losses [..., T] under ``mask`` to a scalar.

    token-mean: sum(mask l) / sum(mask), or / ``normalizer`` (the token count of the whole
    mini-batch over micro-batches and ranks, so accumulated gradients equal one big batch's).
    seq-mean-token-mean / seq-mean-token-sum: per-sequence token mean / sum, averaged over the
    sequences with at least one token (or divided by ``normalizer`` sequences).
    constant (Dr.GRPO): sum(mask l) / ``normalizer`` (default: mask.numel(), i.e. B * T).
    An all-zero mask gives 0 with zero gradient.
    """
    _choice("aggregation", agg, AGGREGATIONS)
    w = mask.to(loss.dtype)
    loss = torch.where(mask.bool(), loss, 0.0)
    total = loss.sum() if agg in ("token-mean", "constant") else None
    if agg == "token-mean":
        return total / (w.sum().clamp(min=1) if normalizer is None else normalizer)
    if agg == "constant":
        return total / (mask.numel() if normalizer is None else normalizer)
    if loss.dim() < 2:
        raise ValueError(f"agg={agg!r} needs [..., T] per-sequence tokens, got {tuple(loss.shape)}")
    count = w.sum(-1)
    per_seq = loss.sum(-1)
    if agg == "seq-mean-token-mean":
        per_seq = per_seq / count.clamp(min=1)
    n_seq = (count > 0).sum().clamp(min=1) if normalizer is None else normalizer
    return per_seq.sum() / n_seq


def aggregation_weights(
    mask: torch.Tensor,
    agg: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """[..., T] float64 weights w with ``aggregate(l, mask, agg, normalizer) == sum(w * l)``.

    :func:`aggregate` is linear in the per-token losses, so w is its gradient (taken here by
    autograd, so the two can never disagree). Lets a caller that sees the tokens in blocks
    (the fused hidden-state loss) apply the whole batch's aggregation block by block.
    """
    probe = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device, requires_grad=True)
    with torch.enable_grad():
        (weights,) = torch.autograd.grad(aggregate(probe, mask, agg, normalizer), probe)
    return weights


def _masked_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.where(w > 0, x.detach() * w, 0.0).sum() / w.sum().clamp(min=1)


def loss_metrics(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    objective: str,
    eps_low: float,
    eps_high: float,
    clip_ratio_c: float | None,
    entropy: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Detached masked-mean diagnostics (no host sync)."""
    w = mask.to(torch.float32)
    r = ratio.detach()
    pos, neg = advantages > 0, advantages < 0
    high = r > 1 + eps_high if objective == "cispo" else pos & (r > 1 + eps_high)
    log_r = logp.detach() - old_logp
    out = {
        "clip_frac_high": _masked_mean(high.float(), w),
        "clip_frac_low": _masked_mean((neg & (r < 1 - eps_low)).float(), w),
        "ratio_mean": _masked_mean(r, w),
        "approx_kl": _masked_mean(torch.expm1(log_r) - log_r, w),  # k3 of KL(old || new)
    }
    if clip_ratio_c is not None and objective != "cispo":
        out["dual_clip_frac"] = _masked_mean((neg & (r > clip_ratio_c)).float(), w)
    if entropy is not None:
        out["entropy"] = _masked_mean(entropy, w)
    return out


def _check_policy_args(
    objective, agg, eps_low, eps_high, clip_ratio_c, entropy, entropy_coef, ref_logp, kl_coef
) -> None:
    _choice("objective", objective, OBJECTIVES)
    _choice("aggregation", agg, AGGREGATIONS)
    if not 0 <= eps_low < 1 or eps_high < 0:
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    if clip_ratio_c is not None and clip_ratio_c <= 1:
        raise ValueError(f"clip_ratio_c (dual clip) must be > 1 or None, got {clip_ratio_c}")
    if entropy_coef != 0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs the per-token entropy (entropy=...)")
    if kl_coef != 0 and ref_logp is None:
        raise ValueError("kl_coef != 0 needs the reference policy's log-probs (ref_logp=...)")


def per_token_gradients(**policy_loss_kwargs) -> bool:
    """Whether each token's dL/dlogp and dL/dH under ``policy_loss(..., **policy_loss_kwargs)``
    depend on that token alone, up to :func:`aggregation_weights`: false only for AEPO's
    entropy-aware advantage without precomputed ``entropy_stats`` (then every token's
    advantage depends on the statistics of all the tokens' entropies)."""
    kw = _POLICY_LOSS_DEFAULTS | policy_loss_kwargs
    return not (kw["objective"] == "aepo" and kw["entropy_adv_coef"] != 0) or (
        kw["entropy_stats"] is not None
    )


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    objective: str = "aepo",
    entropy: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    clip_ratio_c: float | None = 3.0,
    entropy_adv_coef: float = 0.2,
    entropy_adv_norm: str = "batch",
    entropy_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    agg: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
    gppo_beta_low: float = 1.0,
    gppo_beta_high: float = 1.0,
    entropy_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    process_group: dist.ProcessGroup | None = None,
    group_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy-gradient loss of one objective, aggregated over the masked tokens.

    Args:
        logp: [..., T] log-probs of the sampled tokens under the current policy (with grad).
        old_logp: [..., T] log-probs under the policy that sampled (no grad).
        advantages: [..., T] per-token advantages, or per-sequence ones ([...] or [..., 1]),
            broadcast over T.
        mask: [..., T] 1 for policy-sampled tokens, 0 for prompt / tool-result / padding.
        objective: one of ``OBJECTIVES`` (AEPO_SPEC section 2).
        entropy: [..., T] per-token entropy of the current policy. For "aepo" with
            ``entropy_adv_coef`` > 0 it drives the entropy-aware advantage (detached), whatever
            ``entropy_coef`` is; with ``entropy_coef`` != 0 it also gets the bonus
            -entropy_coef * H (gradient through H).
        eps_high: None means the objective's default (0.28 for dapo, else 0.2).
        clip_ratio_c: dual-clip bound for A < 0 (None disables it).
        entropy_adv_norm, entropy_stats, process_group, group_ids: the entropy-aware
            advantage's normalisation set (:func:`entropy_statistics`).
        ref_logp, kl_coef: optional k3 KL penalty to a reference policy.
        agg, normalizer: aggregation (:func:`aggregate`).
        gppo_beta_low, gppo_beta_high: gradient scales of GPPO's clipped branches.
    Every tensor argument may be on the host when ``logp`` is on a GPU (:func:`to_device`).
    Returns:
        (loss scalar, metrics dict of detached scalars), on ``logp``'s device.
    """
    eps_high = DEFAULT_EPS_HIGH.get(objective, 0.2) if eps_high is None else eps_high
    _check_policy_args(
        objective, agg, eps_low, eps_high, clip_ratio_c, entropy, entropy_coef, ref_logp, kl_coef
    )
    advantages = per_token(advantages, mask)
    _same_shape(
        logp=logp,
        old_logp=old_logp,
        advantages=advantages,
        mask=mask,
        entropy=entropy,
        ref_logp=ref_logp,
    )
    # host inputs where the log-probs are; statistics and group ids are moved where they are
    # used (entropy_aware_advantages, _group_entropy_statistics)
    on = lambda x: to_device(x, logp.device)
    old_logp, advantages, mask, ref_logp = on(old_logp), on(advantages), on(mask), on(ref_logp)
    normalizer = on(normalizer)
    # Masked positions may hold anything (padding with -inf old log-probs): neutralise them so
    # that every intermediate stays finite and their gradient is exactly 0.
    keep = mask.bool()
    old_logp = torch.where(keep, old_logp, logp.detach())
    adv = torch.where(keep, advantages.to(logp.dtype), 0.0)
    ref_logp = None if ref_logp is None else torch.where(keep, ref_logp, logp.detach())
    entropy = None if entropy is None else torch.where(keep, entropy, 0.0)
    if objective == "aepo" and entropy_adv_coef != 0 and entropy is not None:
        adv = entropy_aware_advantages(
            adv,
            entropy,
            mask,
            coef=entropy_adv_coef,
            norm=entropy_adv_norm,
            process_group=process_group,
            group_ids=group_ids,
            stats=entropy_stats,
        )
    dual = None if objective == "cispo" else clip_ratio_c
    clip = {"objective": objective, "eps_low": eps_low, "eps_high": eps_high, "clip_ratio_c": dual}
    loss_t, ratio = per_token_policy_loss(
        logp, old_logp, adv, **clip, gppo_beta_low=gppo_beta_low, gppo_beta_high=gppo_beta_high
    )
    if entropy_coef != 0:
        loss_t = loss_t - entropy_coef * entropy
    metrics = loss_metrics(ratio, adv, logp, old_logp, mask, **clip, entropy=entropy)
    if kl_coef != 0:
        delta = ref_logp - logp
        kl = torch.expm1(delta) - delta  # k3: exp(ref - logp) - (ref - logp) - 1
        loss_t = loss_t + kl_coef * kl
        metrics["kl_ref"] = _masked_mean(kl, mask.to(torch.float32))
    return aggregate(loss_t, mask, agg, normalizer), metrics


_POLICY_LOSS_DEFAULTS = {
    k: p.default
    for k, p in inspect.signature(policy_loss).parameters.items()
    if p.default is not inspect.Parameter.empty
}
