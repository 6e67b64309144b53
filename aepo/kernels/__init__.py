"""Fused vocabulary kernels: per-token log-probs and entropy in one pass over the logits.

Importing this package pulls in torch and triton only (no vLLM, no DeepSpeed), so other
trainers can take the fused ops alone.
"""

from aepo.kernels.api import BACKENDS, logprobs_and_entropy, resolve_backend
from aepo.kernels.reference import naive_logprobs_and_entropy

__all__ = [
    "BACKENDS",
    "logprobs_and_entropy",
    "naive_logprobs_and_entropy",
    "resolve_backend",
]
