"""``HFEngine``: the engine interface over a ``transformers`` causal LM, for users without vLLM.

A plain sampling loop with the model's KV cache, one request at a time with its own
``torch.Generator`` (so every request is reproducible from its seed). Log-probs are those of
the sampling distribution (after temperature, top-k and top-p), as in ``VLLMEngine``; the
entropy estimate uses the same top-k estimator.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from aepo.rollout.engines.base import GenRequest, GenResult, SamplingConfig, topk_entropy


def sampling_logprobs(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """[V] logits -> [V] fp32 log-probs of the sampling distribution (-inf where excluded)."""
    z = logits.float() / (s.temperature if s.temperature > 0 else 1.0)
    if 0 < s.top_k < z.numel():
        kth = torch.topk(z, s.top_k).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_z, order = torch.sort(z, descending=True)
        probs = torch.softmax(sorted_z, -1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix reaching top_p
        z = z.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return torch.log_softmax(z, -1)


class HFEngine:
    """Args: model: a ``transformers`` causal LM; tokenizer: its tokenizer (for stop strings)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.vocab_size = model.config.vocab_size
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def generate(
        self, requests: Sequence[GenRequest], sampling: SamplingConfig, stop: Sequence[str]
    ) -> list[GenResult]:
        return [self._one(r, sampling, stop) for r in requests]

    def _one(self, r: GenRequest, s: SamplingConfig, stop: Sequence[str]) -> GenResult:
        gen = torch.Generator(device=self.device).manual_seed(r.seed)
        out = self.model(input_ids=torch.tensor([r.token_ids], device=self.device), use_cache=True)
        toks: list[int] = []
        lps: list[float] = []
        ents: list[float] = []
        text = ""
        for _ in range(max(r.max_tokens, 1)):
            lp = sampling_logprobs(out.logits[0, -1], s)
            if s.temperature > 0:
                tok = int(torch.multinomial(lp.exp(), 1, generator=gen))
            else:
                tok = int(lp.argmax())
            toks.append(tok)
            lps.append(float(lp[tok]))
            ents.append(topk_entropy(torch.topk(lp, min(s.logprobs_k, lp.numel())).values.tolist()))
            if tok == self.tokenizer.eos_token_id:
                return GenResult(toks, lps, ents, "stop", None)
            prev, text = text, self.tokenizer.decode(toks)
            hit = next((st for st in stop if st in text[max(0, len(prev) - len(st)) :]), None)
            if hit is not None:
                return GenResult(toks, lps, ents, "stop", hit)
            out = self.model(
                input_ids=torch.tensor([[tok]], device=self.device),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        return GenResult(toks, lps, ents, "length", None)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the model in place."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                params[name].copy_(tensor)
