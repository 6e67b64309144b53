"""AEPO's policy losses in verl's policy-loss registry (written against verl 0.9.1).

``import aepo.integrations.verl`` registers three losses in
``verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY`` and wraps verl's actor loss
``verl.workers.utils.losses.ppo_loss`` so that the current policy's per-token entropy, which verl
computes but does not pass to a policy loss, reaches AEPO's entropy-aware advantage. The math is
:func:`aepo.objectives.policy_loss` (AEPO_SPEC sections 1-2); nothing is re-implemented here.

Registered names (verl already has "vanilla" = ppo / grpo, dapo = "vanilla" with
``clip_ratio_high=0.28``, and its own "cispo", which clips the ratio on both sides):

- ``"aepo"``: stop-gradient upper clip bound + entropy-aware advantage A' = A (1 + a zH).
- ``"aepo_gppo"``: GPPO, gradients kept on both clipped branches (scaled by beta_low/high).
- ``"aepo_cispo"``: CISPO as in its paper, -sg(min(r, 1 + eps_high)) A logp (upper bound only).

Enable it (verl's hydra command line)::

    actor_rollout_ref.model.external_lib=aepo.integrations.verl
    actor_rollout_ref.actor.policy_loss.loss_mode=aepo
    actor_rollout_ref.actor.calculate_entropy=True
    actor_rollout_ref.actor.entropy_coeff=0
    actor_rollout_ref.actor.clip_ratio_low=0.2
    actor_rollout_ref.actor.clip_ratio_high=0.2
    actor_rollout_ref.actor.clip_ratio_c=3.0
    actor_rollout_ref.actor.loss_agg_mode=token-mean

AEPO's own options: verl's ``PolicyLossConfig`` is a closed dataclass, but its ``_target_`` key
chooses the class hydra instantiates, so select the subclass :class:`AEPOPolicyLossConfig` and
add its keys with hydra's ``+``::

    actor_rollout_ref.actor.policy_loss._target_=aepo.integrations.verl.AEPOPolicyLossConfig
    +actor_rollout_ref.actor.policy_loss.entropy_adv_coef=0.2
    +actor_rollout_ref.actor.policy_loss.entropy_adv_norm=batch

Without the subclass, :func:`configure` sets them for the process (for example from a module of
your own listed after this one in ``external_lib``); the subclass's fields win over it.

How verl loads it: ``HFModelConfig.__post_init__`` (verl/workers/config/model.py) calls
``importlib.import_module`` on each ``model.external_lib`` entry, in every worker, while
``ActorRolloutRefWorker.init_model`` (verl/workers/engine_workers.py) builds its configs and
before it binds ``partial(ppo_loss, config=actor_config)``; hydra imports this module too when it
instantiates the ``_target_`` above, and ``VERL_USE_EXTERNAL_MODULES=aepo.integrations.verl``
imports it at ``import verl``. On import, every loaded ``verl.*`` module's ``ppo_loss`` that is
verl's original (losses, engine_workers, distillation.losses) is rebound to :func:`ppo_loss`.

Option mapping (verl -> :func:`aepo.objectives.policy_loss`):

- ``clip_ratio_low`` / ``clip_ratio_high`` (None: ``clip_ratio``) -> ``eps_low`` / ``eps_high``;
  ``clip_ratio_c`` -> ``clip_ratio_c`` (dual clip, as verl always applies it).
- ``loss_agg_mode`` with ``config.global_batch_info`` (dp_size D, batch_num_tokens N,
  global_batch_size S, loss_scale_factor F, all set by ``ppo_loss`` per micro-batch):
  token-mean -> token-mean / (N / D); seq-mean-token-mean and seq-mean-token-sum -> the same
  mode / (S / D); seq-mean-token-sum-norm -> constant / (S / D * (F or T)); token-sum ->
  constant / (1 / D). Missing N or S (a direct call) means this micro-batch's own count, as in
  verl's ``agg_loss``. Summed over micro-batches and averaged over ranks, this is one big batch.
- ``rollout_is_weights`` w -> advantages * w (every objective is positively homogeneous in A,
  so l(wA) = w l(A) for w >= 0).
- ``entropy_coeff`` and ``use_kl_loss``: verl's ``ppo_loss`` adds them after the policy loss, so
  ``entropy_coef`` and ``kl_coef`` here are 0.
- ``policy_loss.entropy_adv_coef`` (default 0.2), ``entropy_adv_norm`` ("batch" or "micro"),
  ``gppo_beta_low`` / ``gppo_beta_high`` (default 1) -> the arguments of the same names.

Entropy: verl's engines put the current policy's entropy (of the temperature-scaled logits) in
``model_output["entropy"]`` when ``calculate_entropy`` is on or ``entropy_coeff != 0``. The
wrapper :func:`ppo_loss` pads it like the log-probs and hands it over, detached, through a
ContextVar (:func:`provide_entropy`, usable by any other caller). When no entropy reaches
``"aepo"`` (entropy off, or a caller other than ``ppo_loss``) the loss is the stop-gradient clip
without the reweighting, with a warning once and ``actor/aepo/entropy_adv = 0`` in the metrics.

Not supported: ``entropy_adv_norm="group"`` (verl's loss sees no group ids); whole-mini-batch
statistics: "batch" is this micro-batch's tokens all-reduced over verl's data-parallel group
(the spec's "batch" when a mini-batch is one micro-batch per rank), "micro" this rank's only;
verl's clamp of the log-ratio to [-20, 20] (the ratio here is exact); the legacy ``dp_actor``
(absent from verl 0.9.1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
from verl.trainer.ppo import core_algos
from verl.workers.config import PolicyLossConfig
from verl.workers.utils import losses as verl_losses
from verl.workers.utils.padding import no_padding_2_padding

from aepo.loss import PolicyLossConfig as _AEPO  # its defaults are AEPOPolicyLossConfig's
from aepo.objectives import policy_loss

ENTROPY_NORMS = ("batch", "micro")


@dataclasses.dataclass
class AEPOPolicyLossConfig(PolicyLossConfig):
    """verl's PolicyLossConfig plus AEPO's options (``policy_loss._target_`` selects it)."""

    entropy_adv_coef: float = _AEPO.entropy_adv_coef  # a in A' = A (1 + a zH); 0: off
    entropy_adv_norm: str = _AEPO.entropy_adv_norm  # zH over the micro-batch's DP ranks, "micro"
    gppo_beta_low: float = _AEPO.gppo_beta_low  # aepo_gppo: scale of the lower clipped branch
    gppo_beta_high: float = _AEPO.gppo_beta_high  # aepo_gppo: scale of the upper clipped branch

    def __post_init__(self) -> None:
        _check_options(vars(self))


_VERL_FIELDS = {f.name for f in dataclasses.fields(PolicyLossConfig)}
_OPTION_DEFAULTS = {
    f.name: f.default
    for f in dataclasses.fields(AEPOPolicyLossConfig)
    if f.name not in _VERL_FIELDS
}
_options = dict(_OPTION_DEFAULTS)  # what configure() sets


def _check_options(options: dict[str, Any]) -> None:
    if options.get("entropy_adv_norm", "batch") not in ENTROPY_NORMS:
        raise ValueError(
            f"entropy_adv_norm must be one of {ENTROPY_NORMS} under verl (its policy loss sees "
            f"no group ids), got {options['entropy_adv_norm']!r}"
        )


def configure(**options: Any) -> dict[str, Any]:
    """Set AEPO's options for this process when ``policy_loss`` is verl's plain config.

    Keys: entropy_adv_coef, entropy_adv_norm, gppo_beta_low, gppo_beta_high. Fields of an
    :class:`AEPOPolicyLossConfig` take precedence. Returns the options now in force.
    """
    unknown = set(options) - set(_OPTION_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; valid: {sorted(_OPTION_DEFAULTS)}")
    _check_options(options)
    _options.update(options)
    return dict(_options)


def _resolve_options(config: Any) -> dict[str, Any]:
    loss_config = config.get("policy_loss", None) or {}
    out = {}
    for key, fallback in _options.items():
        value = loss_config.get(key, None)
        out[key] = fallback if value is None else value
    _check_options(out)
    return out


# ---------------------------------------------------------------------------------------------
# Entropy hand-over


@dataclasses.dataclass(frozen=True)
class _Handover:
    entropy: torch.Tensor | None  # [B, T] detached, padded like the log-probs
    process_group: Any  # verl's data-parallel group (None: no all-reduce)


_HANDOVER: ContextVar[_Handover | None] = ContextVar("aepo_verl_entropy", default=None)


@contextlib.contextmanager
def provide_entropy(entropy: torch.Tensor | None, process_group: Any = None) -> Iterator[None]:
    """Make ``entropy`` [B, T] (the current policy's, padded like ``log_prob``) visible to the
    ``"aepo"`` loss called inside this block; ``process_group`` is the data-parallel group
    that ``entropy_adv_norm="batch"`` all-reduces its statistics over."""
    token = _HANDOVER.set(_Handover(None if entropy is None else entropy.detach(), process_group))
    try:
        yield
    finally:
        _HANDOVER.reset(token)


_verl_ppo_loss = getattr(verl_losses.ppo_loss, "_aepo_wraps", verl_losses.ppo_loss)


def ppo_loss(config: Any, model_output: dict, data: Any, dp_group: Any = None):
    """verl's ``ppo_loss`` with ``model_output["entropy"]`` handed to the policy loss.

    Args and returns as ``verl.workers.utils.losses.ppo_loss``: model_output holds nested
    [B, j] "log_probs" (and "entropy" when verl computed it), data the micro-batch TensorDict.
    """
    entropy = model_output.get("entropy")
    if entropy is not None:
        entropy = no_padding_2_padding(entropy, data)  # [B, T], as ppo_loss pads log_probs
    with provide_entropy(entropy, dp_group):
        return _verl_ppo_loss(config, model_output, data, dp_group)


ppo_loss._aepo_wraps = _verl_ppo_loss


# ---------------------------------------------------------------------------------------------
# The registered losses


def _aggregation(
    loss_agg_mode: str, mask: torch.Tensor, info: dict[str, Any]
) -> tuple[str, float | torch.Tensor | None]:
    """verl's loss_agg_mode and global batch info -> (agg, normalizer) of aepo's ``aggregate``."""
    dp = info.get("dp_size") or 1
    key = "batch_num_tokens" if loss_agg_mode == "token-mean" else "global_batch_size"
    count = info.get(key)
    if count is None and dp > 1 and loss_agg_mode != "token-sum":
        raise ValueError(f"(global) {key} is required when dp_size > 1 (as in verl's agg_loss)")
    per_rank = None if count is None else count / dp
    if loss_agg_mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        return loss_agg_mode, per_rank
    if loss_agg_mode == "token-sum":
        return "constant", 1.0 / dp
    if loss_agg_mode == "seq-mean-token-sum-norm":
        if per_rank is None:
            per_rank = (mask.sum(-1) > 0).sum().clamp(min=1)
        scale = info.get("loss_scale_factor")
        return "constant", per_rank * (mask.shape[-1] if scale is None else scale)
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")


def _clip_settings(config: Any) -> dict[str, float | None]:
    clip = config.clip_ratio
    low, high = config.clip_ratio_low, config.clip_ratio_high
    return {
        "eps_low": clip if low is None else low,
        "eps_high": clip if high is None else high,
        "clip_ratio_c": config.get("clip_ratio_c", 3.0),
    }


@functools.cache
def _warn_no_entropy() -> None:
    warnings.warn(
        "aepo: no per-token entropy reached the policy loss (set "
        "actor_rollout_ref.actor.calculate_entropy=True and keep verl's ppo_loss); running the "
        "stop-gradient clip without the entropy-aware advantage",
        stacklevel=2,
    )


def _handed_entropy(log_prob: torch.Tensor, handover: _Handover | None) -> torch.Tensor | None:
    entropy = None if handover is None else handover.entropy
    if entropy is not None and entropy.shape != log_prob.shape:
        raise ValueError(
            f"handed-over entropy {tuple(entropy.shape)} does not match log_prob "
            f"{tuple(log_prob.shape)}"
        )
    return entropy


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def _verl_metrics(
    metrics: dict[str, torch.Tensor],
    objective: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    mask: torch.Tensor,
    entropy_adv: bool,
) -> dict[str, float]:
    """verl's metric names (actor/pg_clipfrac, actor/ppo_kl, actor/pg_clipfrac_lower) plus
    ours under actor/aepo/, as floats with one host sync."""
    clipfrac = metrics["clip_frac_high"]
    if objective != "cispo":  # cispo has no lower clip
        clipfrac = clipfrac + metrics["clip_frac_low"]
    zero = torch.zeros((), device=log_prob.device)
    named = {
        "actor/pg_clipfrac": clipfrac,
        "actor/ppo_kl": _masked_mean(old_log_prob - log_prob.detach(), mask),
        "actor/pg_clipfrac_lower": metrics.get("dual_clip_frac", zero),
        **{f"actor/aepo/{k}": v for k, v in metrics.items()},
        "actor/aepo/entropy_adv": torch.tensor(float(entropy_adv), device=log_prob.device),
    }
    values = torch.stack([v.detach().to(torch.float64) for v in named.values()]).tolist()
    return dict(zip(named, values, strict=True))


def _compute(
    objective: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    config: Any,
    rollout_is_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    if config is None:
        raise ValueError("aepo's verl losses need the actor config (verl passes config=...)")
    options = _resolve_options(config)
    mask = response_mask.bool()
    agg, normalizer = _aggregation(loss_agg_mode, mask, config.get("global_batch_info") or {})
    handover = _HANDOVER.get()
    entropy = _handed_entropy(log_prob, handover)
    reweight = objective == "aepo" and options["entropy_adv_coef"] != 0
    if reweight and entropy is None:
        _warn_no_entropy()  # once per process
        reweight = False
    if rollout_is_weights is not None:
        advantages = advantages * rollout_is_weights
    norm = options["entropy_adv_norm"]
    loss, metrics = policy_loss(
        log_prob,
        old_log_prob,
        advantages,
        mask,
        objective=objective,
        entropy=entropy,
        **_clip_settings(config),
        entropy_adv_coef=options["entropy_adv_coef"],
        entropy_adv_norm=norm,
        agg=agg,
        normalizer=normalizer,
        gppo_beta_low=options["gppo_beta_low"],
        gppo_beta_high=options["gppo_beta_high"],
        process_group=handover.process_group if handover is not None and norm == "batch" else None,
    )
    return loss, _verl_metrics(metrics, objective, old_log_prob, log_prob, mask, reweight)


def _make_loss_fn(name: str, objective: str):
    def loss_fn(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return _compute(
            objective,
            old_log_prob,
            log_prob,
            advantages,
            response_mask,
            loss_agg_mode,
            config,
            rollout_is_weights,
        )

    loss_fn.__name__ = loss_fn.__qualname__ = f"compute_policy_loss_{name}"
    loss_fn.__doc__ = (
        f"verl policy loss {name!r}: aepo.objectives.policy_loss(objective={objective!r}).\n\n"
        "Args (verl's policy-loss signature): old_log_prob, log_prob, advantages,\n"
        "response_mask: [B, T]; loss_agg_mode: verl's; config: verl's ActorConfig;\n"
        "rollout_is_weights: [B, T] or None.\n"
        "Returns: (scalar loss, metrics dict of floats)."
    )
    return loss_fn


compute_policy_loss_aepo = _make_loss_fn("aepo", "aepo")
compute_policy_loss_aepo_gppo = _make_loss_fn("aepo_gppo", "gppo")
compute_policy_loss_aepo_cispo = _make_loss_fn("aepo_cispo", "cispo")
LOSSES = {  # verl loss_mode -> function
    "aepo": compute_policy_loss_aepo,
    "aepo_gppo": compute_policy_loss_aepo_gppo,
    "aepo_cispo": compute_policy_loss_aepo_cispo,
}


def _install() -> None:
    for name, fn in LOSSES.items():
        existing = core_algos.POLICY_LOSS_REGISTRY.get(name)
        if existing is not None and existing.__module__ != __name__:
            raise RuntimeError(f"verl already registers a policy loss {name!r} ({existing})")
        core_algos.register_policy_loss(name)(fn)
    for mod_name, module in list(sys.modules.items()):
        if mod_name.startswith("verl.") and getattr(module, "ppo_loss", None) is _verl_ppo_loss:
            module.ppo_loss = ppo_loss


_install()
