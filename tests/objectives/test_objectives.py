"""Advantages, entropy-aware advantages and the per-region gradients of every objective."""

from __future__ import annotations

import math

import pytest
import torch

from aepo.objectives import (
    AGGREGATIONS,
    OBJECTIVES,
    aggregate,
    aggregation_weights,
    entropy_aware_advantages,
    entropy_statistics,
    group_advantages,
    per_token_gradients,
    policy_loss,
)
from tests.helpers import EPS32, assert_close_scaled


def test_group_advantages_unequal_noncontiguous_groups():
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0, 3.0, 7.0])
    groups = torch.tensor([5, 9, 5, 9, 5, 9, 2])  # sizes 3, 3, 1; interleaved
    adv = group_advantages(rewards, groups, eps=1e-6)
    for g in (5, 9):
        sel = groups == g
        r = rewards[sel].double()
        expected = (r - r.mean()) / (r.std() + 1e-6)  # unbiased std, as torch.std
        assert_close_scaled(adv[sel], expected, 8 * EPS32)  # 8 ulps at the largest |A|
    assert adv[groups == 2].item() == 0.0  # a group of one carries no signal
    centred = group_advantages(rewards, groups, normalize_std=False)
    torch.testing.assert_close(centred[:3:2], rewards[:3:2] - rewards[[0, 2, 4]].mean())


def test_group_advantages_identical_rewards_are_zero():
    adv = group_advantages(torch.ones(4), torch.tensor([0, 0, 1, 1]))
    assert torch.equal(adv, torch.zeros(4))


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match=r"\[B\]"):
        group_advantages(torch.ones(4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="integers"):
        group_advantages(torch.ones(2), torch.zeros(2))


def test_entropy_aware_advantage_formula_by_hand():
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-2.0, -2.0, -2.0, -2.0]])
    ent = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, 0.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    selected = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])  # the masked-in entropies
    mean, std = selected.mean(), selected.std()  # 3, sqrt(2.5)
    out = entropy_aware_advantages(adv, ent, mask, coef=0.2, norm="batch")
    torch.testing.assert_close(out, adv * (1 + 0.2 * (ent - mean) / std))
    assert torch.equal(entropy_aware_advantages(adv, ent, mask, coef=0.0), adv)


def test_entropy_aware_advantage_degenerate_std():
    adv, ent = torch.randn(2, 3), torch.full((2, 3), 0.7)
    mask = torch.ones(2, 3)
    torch.testing.assert_close(entropy_aware_advantages(adv, ent, mask), adv)  # std 0 -> 1
    one = torch.zeros(2, 3)
    one[0, 0] = 1
    _, std = entropy_statistics(torch.randn(2, 3), one)
    assert std.item() == 1.0  # fewer than two tokens


def test_entropy_group_normalisation_uses_each_group():
    ent = torch.tensor([[1.0, 3.0], [2.0, 2.0], [10.0, 30.0]])
    mask = torch.ones(3, 2)
    mean, std = entropy_statistics(ent, mask, norm="group", group_ids=torch.tensor([0, 0, 1]))
    torch.testing.assert_close(mean.squeeze(-1), torch.tensor([2.0, 2.0, 20.0], dtype=mean.dtype))
    s0 = torch.tensor([1.0, 3.0, 2.0, 2.0]).std().item()
    torch.testing.assert_close(std.squeeze(-1), torch.tensor([s0, s0, math.sqrt(200)]).double())
    with pytest.raises(ValueError, match="group_ids"):
        entropy_statistics(ent, mask, norm="group")


# Per-region gradients (AEPO_SPEC section 2 table). Tokens: A in {+1, -1} x ratio in
# {below the band, inside, above, above the dual-clip bound c = 3}.
RATIOS = [0.5, 1.05, 1.5, 4.0]
A = torch.tensor([1.0] * 4 + [-1.0] * 4)
R = torch.tensor(RATIOS * 2)


def _expected(objective: str, eh: float, el: float = 0.2, bl: float = 1.0, bh: float = 1.0):
    out = []
    for a, r in zip(A.tolist(), R.tolist(), strict=True):
        inside = -a * r
        if objective == "cispo":
            out.append(-a * min(r, 1 + eh))
        elif a > 0 and r > 1 + eh:
            out.append({"aepo": -(1 + eh) * a, "gppo": -bh * (1 + eh) * a}.get(objective, 0.0))
        elif a < 0 and r > 3.0:
            out.append(0.0)  # dual clip: constant -c A
        elif a < 0 and r < 1 - el:
            out.append(-bl * (1 - el) * a if objective == "gppo" else 0.0)
        else:
            out.append(inside)
    return torch.tensor(out)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_per_region_gradients(objective):
    old = torch.full((8,), -2.0)
    logp = (old + R.log()).requires_grad_()
    kw = {"gppo_beta_low": 2.0, "gppo_beta_high": 0.5} if objective == "gppo" else {}
    loss, _ = policy_loss(
        logp, old, A, torch.ones(8), objective=objective, normalizer=1.0, entropy_adv_coef=0.0, **kw
    )
    (grad,) = torch.autograd.grad(loss, logp)
    eh = 0.28 if objective == "dapo" else 0.2
    expected = _expected(
        objective, eh, bl=kw.get("gppo_beta_low", 1), bh=kw.get("gppo_beta_high", 1)
    )
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-6)


