"""Toy single-hop lookup task ("where does <name> live?") and a tiny agent for it.

A generated corpus, gold search-then-answer trajectories, and a Llama model trained on them for
a few seconds so that it emits search calls and answers. Used by the rollout integration tests
and the rollout benchmark; the real demo task is SynthHop.
"""

from __future__ import annotations

import random
from pathlib import Path

from aepo.models import build_model, save, train_lm, train_tokenizer
from aepo.rollout.rewards import QAReward, RewardConfig
from aepo.rollout.tools.search import Document, SearchTool
from aepo.tasks.base import Task, register

NAMES = [
    "alba",
    "bruno",
    "ciro",
    "dana",
    "elio",
    "fara",
    "gino",
    "hana",
    "ivo",
    "juno",
    "kira",
    "luca",
    "mara",
    "nico",
    "olga",
    "pia",
]
CITIES = ["rome", "oslo", "lima", "kyiv", "doha", "bern", "riga", "baku"]


def corpus(seed: int = 0) -> dict[str, str]:
    """name -> document text."""
    rng = random.Random(seed)
    return {n: f"{n} lives in {rng.choice(CITIES)} and works as a baker ." for n in NAMES}


def prompt(name: str) -> str:
    return f"question : where does {name} live ? answer with search .\n"


def gold(name: str, docs: dict[str, str]) -> str:
    city = docs[name].split()[3]
    return (
        f"{prompt(name)}<search> {name} </search>\n<result>\n{docs[name]}\n</result>\n"
        f"<answer> {city} </answer>"
    )


def build(path: Path, steps: int = 150, seed: int = 0) -> Path:
    docs = corpus(seed)
    texts = [gold(n, docs) for n in NAMES]
    tok = train_tokenizer(texts + list(docs.values()), vocab_size=300)
    model = build_model(tok, hidden=64, layers=2, heads=2, seed=seed)
    train_lm(model, tok, texts, steps=steps, batch_size=16, lr=3e-3, seed=seed)
    return save(model, tok, path)


@register("toy")
class ToyTask(Task):
    """The toy lookup task behind the :class:`~aepo.tasks.base.Task` interface."""

    name = "toy"

    def __init__(self, seed: int = 0, sft_steps: int = 150):
        self.seed, self.sft_steps = seed, sft_steps
        self.docs = corpus(seed)
        self.reward = QAReward(RewardConfig(metric="em", bonus_tools=("search",)))

    def samples(self, split: str) -> list[dict]:
        return [{"prompt": prompt(n), "answers": [self.docs[n].split()[3]]} for n in NAMES]

    def tools(self) -> dict:
        docs = [Document(n, n, text) for n, text in self.docs.items()]
        return {"search": SearchTool(docs, top_k=1)}

    def build_model(self, path: Path, seed: int) -> Path:
        return build(path, steps=self.sft_steps, seed=seed)
