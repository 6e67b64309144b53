"""``AEPOLoss``: the fused policy loss as an ``nn.Module`` with a frozen config, for trainers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from aepo.kernels import BACKENDS, fused_policy_loss
from aepo.objectives import AGGREGATIONS, ENTROPY_NORMS, OBJECTIVES

LM_HEAD_MODES = ("auto", "fused", "logits")


@dataclass(frozen=True)
class PolicyLossConfig:
    objective: str = "aepo"  # one of aepo, grpo, ppo, dapo, gppo, cispo
    eps_low: float = 0.2  # lower clip: ratio below 1 - eps_low is clipped (A < 0)
    eps_high: float | None = None  # upper clip; None = objective default (dapo 0.28, else 0.2)
    clip_ratio_c: float | None = 3.0  # dual clip for A < 0 (None disables)
    entropy_adv_coef: float = 0.2  # AEPO entropy-aware advantage weight a (0 disables)
    entropy_adv_norm: str = "batch"  # normalisation set of H: batch, micro or group
    entropy_coef: float = 0.0  # entropy bonus beta_H (loss -= beta_H * H)
    kl_coef: float = 0.0  # k3 KL penalty to a reference policy (needs ref_logp)
    agg: str = "token-mean"  # token-mean, seq-mean-token-mean, seq-mean-token-sum, constant
    gppo_beta_low: float = 1.0  # GPPO gradient scale of the lower clipped branch
    gppo_beta_high: float = 1.0  # GPPO gradient scale of the upper clipped branch
    temperature: float = 1.0  # sampling temperature the logits are divided by
    backend: str = "auto"  # kernel backend: auto, triton or torch
    inplace_grad: bool = False  # write dL/dlogits into the logits' storage
    lm_head: str = "auto"  # trainer: fused (from hidden states), logits, or auto (fused if able)

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("objective", self.objective, OBJECTIVES),
            ("entropy_adv_norm", self.entropy_adv_norm, ENTROPY_NORMS),
            ("agg", self.agg, AGGREGATIONS),
            ("backend", self.backend, BACKENDS),
            ("lm_head", self.lm_head, LM_HEAD_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of: {', '.join(allowed)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def policy_loss_kwargs(self) -> dict:
        """The fields :func:`aepo.objectives.policy_loss` takes."""
        skip = {"temperature", "backend", "inplace_grad", "lm_head"}
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }


class AEPOLoss(nn.Module):
    """Policy loss of ``config.objective`` from logits through the fused kernels.

    forward(logits [..., T, V], labels [..., T], old_logp [..., T], advantages [..., T],
    mask [..., T], **extra) -> (loss, metrics); ``extra`` passes per-call arguments such as
    ``ref_logp``, ``normalizer``, ``entropy_stats``, ``process_group``, ``group_ids``.
    """

    def __init__(self, config: PolicyLossConfig | None = None, **overrides) -> None:
        super().__init__()
        base = config or PolicyLossConfig()
        self.config = dataclasses.replace(base, **overrides) if overrides else base

    def forward(self, logits, labels, old_logp, advantages, mask, **extra):
        c = self.config
        return fused_policy_loss(
            logits,
            labels,
            old_logp,
            advantages,
            mask,
            temperature=c.temperature,
            backend=c.backend,
            inplace_grad=c.inplace_grad,
            **c.policy_loss_kwargs(),
            **extra,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.config).items())
