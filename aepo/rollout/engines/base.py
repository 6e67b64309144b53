"""Engine interface: batched, token-in token-out segment generation with per-token log-probs
and an entropy estimate from the top-k log-probs."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # the policy's sampling temperature (the trainer divides by it too)
    top_p: float = 1.0  # nucleus sampling; 1 keeps the full distribution
    top_k: int = -1  # -1 keeps the full distribution
    logprobs_k: int = 20  # top-k log-probs per position for the entropy estimate (vLLM: <= 20)


@dataclass(frozen=True)
class GenRequest:
    token_ids: list[int]  # the whole context: prompt + response so far
    max_tokens: int  # new tokens at most
    seed: int  # per-request sampling seed


@dataclass(frozen=True)
class GenResult:
    token_ids: list[int]  # sampled tokens, exactly as sampled (never re-tokenised)
    logprobs: list[float]  # log-prob of each sampled token under the sampling distribution
    entropies: list[float]  # per-token entropy estimate (:func:`topk_entropy`)
    finish_reason: str  # "stop" (stop string or EOS) or "length"
    stop: str | None  # the stop string that ended it, if any
    num_cached_tokens: int = 0  # context tokens served from the prefix cache


class Engine(Protocol):
    vocab_size: int

    def generate(
        self, requests: Sequence[GenRequest], sampling: SamplingConfig, stop: Sequence[str]
    ) -> list[GenResult]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...


def topk_entropy(logprobs: Iterable[float]) -> float:
    """Entropy estimate from the top-k log-probs of one position.

    H ~= -sum_i p_i log p_i over the k listed tokens, plus the leftover mass
    q = 1 - sum_i p_i treated as one more outcome (-q log q). It never exceeds the true
    entropy (merging outcomes lowers entropy) and equals it when the k tokens hold all the mass.
    Every run of this project uses this estimator for segment entropies.
    """
    h, total = 0.0, 0.0
    for lp in logprobs:
        if lp == -math.inf:
            continue
        p = math.exp(lp)
        h -= p * lp
        total += p
    rest = 1.0 - total
    if rest > 1e-12:
        h -= rest * math.log(rest)
    return h
