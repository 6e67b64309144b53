"""verl-side checks of :mod:`aepo.integrations.verl`, run in their own process with verl 0.9.1.

verl's pins clash with this project's environment, so it lives in its own directory that only
this process puts on its path (tests/integrations/test_verl.py runs it)::

    PYTHONPATH=.venv/verl-site .venv/bin/python tests/integrations/verl_worker.py [OUT.json]

Each check raises on failure. The results (ok, error, figures) are printed and written as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings
from functools import cache, partial

import torch
import verl.workers.engine_workers as engine_workers  # loaded first, as in a verl worker
from hydra import compose, initialize_config_dir
from tensordict import TensorDict
from verl.trainer.ppo import core_algos
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.import_utils import import_external_libs
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

from aepo.objectives import policy_loss

import_external_libs(["aepo.integrations.verl"])  # what HFModelConfig does with external_lib
import aepo.integrations.verl as aepo_verl  # noqa: E402

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
MODES = (*MODES, "token-sum")
EPS32 = torch.finfo(torch.float32).eps
BASE_OVERRIDES = (
    "actor_rollout_ref.actor.strategy=fsdp",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.actor.policy_loss.loss_mode=aepo",
    "actor_rollout_ref.actor.calculate_entropy=True",
    "actor_rollout_ref.actor.entropy_coeff=0",
    "actor_rollout_ref.actor.clip_ratio_low=0.2",
    "actor_rollout_ref.actor.clip_ratio_high=0.28",
    "actor_rollout_ref.actor.clip_ratio_c=3.0",
)
TARGET = "actor_rollout_ref.actor.policy_loss._target_=aepo.integrations.verl.AEPOPolicyLossConfig"


@cache
def actor_config(*overrides: str):
    """verl's ActorConfig as ``ActorRolloutRefWorker.init_model`` builds it: the composed
    ppo_trainer config (command-line overrides applied) through ``omega_conf_to_dataclass``."""
    config_dir = os.path.join(os.path.dirname(core_algos.__file__), "..", "config")
    with initialize_config_dir(config_dir=os.path.abspath(config_dir), version_base=None):
        cfg = compose("ppo_trainer", overrides=[*BASE_OVERRIDES, *overrides])
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def set_batch_info(config, info: dict) -> None:
    """What verl's ppo_loss writes into ``config.global_batch_info`` for each micro-batch."""
    config.global_batch_info.clear()
    config.global_batch_info.update(info)


def make_batch(seed: int = 0, b: int = 6, t: int = 9, dtype=torch.float32) -> dict:
    """Padded [B, T] inputs as verl's policy losses get them: right-padded bool response mask
    (one row fully masked), per-sequence advantages, ratios covering every clip region."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    lengths[1] = 0
    mask = torch.arange(t) < lengths[:, None]  # [B, T] bool
    old = -3 * torch.rand(b, t, generator=g)
    logp = old + 0.7 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, 1, generator=g).expand(b, t).contiguous()
    adv[0], adv[2] = 1.3, -0.9  # both signs, and every clip region below
    logp[0, 0], logp[2, 0], logp[2, 1] = old[0, 0] + 0.5, old[2, 0] + 1.5, old[2, 1] - 0.5
    batch = {
        "old_log_prob": old,
        "log_prob": logp,
        "advantages": adv,
        "response_mask": mask,
        "entropy": 3 * torch.rand(b, t, generator=g),
        "weights": 0.5 + torch.rand(b, t, generator=g),
    }
    r = (logp - old).exp()
    for name, region in {
        "A>0, r>1+eps_high": (adv > 0) & (r > 1.28),
        "A<0, r<1-eps_low": (adv < 0) & (r < 0.8),
        "A<0, r>c": (adv < 0) & (r > 3.0),
    }.items():
        assert (region & mask).any(), f"test batch has no token with {name}"
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


def batch_infos(batch: dict) -> dict[str, dict]:
    """Global batch info cases: a direct call (none) and a 2-rank mini-batch with counts that
    differ from this micro-batch's (so a local normaliser would be wrong)."""
    mask = batch["response_mask"]
    n_tok, n_seq = int(mask.sum()), mask.shape[0]
    return {
        "direct": {},
        "dp2": {
            "dp_size": 2,
            "batch_num_tokens": 2 * n_tok + 5,
            "global_batch_size": 2 * n_seq + 2,
        },
        "dp2-F7": {
            "dp_size": 2,
            "batch_num_tokens": 2 * n_tok + 5,
            "global_batch_size": 2 * n_seq + 2,
            "loss_scale_factor": 7,
        },
    }


