"""Test doubles for rollout tests: a whitespace tokenizer and a scripted engine whose
segment entropies are drawn from a few discrete levels, so (dH, l) buckets repeat."""

from __future__ import annotations

import math

import numpy as np

from aepo.rollout.engines.base import GenResult


class WordTokenizer:
    """Whitespace tokenizer with a growing vocabulary (ids are stable within a test)."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.words)
                self.words.append(w)
            ids.append(self.vocab[w])
        return ids

    def decode(self, ids) -> str:
        return " ".join(self.words[i] for i in ids)


class ScriptedEngine:
    """Each path makes ``n_calls`` tool calls, then answers; call i uses ``tags[i % len(tags)]``
    (search only by default). A segment's per-token entropy is level * ln(V) with level drawn
    (from the request seed) from ``levels``: so H_seg = level."""

    vocab_size = 1000

    def __init__(
        self,
        tokenizer: WordTokenizer,
        n_calls: int = 3,
        levels=(0.2, 0.5, 0.8),
        seg_len: int = 4,
        tags=("search",),
    ):
        self.tok, self.n_calls, self.levels, self.seg_len = tokenizer, n_calls, levels, seg_len
        self.tags = tags
        self.requests = 0

    def generate(self, requests, sampling, stop):
        out = []
        for r in requests:
            self.requests += 1
            rng = np.random.default_rng(r.seed)
            calls = self.tok.decode(r.token_ids).count("</result>")
            level = float(rng.choice(self.levels))
            words = [f"w{int(rng.integers(50))}" for _ in range(self.seg_len)]
            if calls < self.n_calls:
                tag = self.tags[calls % len(self.tags)]
                text, stop_str = " ".join([f"<{tag}>", *words, f"</{tag}>"]), f"</{tag}>"
            else:
                text, stop_str = " ".join(["<answer>", *words, "</answer>"]), "</answer>"
            ids = self.tok.encode(text)[: r.max_tokens]
            h = level * math.log(self.vocab_size)
            out.append(GenResult(ids, [-1.0] * len(ids), [h] * len(ids), "stop", stop_str))
        return out

    def update_weights(self, named_tensors) -> None:
        raise NotImplementedError


class EchoSearch:
    name = "search"

    def __call__(self, query: str):
        from aepo.rollout.tools.base import ToolOutput

        return ToolOutput(text=f"found {query}", ok=True)
