"""fused_policy_loss equals policy_loss(*logprobs_and_entropy(...)) in value and gradient."""

from __future__ import annotations

import pytest
import torch

from aepo.kernels import fused_policy_loss, logprobs_and_entropy
from aepo.loss import AEPOLoss, PolicyLossConfig
from aepo.objectives import OBJECTIVES, policy_loss

B, T, V = 3, 8, 257


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(B, T + 1, V, generator=gen) * 2
    logits = full[:, :-1]  # strided [B, T, V] view, as a causal LM shift produces
    labels = torch.randint(0, V, (B, T), generator=gen)
    mask = (torch.rand(B, T, generator=gen) > 0.3).float()
    old = torch.log_softmax(full[:, :-1].double() * 0.9, -1).gather(-1, labels[..., None])[..., 0]
    old = old.float() + torch.randn(B, T, generator=gen) * 0.2
    adv = torch.randn(B, 1, generator=gen).expand(B, T)
    ref = old + torch.randn(B, T, generator=gen) * 0.1
    return logits, labels, mask, old, adv, ref


def _leaf(logits):
    """A fresh leaf with the same strided layout as ``logits``."""
    base = torch.empty(B, T + 1, V)
    base[:, :-1] = logits
    return base.requires_grad_(), lambda b: b[:, :-1]


def _unfused(logits, labels, mask, old, adv, backend, temperature, **kw):
    base, view = _leaf(logits)
    lab = torch.where(mask.bool(), labels, -100)
    logp, ent = logprobs_and_entropy(view(base), lab, temperature=temperature, backend=backend)
    loss, metrics = policy_loss(logp, old, adv, mask, entropy=ent, **kw)
    loss.backward()
    return loss, metrics, base.grad[:, :-1]


def _fused(logits, labels, mask, old, adv, backend, temperature, **kw):
    base, view = _leaf(logits)
    loss, metrics = fused_policy_loss(
        view(base), labels, old, adv, mask, backend=backend, temperature=temperature, **kw
    )
    loss.backward()
    return loss, metrics, base.grad[:, :-1]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("extras", ["plain", "bonus+kl"])
def test_fused_equals_unfused(backend, objective, extras):
    logits, labels, mask, old, adv, ref = _batch()
    kw = {"objective": objective}
    if extras == "bonus+kl":
        kw |= {"entropy_coef": 0.01, "ref_logp": ref, "kl_coef": 0.05, "agg": "seq-mean-token-mean"}
    a = _fused(logits, labels, mask, old, adv, backend, 0.8, **kw)
    b = _unfused(logits, labels, mask, old, adv, backend, 0.8, **kw)
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=1e-8)
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        torch.testing.assert_close(a[1][key], b[1][key])
    masked_rows = ~mask.bool()
    assert (a[2][masked_rows] == 0).all() and (b[2][masked_rows] == 0).all()
    assert a[2][mask.bool()].abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_positions_may_hold_garbage_labels(backend):
    logits, labels, mask, old, adv, _ = _batch(1)
    labels = torch.where(mask.bool(), labels, V + 7)  # out of range, but masked
    old = torch.where(mask.bool(), old, float("-inf"))
    loss, _, grad = _fused(logits, labels, mask, old, adv, backend, 1.0)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[~mask.bool()] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inplace_and_upstream_scale(backend):
    logits, labels, mask, old, adv, _ = _batch(2)
    expected = _fused(logits, labels, mask, old, adv, backend, 1.0)[2]
    leaf = logits.detach().clone().requires_grad_()
    x = leaf * 1
    loss, _ = fused_policy_loss(x, labels, old, adv, mask, backend=backend, inplace_grad=True)
    (3 * loss).backward()  # e.g. a loss scale: the per-token gradients must follow it
    torch.testing.assert_close(leaf.grad, 3 * expected, rtol=1e-6, atol=1e-8)


def test_no_grad_evaluation_returns_value():
    logits, labels, mask, old, adv, _ = _batch(3)
    with torch.no_grad():
        loss, metrics = fused_policy_loss(logits, labels, old, adv, mask, backend="torch")
    assert not loss.requires_grad and torch.isfinite(loss) and "entropy" in metrics


def test_mask_shape_is_checked():
    logits, labels, _, old, adv, _ = _batch()
    with pytest.raises(ValueError, match=r"mask shape \(3, 7\)"):
        fused_policy_loss(logits, labels, old, adv, torch.ones(3, 7))


def test_module_wraps_fused_loss():
    logits, labels, mask, old, adv, ref = _batch(4)
    cfg = PolicyLossConfig(objective="dapo", kl_coef=0.1, temperature=0.9, backend="torch")
    module = AEPOLoss(cfg, entropy_coef=0.02)
    assert module.config.entropy_coef == 0.02 and "dapo" in repr(module)
    got = module(logits, labels, old, adv, mask, ref_logp=ref)[0]
    want = fused_policy_loss(
        logits,
        labels,
        old,
        adv,
        mask,
        objective="dapo",
        kl_coef=0.1,
        temperature=0.9,
        backend="torch",
        entropy_coef=0.02,
        ref_logp=ref,
    )[0]
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="objective='trpo' is not one of: aepo"):
        PolicyLossConfig(objective="trpo")