def expected_agg(mode: str, info: dict, mask: torch.Tensor):
    """The aggregation mapping the module documents, written out independently."""
    dp = info.get("dp_size", 1)
    if mode == "token-mean":
        n = info.get("batch_num_tokens")
        return "token-mean", None if n is None else n / dp
    if mode == "token-sum":
        return "constant", 1 / dp
    n_seq = info.get("global_batch_size")
    n_seq = (mask.sum(-1) > 0).sum() if n_seq is None else n_seq / dp
    if mode == "seq-mean-token-sum-norm":
        scale = info.get("loss_scale_factor") or mask.shape[-1]
        return "constant", n_seq * scale
    return mode, n_seq


def call(fn, batch: dict, mode: str, config, weights: bool = False):
    """fn with verl's keyword arguments; returns (loss, d loss / d log_prob, metrics)."""
    logp = batch["log_prob"].clone().requires_grad_(True)
    loss, metrics = fn(
        old_log_prob=batch["old_log_prob"],
        log_prob=logp,
        advantages=batch["advantages"],
        response_mask=batch["response_mask"],
        loss_agg_mode=mode,
        config=config,
        rollout_is_weights=batch["weights"] if weights else None,
    )
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, metrics


def ours(batch: dict, mode: str, info: dict, *, objective: str, entropy: bool, weights=False, **kw):
    """aepo.objectives.policy_loss with the verl config's clip settings (0.2, 0.28, c = 3)."""
    logp = batch["log_prob"].clone().requires_grad_(True)
    mask = batch["response_mask"]
    agg, normalizer = expected_agg(mode, info, mask)
    adv = batch["advantages"] * batch["weights"] if weights else batch["advantages"]
    loss, _ = policy_loss(
        logp,
        batch["old_log_prob"],
        adv,
        mask,
        objective=objective,
        entropy=batch["entropy"] if entropy else None,
        eps_low=0.2,
        eps_high=0.28,
        clip_ratio_c=3.0,
        agg=agg,
        normalizer=normalizer,
        **kw,
    )
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Checks


def check_registry() -> dict:
    for name, fn in aepo_verl.LOSSES.items():
        assert core_algos.get_policy_loss_fn(name) is fn, name
    for name in ("vanilla", "cispo", "gspo"):
        assert core_algos.get_policy_loss_fn(name).__module__ == core_algos.__name__, name
    import verl.trainer.distillation.losses as distillation_losses
    import verl.workers.utils.losses as verl_losses

    for module in (verl_losses, engine_workers, distillation_losses):
        assert module.ppo_loss is aepo_verl.ppo_loss, f"{module.__name__}.ppo_loss not wrapped"
    bound = partial(engine_workers.ppo_loss, config=actor_config())  # as init_model binds it
    assert bound.func is aepo_verl.ppo_loss
    assert actor_config().policy_loss.loss_mode == "aepo"
    return {"registered": sorted(aepo_verl.LOSSES)}


