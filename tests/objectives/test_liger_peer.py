"""GRPO/DAPO through our fused policy loss vs an independent peer, Liger-Kernel's
``LigerFusedLinearGRPOLoss``: same loss and same gradients w.r.t. hidden states and lm_head.

Configuration alignment (both sides then compute the same mathematical quantity):
- Liger has no dual clip, so ours runs with ``clip_ratio_c=None``.
- Our ``agg="token-mean"`` (sum over masked tokens / their count) is Liger's ``loss_type="dapo"``
  (normaliser: attention-mask sum of the whole batch); our "grpo" objective is the PPO clip with
  eps_low = eps_high = 0.2, i.e. Liger's "dapo" loss with epsilon_high=0.2. Our
  ``agg="seq-mean-token-mean"`` is Liger's ``loss_type="grpo"`` as long as no row is fully masked
  (Liger divides by B, ours by the number of rows with at least one token).
- Both use the k3 KL exp(ref - logp) - (ref - logp) - 1 and divide the logits by temperature.
"""

import pytest
import torch

from aepo.kernels import fused_policy_loss
from tests.helpers import EPS32, assert_close_scaled

# A dev dependency: installed by make test; absent on a bare GPU machine (make gpu-check).
LigerFusedLinearGRPOLoss = pytest.importorskip("liger_kernel.chunked_loss").LigerFusedLinearGRPOLoss

B, T, H, V = 6, 12, 32, 97
EPS_LOW = 0.2
EPS_HIGH = {"grpo": 0.2, "dapo": 0.28}
LIGER_LOSS_TYPE = {"token-mean": "dapo", "seq-mean-token-mean": "grpo"}


def make_inputs(temperature: float):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    mask[:, 0] = 1.0  # no fully masked row (see the module docstring)
    mask[0, -3:] = 0.0  # right padding
    # Both signs, so that both clip sides are active.
    advantages = torch.tensor([1.0, -0.7, 0.4, -1.3, 0.9, -0.2])
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T / temperature, -1)
        logp = logp.gather(-1, labels[..., None])[..., 0]
    old_logp = logp + 0.3 * torch.randn(B, T, generator=g)
    ref_logp = logp + 0.2 * torch.randn(B, T, generator=g)
    return hidden, weight, labels, mask, advantages, logp, old_logp, ref_logp


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=lambda t: f"temp{t}")
@pytest.mark.parametrize("beta", [0.0, 0.04], ids=lambda b: f"kl{b}")
@pytest.mark.parametrize("agg", list(LIGER_LOSS_TYPE))
@pytest.mark.parametrize("objective", ["grpo", "dapo"])
def test_matches_liger(objective, agg, beta, temperature, backend):
    hidden, weight, labels, mask, adv, logp, old_logp, ref_logp = make_inputs(temperature)
    eps_high = EPS_HIGH[objective]

    # The comparison must exercise clipping on both sides, with the sign of A that makes the
    # clip active (zero gradient): A > 0 above 1 + eps_high, A < 0 below 1 - eps_low.
    ratio, on, a = (logp - old_logp).exp(), mask.bool(), adv[:, None].expand(B, T)
    assert ((ratio > 1 + eps_high) & on & (a > 0)).sum() >= 3
    assert ((ratio < 1 - EPS_LOW) & on & (a < 0)).sum() >= 3
    assert ((ratio > 1 - EPS_LOW) & (ratio < 1 + eps_high) & on).sum() >= 3

    h_ours = hidden.clone().requires_grad_(True)
    w_ours = weight.clone().requires_grad_(True)
    kl_kwargs = {"ref_logp": ref_logp, "kl_coef": beta} if beta else {}
    loss, metrics = fused_policy_loss(
        h_ours @ w_ours.T,
        labels,
        old_logp,
        adv[:, None].expand(B, T),
        mask,
        temperature=temperature,
        backend=backend,
        objective=objective,
        eps_low=EPS_LOW,
        eps_high=None,  # the objective's default: 0.2 for grpo, 0.28 for dapo
        clip_ratio_c=None,
        agg=agg,
        **kl_kwargs,
    )
    loss.backward()

    h_liger = hidden.clone().requires_grad_(True)
    w_liger = weight.clone().requires_grad_(True)
    liger = LigerFusedLinearGRPOLoss(
        beta=beta,
        compiled=False,
        use_ref_model=beta > 0,
        chunk_size=1,
        epsilon_low=EPS_LOW,
        epsilon_high=eps_high,
        loss_type=LIGER_LOSS_TYPE[agg],
        temperature=temperature,
    )
    ref_loss, ref_metrics = liger(
        h_liger,
        w_liger,
        labels,
        mask,
        adv,
        ref_per_token_logps=ref_logp if beta else None,
        old_per_token_logps=old_logp,
    )
    ref_loss.backward()

    # Two fp32 implementations summing in other orders (Liger chunks the rows): the loss (terms
    # of size |A| ~ 1) within 1e-5 of itself plus 8 ulps at 1, the gradients (GEMM outputs)
    # within 1e-5 of each tensor's largest element.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=8 * EPS32)
    assert_close_scaled(h_ours.grad, h_liger.grad, 1e-5, msg="d hidden")
    assert_close_scaled(w_ours.grad, w_liger.grad, 1e-5, msg="d weight")
    # Liger's metrics: [k3 KL mean (only when beta != 0), clipped fraction].
    clip_frac = metrics["clip_frac_high"] + metrics["clip_frac_low"]
    torch.testing.assert_close(clip_frac, ref_metrics[-1], rtol=0, atol=4 * EPS32)  # a fraction
    if beta:  # a mean of k3 terms of size |ref - logp| ~ 0.1
        torch.testing.assert_close(metrics["kl_ref"], ref_metrics[0], rtol=1e-5, atol=EPS32)