def test_aepo_forward_equals_grpo_and_gradient_differs_only_upper_clipped():
    gen = torch.Generator().manual_seed(0)
    old = torch.randn(64, generator=gen) - 3
    logp = old + torch.randn(64, generator=gen) * 0.4
    adv = torch.randn(64, generator=gen)
    mask = torch.ones(64)
    out = {}
    for obj in ("aepo", "grpo"):
        x = logp.clone().requires_grad_()
        loss, _ = policy_loss(x, old, adv, mask, objective=obj, entropy_adv_coef=0.0)
        out[obj] = (loss, torch.autograd.grad(loss, x)[0])
    assert torch.equal(out["aepo"][0], out["grpo"][0])
    ratio = (logp - old).exp()
    region = (adv > 0) & (ratio > 1.2)
    assert region.any() and (~region).any()
    differs = out["aepo"][1] != out["grpo"][1]
    assert torch.equal(differs, region)


def test_aepo_entropy_advantage_runs_without_entropy_bonus():
    """The released code only applied A' when an entropy bonus was on (spec 6.1): not here."""
    gen = torch.Generator().manual_seed(1)
    old, adv = torch.randn(2, 16, generator=gen) - 2, torch.randn(2, 1, generator=gen).expand(2, 16)
    ent, mask = torch.rand(2, 16, generator=gen) * 3, torch.ones(2, 16)
    x = old.clone().requires_grad_()  # ratio 1: every token inside the band, grad = -A'
    loss, _ = policy_loss(
        x, old, adv, mask, objective="aepo", entropy=ent, entropy_coef=0.0, normalizer=1.0
    )
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(grad, -entropy_aware_advantages(adv, ent, mask, coef=0.2))
    assert not torch.allclose(grad, -adv)


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_all_zero_mask_gives_zero_loss_and_gradient(agg):
    x = torch.randn(3, 5).requires_grad_()
    old = torch.full((3, 5), float("-inf"))  # garbage where masked
    loss, metrics = policy_loss(
        x, old, torch.randn(3, 5), torch.zeros(3, 5), agg=agg, entropy=torch.rand(3, 5)
    )
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros(3, 5))
    assert all(torch.isfinite(v) for v in metrics.values())


def test_garbage_entropy_at_masked_positions_is_ignored():
    nan, mask = float("nan"), torch.tensor([[1.0, 1.0, 0.0]])
    ent = torch.tensor([[1.0, 2.0, nan]])
    mean, std = entropy_statistics(ent, mask)
    assert mean.item() == 1.5 and math.isclose(std.item(), math.sqrt(0.5))
    x = torch.zeros(1, 3, requires_grad=True)
    loss, metrics = policy_loss(
        x, torch.zeros(1, 3), torch.ones(1, 3), mask, entropy=ent, entropy_coef=0.1
    )
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad[0, 2] == 0
    assert metrics["entropy"].item() == 1.5


@pytest.mark.parametrize(
    "agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant"]
)
def test_gradient_accumulation_with_shared_normalizer(agg):
    gen = torch.Generator().manual_seed(2)
    old = torch.randn(4, 6, generator=gen) - 2
    logp = old + torch.randn(4, 6, generator=gen) * 0.3
    adv, ent = torch.randn(4, 6, generator=gen), torch.rand(4, 6, generator=gen)
    mask = (torch.rand(4, 6, generator=gen) > 0.3).float()
    norm = {"token-mean": mask.sum(), "constant": 24.0}.get(agg, float((mask.sum(-1) > 0).sum()))
    stats = entropy_statistics(ent, mask)  # mini-batch statistics shared by micro-batches
    kw = {"agg": agg, "normalizer": norm, "entropy": ent, "entropy_stats": stats}
    x = logp.clone().requires_grad_()
    full = policy_loss(x, old, adv, mask, **kw)[0]
    (g_full,) = torch.autograd.grad(full, x)
    y = logp.clone().requires_grad_()
    total = 0.0
    for rows in (slice(0, 1), slice(1, 4)):
        micro = {**kw, "entropy": ent[rows]}
        total = total + policy_loss(y[rows], old[rows], adv[rows], mask[rows], **micro)[0]
    (g_acc,) = torch.autograd.grad(total, y)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(g_acc, g_full)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"objective": "ppo2"}, ValueError, "valid choices: aepo, grpo, ppo, dapo, gppo, cispo"),
        ({"agg": "mean"}, ValueError, "valid choices: token-mean"),
        ({"entropy_coef": 0.1}, ValueError, "entropy"),
        ({"kl_coef": 0.1}, ValueError, "ref_logp"),
        ({"entropy_adv_norm": "global", "entropy": torch.ones(2, 3)}, ValueError, "batch, micro"),
        ({"old_logp": torch.zeros(3, 2)}, ValueError, r"old_logp \(3, 2\)"),
        ({"eps_low": 1.5}, ValueError, "eps_low"),
        ({"clip_ratio_c": 0.5}, ValueError, "clip_ratio_c"),
    ],
    ids=["objective", "agg", "bonus-no-entropy", "kl-no-ref", "norm", "shape", "eps", "dual"],
)
def test_bad_arguments_are_named(kwargs, error, match):
    args = {
        "logp": torch.zeros(2, 3),
        "old_logp": torch.zeros(2, 3),
        "advantages": torch.zeros(2, 3),
        "mask": torch.ones(2, 3),
    }
    for key in list(kwargs):
        if key in args:
            args[key] = kwargs.pop(key)
    with pytest.raises(error, match=match):
        policy_loss(**args, **kwargs)