def check_vanilla_parity() -> dict:
    """verl's "vanilla" (fp32) against ours with objective="ppo" (fp32); fp64 verl is the
    reference: our error is at most 2x verl's own fp32 error plus 4 ulp of the value."""
    config, vanilla = actor_config(), core_algos.get_policy_loss_fn("vanilla")
    batch32, batch64 = make_batch(0), make_batch(0, dtype=torch.float64)
    figures = {}
    for mode in MODES:
        for info_name, info in batch_infos(batch32).items():
            for weights in (False, True):
                set_batch_info(config, info)
                v32, g32, _ = call(vanilla, batch32, mode, config, weights)
                v64, g64, _ = call(vanilla, batch64, mode, config, weights)
                o32, og32 = ours(
                    batch32, mode, info, objective="ppo", entropy=False, weights=weights
                )
                case = f"{mode}/{info_name}/{'w' if weights else 'no-w'}"
                for what, mine, theirs, ref in (("loss", o32, v32, v64), ("grad", og32, g32, g64)):
                    tol = 2 * max_diff(theirs, ref) + 4 * EPS32 * ref.abs().max().item()
                    err = max_diff(mine, ref)
                    assert err <= tol, f"{case} {what}: |ours - fp64| {err:.3g} > {tol:.3g}"
                figures[case] = {"loss": max_diff(o32, v32), "grad": max_diff(og32, g32)}
    figures["max_over_cases"] = {
        k: max(f[k] for f in figures.values() if k in f) for k in ("loss", "grad")
    }
    return figures


def check_aepo_parity() -> dict:
    """The registered "aepo" equals policy_loss(objective="aepo") exactly, entropy handed over
    (provide_entropy) or absent; with no entropy its forward and metrics are vanilla's."""
    config, fn = actor_config(), core_algos.get_policy_loss_fn("aepo")
    vanilla = core_algos.get_policy_loss_fn("vanilla")
    batch = make_batch(1)
    aepo_verl._warn_no_entropy.cache_clear()
    for mode in MODES:
        for info_name, info in batch_infos(batch).items():
            set_batch_info(config, info)
            losses = {}
            for entropy, weights in ((True, False), (True, True), (False, False), (False, True)):
                case = f"{mode}/{info_name}/entropy={entropy}/weights={weights}"
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    with aepo_verl.provide_entropy(batch["entropy"] if entropy else None):
                        loss, grad, metrics = call(fn, batch, mode, config, weights)
                want, want_grad = ours(
                    batch, mode, info, objective="aepo", entropy=entropy, weights=weights
                )
                assert torch.equal(loss, want) and torch.equal(grad, want_grad), case
                assert metrics["actor/aepo/entropy_adv"] == float(entropy), case
                losses[entropy, weights] = loss
                if not entropy and mode == MODES[0] and info_name == "direct" and not weights:
                    assert any("no per-token entropy" in str(w.message) for w in caught), case
            assert losses[True, False] != losses[False, False], f"{mode}: entropy unused"
            v_loss, v_grad, v_metrics = call(vanilla, batch, mode, config)
            with aepo_verl.provide_entropy(None):
                loss, grad, metrics = call(fn, batch, mode, config)
            assert abs(loss.item() - v_loss.item()) <= 4 * EPS32 * max(abs(v_loss.item()), 1e-30)
            for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
                # fractions and a mean log-ratio, all <= 1 here: 8 ulps at 1
                assert abs(metrics[key] - v_metrics[key]) <= 8 * EPS32, (mode, key)
            ratio = (batch["log_prob"] - batch["old_log_prob"]).exp()
            kept = (batch["advantages"] > 0) & (ratio > 1.28) & batch["response_mask"]
            assert (grad[kept] != 0).all() and (v_grad[kept] == 0).all(), f"{mode}: sg bound"
    return {}


def check_variants() -> dict:
    """aepo_gppo / aepo_cispo equal policy_loss(objective="gppo" / "cispo"); GPPO's betas come
    from the AEPOPolicyLossConfig fields."""
    batch = make_batch(2)
    config = actor_config(
        TARGET,
        "+actor_rollout_ref.actor.policy_loss.gppo_beta_low=0.5",
        "+actor_rollout_ref.actor.policy_loss.gppo_beta_high=0.7",
    )
    info = batch_infos(batch)["dp2"]
    set_batch_info(config, info)
    for name, objective in (("aepo_gppo", "gppo"), ("aepo_cispo", "cispo")):
        fn = core_algos.get_policy_loss_fn(name)
        for mode in MODES:
            loss, grad, _ = call(fn, batch, mode, config)
            kw = {"gppo_beta_low": 0.5, "gppo_beta_high": 0.7} if objective == "gppo" else {}
            want, want_grad = ours(batch, mode, info, objective=objective, entropy=False, **kw)
            assert torch.equal(loss, want) and torch.equal(grad, want_grad), (name, mode)
    return {}


