"""Did the weight sync happen? A check that works in every dtype.

After each sync the trainer samples a few tokens with vLLM and compares vLLM's log-probs with
its own. In fp32 the two agree to ~1e-6, so any gap above 1e-4 is a failed sync. In bf16 they
differ by kernel noise alone (another attention kernel, GEMM order, logits of size 10-30
rounded at 2^-8 relative: up to ~0.1 nat on a token), which can exceed what one small optimizer
step changes, so no log-prob threshold separates "synced" from "not synced" there.

What does separate them: the same probe (prompt, seed) before the update and after the sync.
vLLM is deterministic for a fixed request and fixed weights, so a sync that did not happen
serves bitwise the same tokens and log-probs as before, while the trainer's own log-probs of
those tokens moved. That test needs no tolerance. The tolerance (:func:`sync_tolerance`) then
only catches a broken sync (wrong or partial weights), above the dtype's noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Largest |vLLM - trainer| log-prob over the probe's tokens after a sync, per weight dtype:
# fp32 kernels agree to ~1e-6; 16-bit ones differ by rounding of logits of size 10-30 at
# 2^-8 (~0.1 nat on one token); a broken sync moves log-probs by several nats.
AUTO_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1.0, torch.float16: 1.0}


@dataclass
class Probe:
    """One sync probe: the tokens vLLM sampled for a fixed request, its log-probs of them and
    the trainer's, each [n] on the host."""

    tokens: list[int]
    served: torch.Tensor
    trainer: torch.Tensor

    def gap(self) -> float:
        """max |vLLM - trainer| over the tokens (0 for none)."""
        return (self.served - self.trainer).abs().max().item() if self.tokens else 0.0


def sync_tolerance(configured: float | None, dtype: torch.dtype) -> float:
    """``logging.sync_tolerance``, or the dtype's default when it is None (auto)."""
    return AUTO_TOLERANCE.get(dtype, 1.0) if configured is None else configured


def sync_verdict(before: Probe | None, after: Probe, tolerance: float) -> str | None:
    """Why the sync failed, or None.

    Args:
        before: the probe taken before the update (vLLM serving the previous policy, the
            trainer still holding it), or None when there is none (the first sync of a run).
        after: the same probe after the sync.
        tolerance: the largest ``after.gap()`` a good sync leaves (:func:`sync_tolerance`).
    """
    if before is not None and before.tokens == after.tokens:
        served_same = torch.equal(before.served, after.served)
        if served_same and not torch.equal(before.trainer, after.trainer):
            moved = (after.trainer - before.trainer).abs().max().item()
            return (
                "vLLM still serves the previous policy: it sampled the same tokens with "
                f"bitwise the same log-probs as before the update, while the trainer's moved by "
                f"up to {moved:.3g}"
            )
    gap = after.gap()
    if not gap <= tolerance:
        return (
            f"vLLM and trainer log-probs differ by {gap:.3g} > logging.sync_tolerance={tolerance:g}"
        )
    return None
