"""Fused vocabulary kernels: per-token log-probs and entropy in one pass over the logits, or
straight from hidden states x lm_head weight without materialising the logits.

Importing this package pulls in torch, triton and :mod:`aepo.objectives` only (no vLLM, no
DeepSpeed), so other trainers can take the fused ops and loss alone.
"""

from aepo.kernels.api import BACKENDS, logprobs_and_entropy, resolve_backend
from aepo.kernels.fused_loss import fused_policy_loss, tree_logprobs_and_entropy
from aepo.kernels.linear import fused_linear_policy_loss, linear_logprobs_and_entropy
from aepo.kernels.reference import naive_linear_logprobs_and_entropy, naive_logprobs_and_entropy
from aepo.kernels.tree_rows import unique_edges

__all__ = [
    "BACKENDS",
    "fused_linear_policy_loss",
    "fused_policy_loss",
    "linear_logprobs_and_entropy",
    "logprobs_and_entropy",
    "naive_linear_logprobs_and_entropy",
    "naive_logprobs_and_entropy",
    "resolve_backend",
    "tree_logprobs_and_entropy",
    "unique_edges",
]
