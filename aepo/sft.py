"""Cold-start SFT on gold tool-using trajectories (the paper's pipeline: SFT, then RL).

Each example is (prompt, response). The loss covers the response tokens the policy would
sample; the prompt and every tool result (from ``<result>`` through ``</result>``, which the
rollout inserts with mask 0) are masked out, exactly as in RL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm import tqdm


def encode_example(
    tokenizer, prompt: str | list[int], response: str, result_tag: str = "result"
) -> tuple[list[int], list[int]]:
    """-> (ids, loss mask) for prompt + response + EOS; tool-result spans get mask 0.

    ``prompt``: text (encoded as the trainer encodes a plain prompt) or token ids (e.g. a
    rendered chat template); ``<result_tag>`` and ``</result_tag>`` must be single tokens."""
    p = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    r = [*tokenizer.encode(response, add_special_tokens=False), tokenizer.eos_token_id]
    open_id = tokenizer.convert_tokens_to_ids(f"<{result_tag}>")
    close_id = tokenizer.convert_tokens_to_ids(f"</{result_tag}>")
    mask, inside = [], False
    for tok in r:
        if tok == open_id:
            inside = True
        mask.append(0 if inside else 1)
        if tok == close_id:
            inside = False
    return p + r, [0] * len(p) + mask


def sft(model, tokenizer, examples: Sequence[tuple[str, str]], *, steps: int,
        batch_size: int = 64, lr: float = 3e-3, warmup: int = 20, seed: int = 0,
        progress: bool = True) -> list[float]:  # fmt: skip
    """AdamW with linear warmup and cosine decay on masked next-token loss; returns the losses."""
    gen = torch.Generator().manual_seed(seed)
    data = [encode_example(tokenizer, p, r) for p, r in examples]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup, steps))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="sft", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(len(data), (batch_size,), generator=gen).tolist()
        ids, labels = _collate([data[i] for i in idx], tokenizer.pad_token_id)
        out = model(input_ids=ids, attention_mask=ids != tokenizer.pad_token_id, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _collate(batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    for i, (seq, mask) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        keep = torch.tensor(mask, dtype=torch.bool)
        labels[i, : len(seq)] = torch.where(keep, torch.tensor(seq), -100)
    return ids, labels
