"""The weight-sync check's decision (aepo/train/sync_check.py) in fp32 and at bf16 noise: a
skipped sync is caught however small the update, kernel noise of bf16 size passes, a broken
sync fails, a skipped optimizer step (nothing to sync) passes. The same check against real
vLLM and DeepSpeed, with a sync that does not happen: tests/train/test_weight_sync.py."""

from __future__ import annotations

import pytest
import torch

from aepo.train.sync_check import Probe, sync_tolerance, sync_verdict

TOKENS = list(range(16))
BF16_TOL = sync_tolerance(None, torch.bfloat16)


def _logp(seed: int) -> torch.Tensor:
    return -5 * torch.rand(16, generator=torch.Generator().manual_seed(seed))


def _bf16_noise(x: torch.Tensor, seed: int) -> torch.Tensor:
    """log-probs as a second bf16 implementation gives them: logits of size ~20 rounded at
    bf16's 2^-8 relative spacing, ~0.08 nat per token (a few tenths at most)."""
    g = torch.Generator().manual_seed(seed)
    return x + 20 * 2**-8 * torch.randn(x.shape, generator=g)


def test_auto_tolerance_by_dtype_and_explicit_value():
    assert sync_tolerance(None, torch.float32) == 1e-4
    assert BF16_TOL == sync_tolerance(None, torch.float16) == 1.0
    assert sync_tolerance(0.3, torch.bfloat16) == 0.3


@pytest.mark.parametrize("update", [1e-3, 1.0], ids=["tiny-update", "large-update"])
@pytest.mark.parametrize("noisy", [False, True], ids=["fp32", "bf16-noise"])
def test_skipped_sync_is_caught_however_small_the_update(update, noisy):
    """vLLM kept the previous weights: the same tokens, bitwise the same log-probs; the
    trainer's moved (by less than bf16 noise, for the tiny update)."""
    old = _logp(0)
    served = _bf16_noise(old, 1) if noisy else old.clone()
    before = Probe(TOKENS, served, old)
    after = Probe(TOKENS, served.clone(), old + update * torch.ones(16))
    why = sync_verdict(before, after, BF16_TOL if noisy else 1e-4)
    assert why is not None and "previous policy" in why


@pytest.mark.parametrize("seed", range(5))
def test_bf16_kernel_noise_after_a_good_sync_passes(seed):
    old, new = _logp(seed), _logp(seed) + 0.01
    before = Probe(TOKENS, _bf16_noise(old, 10 + seed), old)
    after = Probe(TOKENS, _bf16_noise(new, 20 + seed), new)
    assert after.gap() > 1e-2  # far above the fp32 tolerance: fp32's rule would fire here
    assert sync_verdict(before, after, BF16_TOL) is None
    assert "> logging.sync_tolerance=0.0001" in sync_verdict(before, after, 1e-4)


def test_broken_sync_fails_in_any_dtype():
    new = _logp(3)
    after = Probe(TOKENS, new + torch.linspace(0, 3, 16), new)  # e.g. a layer left unloaded
    why = sync_verdict(None, after, BF16_TOL)
    assert why is not None and "differ by 3 > logging.sync_tolerance=1" in why


def test_skipped_optimizer_step_has_nothing_to_sync():
    lp = _logp(4)
    before, after = Probe(TOKENS, lp.clone(), lp.clone()), Probe(TOKENS, lp.clone(), lp.clone())
    assert sync_verdict(before, after, 1e-4) is None


def test_other_tokens_after_the_sync_are_judged_by_the_gap_alone():
    """A good sync changes what vLLM samples: the probes are not comparable, the gap decides."""
    lp = _logp(5)
    before = Probe(TOKENS, lp, lp)
    after = Probe([t + 1 for t in TOKENS], lp + 1e-6, lp)
    assert sync_verdict(before, after, 1e-4) is None
    assert sync_verdict(None, Probe([], torch.zeros(0), torch.zeros(0)), 1e-4) is None
