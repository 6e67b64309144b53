"""Small models built from nothing: a byte-level BPE tokenizer trained on the project's own
text and a Llama-style causal LM created from config, saved as normal HF folders (no hub).

Tool tags are added as ordinary (non-special) tokens so that they survive decoding with
``skip_special_tokens`` (vLLM's default) and stop strings match them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

TAGS = (
    "<search>",
    "</search>",
    "<python>",
    "</python>",
    "<result>",
    "</result>",
    "<answer>",
    "</answer>",
)
SPECIAL = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, tags: Sequence[str] = TAGS):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` plus the tag tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in tags])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)


def build_model(
    tokenizer,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    max_positions: int = 1024,
    seed: int = 0,
    tie_embeddings: bool = False,
):
    """A randomly initialised ``LlamaForCausalLM`` (fp32). head_dim = hidden / heads must be
    at least 32 for vLLM's CPU attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % heads or hidden // heads < 32:
        raise ValueError(f"hidden / heads must be an integer >= 32, got {hidden} / {heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_embeddings,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save(model, tokenizer, path: str | Path) -> Path:
    """Write an HF folder that ``from_pretrained`` and vLLM load offline."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def train_lm(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    loss_from: str | None = None,
) -> list[float]:
    """Plain next-token training on ``texts`` (AdamW, cosine decay); returns the loss curve.

    ``loss_from``: when given, only tokens after the first occurrence of this string in each
    text are trained on (e.g. the response after the prompt).
    """
    gen = torch.Generator().manual_seed(seed)
    enc = [[*tokenizer.encode(t), tokenizer.eos_token_id] for t in texts]
    starts = [_start(tokenizer, t, loss_from) for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(enc), (batch_size,), generator=gen).tolist()
        ids, labels = _pad([enc[i] for i in idx], [starts[i] for i in idx], tokenizer.pad_token_id)
        attention = ids != tokenizer.pad_token_id
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def _start(tokenizer, text: str, marker: str | None) -> int:
    if marker is None or marker not in text:
        return 0
    return len(tokenizer.encode(text[: text.index(marker) + len(marker)]))


def _pad(seqs, starts, pad_id):
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), n), -100, dtype=torch.long)
    for i, (s, st) in enumerate(zip(seqs, starts, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, st : len(s)] = torch.tensor(s[st:])
    return ids, labels