def check_options() -> dict:
    """AEPO's options: the _target_ subclass (hydra '+' keys), configure(), and what fails."""
    batch = make_batch(3)
    config = actor_config(
        TARGET,
        "+actor_rollout_ref.actor.policy_loss.entropy_adv_coef=0.35",
        "+actor_rollout_ref.actor.policy_loss.entropy_adv_norm=micro",
    )
    assert isinstance(config.policy_loss, aepo_verl.AEPOPolicyLossConfig)
    assert config.policy_loss.entropy_adv_coef == 0.35
    fn = core_algos.get_policy_loss_fn("aepo")
    plain = actor_config()
    want = {}
    for cfg, kw in ((config, {"entropy_adv_coef": 0.35, "entropy_adv_norm": "micro"}), (plain, {})):
        set_batch_info(cfg, {})
        with aepo_verl.provide_entropy(batch["entropy"]):
            loss, grad, _ = call(fn, batch, "token-mean", cfg)
        want[cfg is config], want_grad = ours(
            batch, "token-mean", {}, objective="aepo", entropy=True, **kw
        )
        assert torch.equal(loss, want[cfg is config]) and torch.equal(grad, want_grad), kw
    try:
        aepo_verl.configure(entropy_adv_coef=0.5)
        with aepo_verl.provide_entropy(batch["entropy"]):
            loss_plain, _, _ = call(fn, batch, "token-mean", plain)
            loss_sub, _, _ = call(fn, batch, "token-mean", config)  # its field wins: 0.35
        want_plain, _ = ours(
            batch, "token-mean", {}, objective="aepo", entropy=True, entropy_adv_coef=0.5
        )
        assert torch.equal(loss_plain, want_plain) and torch.equal(loss_sub, want[True])
    finally:
        aepo_verl.configure(entropy_adv_coef=0.2)
    errors = {}
    for label, attempt in {
        "plain PolicyLossConfig with a new key": lambda: actor_config(
            "+actor_rollout_ref.actor.policy_loss.entropy_adv_coef=0.35"
        ),
        "entropy_adv_norm=group": lambda: actor_config(
            TARGET, "+actor_rollout_ref.actor.policy_loss.entropy_adv_norm=group"
        ),
        "configure(bad=1)": lambda: aepo_verl.configure(bad=1),
    }.items():
        try:
            attempt()
        except Exception as e:
            errors[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        else:
            raise AssertionError(f"{label} was accepted")
    return errors


def check_microbatch_accumulation() -> dict:
    """Two micro-batches with the mini-batch's counts in global_batch_info sum to the loss
    and gradient of the whole batch."""
    config, fn = actor_config(), core_algos.get_policy_loss_fn("aepo")
    batch = make_batch(4, b=8)
    mask = batch["response_mask"]
    info = {"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": mask.shape[0]}
    figures = {}
    for mode in MODES:
        set_batch_info(config, info)
        with aepo_verl.provide_entropy(None):
            full, full_grad, _ = call(fn, batch, mode, config)
            halves = ({k: v[s] for k, v in batch.items()} for s in (slice(0, 3), slice(3, 8)))
            parts = [call(fn, half, mode, config) for half in halves]
        acc = sum(p[0] for p in parts)
        acc_grad = torch.cat([p[1] for p in parts])
        scale = max(full.abs().item(), full_grad.abs().max().item())
        diff = max(max_diff(acc, full), max_diff(acc_grad, full_grad))
        assert diff <= 8 * EPS32 * scale, f"{mode}: accumulated != full ({diff:.3g})"
        figures[mode] = diff
    return figures


def verl_micro_batch(seed: int = 5, b: int = 4, p: int = 5, r: int = 7):
    """A micro-batch as verl's trainer hands it to the actor (left-padded prompts, right-padded
    responses, left_right_2_no_padding), and the engine's nested model output."""
    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(1, p + 1, (b,), generator=g)
    resp_len = torch.randint(1, r + 1, (b,), generator=g)
    prompt_mask = torch.arange(p) >= p - prompt_len[:, None]
    resp_mask = torch.arange(r) < resp_len[:, None]
    attention = torch.cat([prompt_mask, resp_mask], dim=1).long()
    ids = torch.randint(3, 50, (b, p + r), generator=g) * attention
    td = TensorDict(
        {
            "input_ids": ids,
            "attention_mask": attention,
            "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
            "prompts": ids[:, :p],
            "responses": ids[:, p:],
            "response_mask": resp_mask.long(),
            "old_log_probs": -3 * torch.rand(b, r, generator=g),
            "advantages": torch.randn(b, 1, generator=g).expand(b, r).contiguous(),
        },
        batch_size=[b],
    )
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=int(resp_mask.sum()), global_batch_size=b)
    offsets = td["input_ids"].offsets()
    flat_logp = (-3 * torch.rand(int(offsets[-1]), generator=g)).requires_grad_(True)
    flat_entropy = 3 * torch.rand(int(offsets[-1]), generator=g)
    nested = partial(torch.nested.nested_tensor_from_jagged, offsets=offsets)
    return td, flat_logp, {"log_probs": nested(flat_logp), "entropy": nested(flat_entropy)}


