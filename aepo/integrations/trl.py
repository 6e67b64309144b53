"""AEPO's policy loss inside TRL's ``GRPOTrainer`` (TRL 1.16): ``AEPOConfig``, ``AEPOTrainer``.

TRL keeps everything but the loss: generation, rewards, group advantages, the old and reference
log-probs (its own fused head), batching, accumulation, logging. ``AEPOTrainer`` overrides one
method, ``_compute_loss(model, inputs)``, and reads the same ``inputs`` dict TRL builds in
``_generate_and_score_completions``. It gets the current policy's per-token log-probs and
entropies [B, K] (K = completion length) from aepo's kernels, then the loss from
:func:`aepo.objectives.policy_loss`:

- ``lm_head="fused"`` (``"auto"`` picks it when :func:`aepo.lm_head.fused_head_blocker`
  allows: plain bias-free ``nn.Linear`` head, no logit soft-capping or scaling, not FSDP): the
  model's forward is redirected to backbone -> last hidden states [B, K, H], and the lm_head's
  forward to :func:`aepo.kernels.linear_logprobs_and_entropy` (hidden x weight [V, H], the
  logits never materialised). Both run as the modules' forwards, so DDP / DeepSpeed hooks fire
  around them; under ZeRO-3 the weight is gathered there (TRL's ``maybe_gather_lm_head_ctx`` is
  entered too, a no-op once it is whole) and again for the backward, and its gradient is
  reduced like any module's. The head runs outside autocast in the weight's dtype.
- ``lm_head="logits"``: the model's own forward with ``logits_to_keep`` gives [B, K, V] logits,
  then :func:`aepo.kernels.logprobs_and_entropy` (one fused pass forward and backward).

Kernel + ``policy_loss`` is what :func:`aepo.kernels.fused_linear_policy_loss` and
:func:`aepo.kernels.fused_policy_loss` compute (the same values and gradients; the former runs
exactly this on CUDA). The per-token [B, K] tensors are kept because TRL's per-sequence clip
metrics, its entropy bonus (with its own normaliser) and its importance-sampling / off-policy
weights need them. The old and reference log-probs stay TRL's (its chunked fused head).

Option mapping (TRL field -> aepo; G = gradient-accumulation steps of the window, 1 in eval,
B = micro-batch rows, mask = completion_mask x tool_mask):

================================  ==============================================================
``objective`` (new)               ``policy_loss(objective=)``: aepo, grpo, dapo, gppo, cispo, ppo
``epsilon``                       ``eps_low``
``epsilon_high``                  ``eps_high``; None: 0.28 for objective dapo, else ``epsilon``.
                                  objective cispo: TRL's absolute cap eps_max (e.g. 5.0),
                                  ``eps_high = epsilon_high - 1``; required
``clip_ratio_c`` (new, 3.0)       dual clip for A < 0 (None: off). TRL's ``delta`` is the same
                                  bound (for delta > 1 + eps_high): allowed only equal to it
``entropy_adv_coef`` (new, 0.2)   a of AEPO's entropy-aware advantage A (1 + a zH), aepo
``entropy_adv_norm`` (new)        "batch": zH over the masked tokens of the optimizer step's G
                                  micro-batches on all ranks (an extra no-grad forward at the
                                  window's start when G > 1); "micro": this micro-batch
``gppo_beta_low/high`` (new)      GPPO gradient scales of the clipped branches
``temperature``                   logits / T
``beta``                          ``kl_coef``, ``ref_logp = ref_per_token_logps`` (k3)
``loss_type="grpo"``              agg seq-mean-token-mean, normalizer B G
``loss_type="bnpo"``              token-mean, normalizer sum(mask) G
``loss_type="dr_grpo"``           constant, normalizer B max_completion_length G
``loss_type="dapo"/"cispo"``      token-mean, normalizer num_items_in_batch / processes x
                                  G / steps_per_generation ("cispo" needs objective cispo)
``loss_type="luspo"``             seq-mean-token-sum, normalizer B G
``entropy_coef``                  TRL's bonus: loss -= coef x token-mean(H over mask) / G
``importance_sampling_ratio``,    per-token (or per-sequence) weights w >= 0 on the policy
``off_policy_mask_threshold``     term, folded into the advantages: every objective is
                                  positively homogeneous in A, so l(w A) = w l(A) exactly
``lm_head`` (new, "auto")         "fused", "logits", or "auto" (fused when the head allows)
``kernel_backend`` (new, "auto")  aepo kernels' backend: auto (triton on CUDA), triton, torch
================================  ==============================================================

Metrics: TRL's names keep their meaning (``entropy``, ``kl``, ``clip_ratio/low_mean``,
``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``clip_ratio/low_min``,
``clip_ratio/high_max``, ``cispo_clip_ratio``, ``policy_loss`` / ``entropy_coef`` with the
bonus; the clip ones use the raw advantages, as TRL); aepo's are token means over all ranks
under ``aepo/`` (``clip_frac_high``, ``clip_frac_low``, ``ratio_mean``, ``approx_kl``,
``dual_clip_frac``), on the advantages the objective sees (A' for aepo).

Not supported (ValueError naming the option, from the config or the trainer's init):
``loss_type`` sapo / vespo, ``importance_sampling_level="sequence"``,
``top_entropy_quantile < 1``, ``use_adaptive_entropy``, ``beta != 0`` with
``use_bias_correction_kl=True``, ``entropy_adv_norm="group"`` (TRL shuffles groups across
micro-batches), ``entropy_adv_norm="batch"`` with G > 1 when ``steps_per_generation`` is not a
multiple of G, MoE router aux losses, multimodal inputs (at the first loss), and
``lm_head="fused"`` for a head the fused path cannot replace (or under FSDP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from accelerate.utils import is_peft_model
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import maybe_gather_lm_head_ctx, nanmax, nanmin

from aepo.kernels import BACKENDS, linear_logprobs_and_entropy, logprobs_and_entropy
from aepo.lm_head import fused_head_blocker, redirect
from aepo.loss import LM_HEAD_MODES
from aepo.loss import PolicyLossConfig as _AEPO  # its defaults are AEPOConfig's
from aepo.objectives import DEFAULT_EPS_HIGH, OBJECTIVES, entropy_statistics, policy_loss

__all__ = ["AEPOConfig", "AEPOTrainer"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "luspo")
ENTROPY_ADV_NORMS = ("batch", "micro")
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes")


@dataclass
class AEPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the aepo loss options (module docstring: the mapping table)."""

    objective: str = _AEPO.objective  # aepo, grpo, dapo, gppo, cispo or ppo
    clip_ratio_c: float | None = _AEPO.clip_ratio_c  # dual clip for A < 0 (None: off); TRL's delta
    entropy_adv_coef: float = _AEPO.entropy_adv_coef  # AEPO entropy-aware advantage weight a
    entropy_adv_norm: str = _AEPO.entropy_adv_norm  # zH statistics: batch (all ranks) or micro
    gppo_beta_low: float = _AEPO.gppo_beta_low  # GPPO gradient scale of the lower clipped branch
    gppo_beta_high: float = _AEPO.gppo_beta_high  # GPPO gradient scale, upper clipped branch
    lm_head: str = _AEPO.lm_head  # fused (hidden states x lm_head), logits, or auto
    kernel_backend: str = _AEPO.backend  # aepo kernels: auto, triton or torch

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, allowed in (
            ("objective", OBJECTIVES),
            ("lm_head", LM_HEAD_MODES),
            ("kernel_backend", BACKENDS),
            ("entropy_adv_norm", ENTROPY_ADV_NORMS),
            ("loss_type", LOSS_TYPES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"AEPOConfig: {name}={getattr(self, name)!r} is not supported; valid: "
                    f"{', '.join(allowed)}"
                )
        problem = _unsupported(self)
        if problem:
            raise ValueError(f"AEPOConfig: {problem}")

    def policy_loss_kwargs(self) -> dict:
        """The :func:`aepo.objectives.policy_loss` options these fields resolve to."""
        if self.objective == "cispo":
            eps_high = self.epsilon_high - 1.0  # TRL's cap eps_max is absolute; ours is 1 + eps
        elif self.epsilon_high is None:
            eps_high = DEFAULT_EPS_HIGH.get(self.objective, self.epsilon)
        else:
            eps_high = self.epsilon_high
        return {
            "objective": self.objective,
            "eps_low": self.epsilon,
            "eps_high": eps_high,
            "clip_ratio_c": self.clip_ratio_c,
            "entropy_adv_coef": self.entropy_adv_coef,
            "entropy_adv_norm": self.entropy_adv_norm,
            "gppo_beta_low": self.gppo_beta_low,
            "gppo_beta_high": self.gppo_beta_high,
        }


def _unsupported(cfg: AEPOConfig) -> str | None:
    """The first option ``cfg`` sets that AEPOTrainer cannot honour, as a message, or None."""
    accumulation = cfg.gradient_accumulation_steps
    checks = (
        (
            cfg.importance_sampling_level != "token",
            f"importance_sampling_level={cfg.importance_sampling_level!r}: aepo's objectives "
            "use token-level ratios only",
        ),
        (
            cfg.top_entropy_quantile < 1.0,
            f"top_entropy_quantile={cfg.top_entropy_quantile} < 1 (high-entropy token masking) "
            "is not supported",
        ),
        (cfg.use_adaptive_entropy, "use_adaptive_entropy=True is not supported"),
        (
            cfg.beta != 0 and cfg.use_bias_correction_kl,
            f"beta={cfg.beta} with use_bias_correction_kl=True: aepo's KL term is the plain k3; "
            "set use_bias_correction_kl=False",
        ),
        (
            cfg.delta is not None and cfg.delta != cfg.clip_ratio_c,
            f"delta={cfg.delta} is TRL's name for the dual-clip bound clip_ratio_c "
            f"(={cfg.clip_ratio_c}); set clip_ratio_c and leave delta unset",
        ),
        (
            cfg.loss_type == "cispo" and cfg.objective != "cispo",
            f"loss_type='cispo' with objective={cfg.objective!r}: use objective='cispo' (or "
            "loss_type='dapo' for the same token normaliser)",
        ),
        (
            cfg.objective == "cispo" and cfg.epsilon_high is None,
            "objective='cispo' needs epsilon_high, TRL's absolute ratio cap eps_max (e.g. 5.0)",
        ),
        (
            cfg.objective == "aepo"
            and cfg.entropy_adv_coef != 0
            and cfg.entropy_adv_norm == "batch"
            and accumulation > 1
            and cfg.steps_per_generation % accumulation,
            f"entropy_adv_norm='batch' with gradient_accumulation_steps={accumulation} needs "
            f"steps_per_generation (={cfg.steps_per_generation}) to be a multiple of it",
        ),
    )
    return next((message for bad, message in checks if bad), None)


def _loss_mask(inputs: dict) -> torch.Tensor:
    """[B, K] 1 for the completion tokens the policy sampled (tool results masked out)."""
    mask = inputs["completion_mask"]
    return mask * inputs["tool_mask"] if "tool_mask" in inputs else mask


class AEPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with aepo's policy loss (``args`` must be an :class:`AEPOConfig`).

    Same constructor as ``GRPOTrainer``. Only ``_compute_loss`` is overridden.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, AEPOConfig):
            raise TypeError(f"AEPOTrainer needs args=AEPOConfig(...), got {type(self.args)}")
        if self.aux_loss_enabled:
            raise ValueError(
                "AEPOTrainer: the MoE router aux loss (router_aux_loss_coef) is not supported; "
                "set router_aux_loss_coef=0"
            )
        self._aepo_loss = self.args.policy_loss_kwargs()
        self._aepo_window: tuple[int, int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._aepo_fused = self._choose_lm_head(self.args.lm_head)

    def _choose_lm_head(self, mode: str) -> bool:
        """True for the fused hidden-state path; raises if ``mode="fused"`` is impossible."""
        blocker = fused_head_blocker(self._inner_model())
        if blocker is None and self.is_fsdp_enabled:
            blocker = "FSDP shards the lm_head weight"
        if mode == "fused" and blocker:
            raise ValueError(f"AEPOConfig: lm_head='fused' is not possible here: {blocker}")
        return mode == "fused" or (mode == "auto" and blocker is None)

    def _inner_model(self):
        """The ``PreTrainedModel`` itself (inside a PEFT wrapper, if any)."""
        return self.model.get_base_model() if is_peft_model(self.model) else self.model

    # -- the loss ------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs: dict) -> torch.Tensor:
        """The scalar loss of one micro-batch (scaled for accumulation, like TRL's)."""
        if any(key in inputs for key in MULTIMODAL_KEYS):
            raise ValueError("AEPOTrainer: multimodal inputs are not supported")
        mode = "train" if self.model.training else "eval"
        mask = _loss_mask(inputs)  # [B, K]
        logp, entropy = self._policy_logps(model, inputs, mask)  # [B, K] each, with grad
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # [B, 1|K]
        agg, normalizer, accumulation = self._aggregation(inputs, mask, mode)
        loss, metrics = policy_loss(
            logp,
            old,
            (advantages * self._token_weights(inputs, logp, old, mask)).expand_as(logp),
            mask,
            entropy=entropy,
            ref_logp=inputs.get("ref_per_token_logps"),
            kl_coef=self.beta,
            agg=agg,
            normalizer=normalizer,
            entropy_stats=self._entropy_stats(model, entropy, mask, mode),
            **self._aepo_loss,
        )
        if self._entropy_bonus_enabled:
            loss = self._add_entropy_bonus(loss, entropy, mask, mode, accumulation)
        self._log_loss_metrics(mode, logp, old, advantages, mask, entropy, metrics)
        return loss

    def _add_entropy_bonus(self, loss, entropy, mask, mode: str, accumulation: int):
        """TRL's bonus, loss - coef x token-mean(H) / G whatever the loss type (gradient
        through H), and its ``policy_loss`` / ``entropy_coef`` metrics."""
        # TRL logs the policy term before its 1 / G, except for the window-level dapo / cispo
        scale = 1 if self.loss_type in ("dapo", "cispo") else accumulation
        policy_value = loss.detach() * scale
        self._metrics[mode]["policy_loss"].append(
            self.accelerator.gather(policy_value).nanmean().item()
        )
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        w = mask.to(entropy.dtype)
        return loss - self.entropy_coef * (entropy * w).sum() / w.sum().clamp(min=1) / accumulation

    def _policy_logps(self, model, inputs: dict, mask: torch.Tensor):
        """Current-policy (logp, entropy) [B, K] of the completion tokens where ``mask`` is 1
        (0 elsewhere), differentiable, from hidden states x lm_head or from logits."""
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)  # [B, P + K]
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        labels = completion_ids.masked_fill(mask == 0, -100)  # [B, K]
        kernel = {"temperature": self.temperature, "backend": self.args.kernel_backend}
        if self._aepo_fused:
            return self._fused_head_logps(model, input_ids, attention_mask, labels, kernel)
        keep = completion_ids.size(1) + 1
        with self.accelerator.autocast():
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                logits_to_keep=keep,
                use_cache=False,
            )
        return logprobs_and_entropy(out.logits[:, :-1], labels, **kernel)  # logits [B, K, V]

    def _fused_head_logps(self, model, input_ids, attention_mask, labels, kernel):
        """(logp, entropy) [B, K] from the backbone's last hidden states and the lm_head weight.

        ``model`` (possibly DDP / DeepSpeed / PEFT-wrapped) is called as usual; the inner
        model's forward becomes backbone -> head(hidden [B, K, H]) and the head's forward the
        linear kernel, so the wrappers' hooks (ZeRO-3 gathers and gradient reduction) run.
        """
        inner = self._inner_model()
        backbone = getattr(inner, inner.base_model_prefix)
        head = inner.get_output_embeddings()
        k = labels.size(1)

        def forward(*args, **kw):
            kw = {n: v for n, v in kw.items() if v is not None and n != "labels"}
            hidden = backbone(*args, **(kw | {"use_cache": False})).last_hidden_state
            return head(hidden[:, -k - 1 : -1])  # position t predicts token t + 1

        def head_forward(hidden):
            weight, device = head.weight, hidden.device.type
            # Under AMP (fp32 master weights, bf16 autocast) the head runs in the autocast
            # dtype, as the logits path's matmul does: tensor cores, not fp32 GEMMs. The cast
            # is differentiable, so the fp32 weight gets its gradient.
            amp = torch.is_autocast_enabled(device)
            dtype = torch.get_autocast_dtype(device) if amp else weight.dtype
            with maybe_gather_lm_head_ctx(weight), torch.autocast(device, enabled=False):
                x, w = hidden.to(dtype), weight.to(dtype)
                return linear_logprobs_and_entropy(x, w, labels.to(x.device), **kernel)

        with (
            redirect(inner, forward),
            redirect(head, head_forward),
            self.accelerator.autocast(),
        ):
            return model(input_ids=input_ids, attention_mask=attention_mask)

    def _aggregation(self, inputs: dict, mask: torch.Tensor, mode: str):
        """(agg, normalizer, G) of ``policy_loss`` that reproduce TRL's ``loss_type``."""
        acc = self.current_gradient_accumulation_steps if mode == "train" else 1
        rows = mask.size(0)
        if self.loss_type == "grpo":
            return "seq-mean-token-mean", rows * acc, acc
        if self.loss_type == "luspo":
            return "seq-mean-token-sum", rows * acc, acc
        if self.loss_type == "bnpo":
            return "token-mean", mask.sum().clamp(min=1.0) * acc, acc
        if self.loss_type == "dr_grpo":
            return "constant", rows * self.max_completion_length * acc, acc
        # dapo / cispo: the token count of the generation batch, rescaled to one window
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * acc / self.args.steps_per_generation
        return "token-mean", normalizer, acc

    def _token_weights(self, inputs, logp, old, mask) -> torch.Tensor | float:
        """TRL's non-negative weights on the policy term: the vLLM importance-sampling ratio
        ([B, K] or [B, 1]) and the off-policy sequence mask ([B, 1]); 1.0 when neither."""
        weights = 1.0
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights = inputs["importance_sampling_ratio"]
        if self.off_policy_mask_threshold is not None:
            advantages = inputs["advantages"]
            keep = self.get_off_policy_mask(
                advantages=advantages.unsqueeze(1) if advantages.dim() == 1 else advantages,
                per_token_logps=logp,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old),
                mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold,
            )
            weights = weights * keep
        return weights

    # -- AEPO's entropy statistics -------------------------------------------------------------

    def _entropy_stats(self, model, entropy, mask, mode: str):
        """(mean, std) of the current policy's entropy for the entropy-aware advantage over
        ``entropy_adv_norm="batch"``'s set, or None (not needed, or "micro": the loss does it)."""
        kw = self._aepo_loss
        if kw["objective"] != "aepo" or kw["entropy_adv_coef"] == 0:
            return None
        if kw["entropy_adv_norm"] == "micro":
            return None
        group = dist.group.WORLD if self.accelerator.num_processes > 1 else None
        acc = self.current_gradient_accumulation_steps if mode == "train" else 1
        if acc == 1:
            return entropy_statistics(entropy, mask, norm="batch", process_group=group)
        start, count, stats = self._aepo_window or (-1, 0, None)
        if not start <= self._step < start + count:
            stats = self._window_entropy_stats(model, acc, group)
            self._aepo_window = (self._step, acc, stats)
        return stats

    @torch.no_grad()
    def _window_entropy_stats(self, model, count: int, group):
        """Entropy statistics over the ``count`` buffered micro-batches of the accumulation
        window starting at this step (this one included), all ranks; one no-grad forward each.
        The policy does not change within a window, so these are the entropies every
        micro-batch's loss sees."""
        first = self._step % self.args.steps_per_generation
        if first + count > self.args.steps_per_generation:
            raise RuntimeError(
                "AEPOTrainer: the accumulation window runs past the generation buffer; "
                "entropy_adv_norm='batch' needs steps_per_generation to be a multiple of "
                "gradient_accumulation_steps"
            )
        values = []
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            for batch in self._buffered_inputs[first : first + count]:
                mask = _loss_mask(batch)
                values.append(self._policy_logps(model, batch, mask)[1][mask.bool()])
        h = torch.cat(values)  # [N] entropies of the window's masked tokens
        return entropy_statistics(h, torch.ones_like(h), norm="batch", process_group=group)

    # -- logging -------------------------------------------------------------------------------

    def _log_loss_metrics(self, mode, logp, old, advantages, mask, entropy, metrics) -> None:
        """TRL's metrics (same names and meaning) and aepo's under ``aepo/``: token means over
        all ranks (one reduce), plus TRL's per-sequence clip extremes."""
        kw = self._aepo_loss
        w = mask.to(torch.float32)  # [B, K]
        ratio = torch.exp(logp.detach() - old)
        sums = {"entropy": (entropy.detach() * w).sum()}
        if self.beta != 0:
            sums["kl"] = metrics["kl_ref"] * w.sum()
        if kw["objective"] == "cispo":
            flags = {"cispo_clip_ratio": (ratio > 1 + kw["eps_high"]) & (advantages > 0)}
        else:
            flags = {
                "clip_ratio/low_mean": (ratio < 1 - kw["eps_low"]) & (advantages < 0),
                "clip_ratio/high_mean": (ratio > 1 + kw["eps_high"]) & (advantages > 0),
            }
        sums |= {name: (flag * w).sum() for name, flag in flags.items()}
        skip = ("entropy", "kl_ref")
        sums |= {f"aepo/{k}": v * w.sum() for k, v in metrics.items() if k not in skip}
        local = torch.stack([*(v.float() for v in sums.values()), w.sum()])
        *totals, count = self.accelerator.reduce(local, reduction="sum").tolist()
        means = {name: total / max(count, 1.0) for name, total in zip(sums, totals, strict=True)}
        if "clip_ratio/low_mean" in means:
            means["clip_ratio/region_mean"] = (
                means["clip_ratio/low_mean"] + means["clip_ratio/high_mean"]
            )
            per_seq = lambda f: self.accelerator.gather((f * w).sum(-1) / w.sum(-1))
            means["clip_ratio/low_min"] = nanmin(per_seq(flags["clip_ratio/low_mean"])).item()
            means["clip_ratio/high_max"] = nanmax(per_seq(flags["clip_ratio/high_mean"])).item()
        for name, value in means.items():
            self._metrics[mode][name].append(value)