def test_metrics_are_detached_tensors():
    x = torch.randn(2, 4).requires_grad_()
    _, metrics = policy_loss(
        x, x.detach() - 0.5, torch.ones(2, 4), torch.ones(2, 4), entropy=torch.rand(2, 4)
    )
    assert {"clip_frac_high", "clip_frac_low", "ratio_mean", "approx_kl", "entropy"} <= set(metrics)
    for value in metrics.values():
        assert isinstance(value, torch.Tensor) and not value.requires_grad and value.dim() == 0
    assert metrics["clip_frac_high"].item() == 1.0  # ratio e^0.5 > 1.2 everywhere, A > 0


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("normalizer", [None, 7.0])
def test_aggregation_weights_reproduce_aggregate(agg, normalizer):
    """sum(w * l) equals aggregate(l) for random losses, with a ragged mask (one empty
    sequence), and the weights are computed by hand for token-mean / seq-mean-token-mean."""
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(4, 6, generator=g) > 0.4).float()
    mask[2] = 0
    weights = aggregation_weights(mask, agg, normalizer)
    for _ in range(3):
        loss = torch.randn(4, 6, generator=g, dtype=torch.float64)
        expected = aggregate(loss, mask, agg, normalizer)
        torch.testing.assert_close((weights * loss).sum(), expected, rtol=1e-12, atol=1e-12)
    if agg == "token-mean" and normalizer is None:
        torch.testing.assert_close(weights, mask.double() / mask.sum())
    if agg == "seq-mean-token-mean" and normalizer is None:
        per_seq = mask.double() / mask.sum(-1, keepdim=True).clamp(min=1)
        torch.testing.assert_close(weights, per_seq / (mask.sum(-1) > 0).sum())


def test_per_token_gradients_only_fails_for_in_loss_entropy_statistics():
    stats = (torch.tensor(1.0), torch.tensor(2.0))
    assert not per_token_gradients()  # aepo, entropy_adv_coef 0.2, statistics inside the loss
    assert not per_token_gradients(objective="aepo", entropy_adv_norm="group")
    assert per_token_gradients(entropy_stats=stats)
    assert per_token_gradients(objective="aepo", entropy_adv_coef=0.0)
    for objective in set(OBJECTIVES) - {"aepo"}:
        assert per_token_gradients(objective=objective)


@pytest.mark.parametrize("api", ["policy_loss", "fused_policy_loss", "fused_linear_policy_loss"])
def test_per_sequence_advantages_broadcast_over_the_tokens(api):
    """group_advantages gives [B]; [B], [B, 1] and the [B, T] expansion give the same loss
    and gradient; another shape names both accepted forms."""
    from aepo.kernels import fused_linear_policy_loss, fused_policy_loss

    g = torch.Generator().manual_seed(3)
    b, t, h, v = 3, 5, 8, 30
    hidden, weight = torch.randn(b, t, h, generator=g), torch.randn(v, h, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    old, mask = -2 * torch.rand(b, t, generator=g), (torch.rand(b, t, generator=g) > 0.2).float()
    seq = torch.randn(b, generator=g)

    def run(adv):
        x = hidden.clone().requires_grad_()
        if api == "policy_loss":
            logp = torch.log_softmax(x @ weight.T, -1).gather(-1, labels[..., None])[..., 0]
            loss, _ = policy_loss(logp, old, adv, mask, objective="grpo")
        elif api == "fused_policy_loss":
            loss, _ = fused_policy_loss(x @ weight.T, labels, old, adv, mask, backend="torch")
        else:
            loss, _ = fused_linear_policy_loss(x, weight, labels, old, adv, mask, backend="torch")
        return loss, torch.autograd.grad(loss, x)[0]

    want = run(seq[:, None].expand(b, t))
    for adv in (seq, seq[:, None]):
        got = run(adv)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match=r"per token \(3, 5\), or per sequence \(3,\) or \(3, 1\)"):
        run(torch.randn(b + 1))