def check_ppo_loss_handover() -> dict:
    """verl's actual caller: ppo_loss as the worker binds it (partial(ppo_loss, config=...))
    hands model_output["entropy"] to "aepo"; without entropy the loss falls back."""
    config = actor_config()
    loss_fn = partial(engine_workers.ppo_loss, config=config)
    figures = {}
    for with_entropy in (True, False):
        td, flat_logp, model_output = verl_micro_batch()
        if not with_entropy:
            del model_output["entropy"]
        loss, metrics = loss_fn(model_output=model_output, data=td, dp_group=None)
        (grad,) = torch.autograd.grad(loss, flat_logp)
        td2, flat2, out2 = verl_micro_batch()
        logp = no_padding_2_padding(out2["log_probs"], td2)
        entropy = no_padding_2_padding(out2["entropy"], td2)
        want = {}
        for e in (entropy, None):
            mask = td2["response_mask"].bool()
            clip = {"eps_low": 0.2, "eps_high": 0.28, "clip_ratio_c": 3.0}
            value, _ = policy_loss(
                logp,
                td2["old_log_probs"],
                td2["advantages"],
                mask,
                objective="aepo",
                entropy=e,
                **clip,
                normalizer=int(mask.sum()),
            )
            want[e is not None] = value
        (want_grad,) = torch.autograd.grad(want[with_entropy], flat2)
        assert metrics["actor/aepo/entropy_adv"].aggregate() == float(with_entropy)
        scale = want[with_entropy].abs().item()
        assert max_diff(loss, want[with_entropy]) <= 4 * EPS32 * scale, with_entropy
        assert max_diff(grad, want_grad) <= 4 * EPS32 * want_grad.abs().max().item()
        figures[f"entropy={with_entropy}"] = {"loss": max_diff(loss, want[with_entropy])}
        figures["reweighting_effect"] = max_diff(want[True], want[False])
    assert figures["reweighting_effect"] > 1e-4, "entropy-aware advantage changed nothing"
    return figures


CHECKS = {
    "registry": check_registry,
    "vanilla_parity": check_vanilla_parity,
    "aepo_parity": check_aepo_parity,
    "variants": check_variants,
    "options": check_options,
    "microbatch_accumulation": check_microbatch_accumulation,
    "ppo_loss_handover": check_ppo_loss_handover,
}


def main() -> int:
    results = {}
    for name, check in CHECKS.items():
        start = time.perf_counter()
        try:
            results[name] = {"ok": True, "figures": check()}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
        print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'}", flush=True)
    text = json.dumps(results, indent=1, default=str)
    print(text)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(text)
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
