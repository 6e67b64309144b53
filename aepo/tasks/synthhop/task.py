"""SynthHop as a trainer task: RL samples (1-hop kept in the mix), the search tool, the reward
(1 correct / 0 wrong / -0.1 malformed or no answer), and the default starting model: the
syllable tokenizer, a small Llama and a cold-start SFT on gold trajectories."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from aepo.models import build_model, save
from aepo.rollout.rewards import QAReward, RewardConfig
from aepo.sft import sft
from aepo.tasks.base import Task, register
from aepo.tasks.synthhop.kb import KBConfig, SynthHop
from aepo.tasks.synthhop.tokenizer import build_tokenizer


@dataclass(frozen=True)
class SFTRecipe:
    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # examples per step
    lr: float = 3e-3  # peak learning rate
    multi_hop_frac: float = 0.02  # share of 2-hop gold examples (leaves RL headroom)
    hidden: int = 128  # model width (4 heads x head_dim 32)
    layers: int = 2  # transformer blocks


@register("synthhop")
class SynthHopTask(Task):
    """Args: seed: knowledge-base seed; rl_hops: hop counts of RL questions, drawn evenly
    (1-hop stays in the mix: RL on multi-hop only teaches "always search twice");
    sft: :class:`SFTRecipe` fields as a dict."""

    name = "synthhop"
    metric_group = "hops"  # the trainer logs training exact match per hop count (em_2hop, ...)

    def __init__(self, seed: int = 0, rl_hops: tuple[int, ...] = (1, 2), sft: dict | None = None,
                 kb: dict | None = None):  # fmt: skip
        # 1,600 companies: >= 300 held-out 3-hop (founder_country) questions for evaluation
        self.kb = SynthHop.build(KBConfig(seed=seed, **({"companies": 1600} | (kb or {}))))
        self.seed, self.rl_hops = seed, tuple(rl_hops)
        self.recipe = SFTRecipe(**(sft or {}))
        self.reward = QAReward(RewardConfig(metric="em", format_penalty=-0.1, tool_bonus=0.0))

    def samples(self, split: str) -> list[dict]:
        """Train: the RL hop counts interleaved (equal shares); eval: every eval question."""
        if split != "train":
            return self.kb.questions(split)
        pools = [self.kb.questions("train", hops=h) for h in self.rl_hops]
        n = min(len(p) for p in pools)
        rng = random.Random(self.seed)
        for pool in pools:
            rng.shuffle(pool)
        return [pool[i] for i in range(n) for pool in pools]

    def tools(self) -> dict:
        return {"search": self.kb.search_tool()}

    def sft_examples(self) -> list[tuple[str, str]]:
        """All 1-hop train questions plus ``multi_hop_frac`` of them as 2-hop ones."""
        one = self.kb.questions("train", hops=1)
        two = self.kb.questions("train", hops=2)
        n_two = round(self.recipe.multi_hop_frac * len(one))
        picked = one + random.Random(self.seed).sample(two, min(n_two, len(two)))
        return [(q["prompt"], self.kb.gold_response(q)) for q in picked]

    def build_model(self, path: Path, seed: int) -> Path:
        """Tokenizer + small Llama (tied embeddings) + cold-start SFT, saved at ``path``."""
        tok = build_tokenizer(self.kb)
        r = self.recipe
        model = build_model(tok, hidden=r.hidden, layers=r.layers, heads=r.hidden // 32,
                            seed=seed, tie_embeddings=True)  # fmt: skip
        sft(model, tok, self.sft_examples(), steps=r.steps, batch_size=r.batch_size, lr=r.lr,
            seed=seed)  # fmt: skip
        return save(model, tok, path)
