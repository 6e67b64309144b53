"""Fused vocabulary kernels: per-token log-probs and entropy in one pass over the logits.

Importing this package pulls in torch, triton and :mod:`aepo.objectives` only (no vLLM, no
DeepSpeed), so other trainers can take the fused ops and loss alone.
"""

from aepo.kernels.api import BACKENDS, logprobs_and_entropy, resolve_backend
from aepo.kernels.fused_loss import fused_policy_loss
from aepo.kernels.reference import naive_logprobs_and_entropy

__all__ = [
    "BACKENDS",
    "fused_policy_loss",
    "logprobs_and_entropy",
    "naive_logprobs_and_entropy",
    "resolve_backend",
]
