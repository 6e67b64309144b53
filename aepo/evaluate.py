"""Held-out evaluation: one greedy (or sampled) multi-turn rollout per question, scored by the
task's reward, grouped by a sample field (e.g. hop count)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from aepo.rollout.branching import BranchConfig
from aepo.rollout.engines.base import SamplingConfig
from aepo.rollout.tree import RolloutConfig, TreeRollout


def evaluate(engine, tokenizer, tools: Mapping, samples: Sequence[Mapping], reward, *,
             group_by: str = "hops", temperature: float = 0.0, max_response_tokens: int = 256,
             max_tool_calls: int = 6, max_result_tokens: int = 96, seed: int = 0,
             batch_size: int = 256) -> dict[str, float]:  # fmt: skip
    """Exact match, F1, format rate and tool calls, overall and per ``sample[group_by]``.

    Returns keys like ``em``, ``em_2hop`` (for group_by="hops"), ``n_2hop``, ``tool_calls``.
    """
    cfg = RolloutConfig(
        branch=BranchConfig(mode="flat", k=1),
        sampling=SamplingConfig(temperature=temperature, logprobs_k=1),
        max_response_tokens=max_response_tokens,
        max_tool_calls=max_tool_calls,
        max_result_tokens=max_result_tokens,
        seed=seed,
    )
    rollout = TreeRollout(engine, tokenizer, tools, cfg)
    per_group: dict[str, list] = defaultdict(list)
    for lo in range(0, len(samples), batch_size):
        chunk = samples[lo : lo + batch_size]
        out = rollout.run([tokenizer.encode(s["prompt"]) for s in chunk])
        for t in out.trajectories:
            sample = chunk[t.prompt]
            res = reward(tokenizer.decode(t.response_ids, skip_special_tokens=True), sample)
            row = (res.em, res.f1, float(res.format_ok), float(len(t.tool_calls)))
            per_group["all"].append(row)
            per_group[group_label(group_by, sample.get(group_by))].append(row)
    return _summarise(per_group)


def group_label(group_by: str, value) -> str:
    """Metric-name suffix of one group: ``2hop`` for hops=2, else ``<field>=<value>``."""
    return f"{value}hop" if group_by == "hops" else f"{group_by}={value}"


def _summarise(per_group: dict[str, list]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, rows in sorted(per_group.items()):
        suffix = "" if name == "all" else f"_{name}"
        n = len(rows)
        for i, key in enumerate(("em", "f1", "format_ok", "tool_calls")):
            out[key + suffix] = sum(r[i] for r in rows) / n
        out["n" + suffix] = float(n)
    return out
