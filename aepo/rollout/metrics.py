"""Metrics of one rollout batch, defined once for the trainer's step metrics and the rollout
benchmark (``benchmarks/bench_rollout.py``)."""

from __future__ import annotations

import statistics

from aepo.rollout.tree import RolloutOutput


def rollout_metrics(out: RolloutOutput) -> dict[str, float]:
    """Of one :meth:`~aepo.rollout.tree.TreeRollout.run`:

    - ``tool_calls_per_traj``: tool calls in a finished trajectory (a fork's inherited calls
      included: what the policy is trained on), averaged;
    - ``branches_per_group``: forks per group (prompt); ``distinct_per_group``: distinct
      responses among a group's trajectories;
    - ``response_tokens_mean``: response tokens (sampled and tool results) per trajectory;
    - ``prefix_cache_reuse``: share of the prefill (context) tokens served from the engine's
      prefix cache;
    - ``gen_tokens_per_s``: generated tokens over the rollout's own wall time;
    - ``tool_errors`` (``ok=False`` results, timeouts aside) and ``tool_timeouts`` (calls past
      a deadline): counts.
    """
    trajectories, stats = out.trajectories, out.stats
    groups: dict[int, set] = {}
    for t in trajectories:
        groups.setdefault(t.group, set()).add(tuple(t.response_ids))
    mean = lambda values: float(statistics.fmean(values)) if values else 0.0
    return {
        "tool_calls_per_traj": mean([len(t.tool_calls) for t in trajectories]),
        "branches_per_group": stats["branches"] / max(len(groups), 1),
        "distinct_per_group": mean([len(g) for g in groups.values()]),
        "response_tokens_mean": mean([len(t.response_ids) for t in trajectories]),
        "prefix_cache_reuse": stats["cached_tokens"] / max(stats["context_tokens"], 1),
        "gen_tokens_per_s": stats["generated_tokens"] / max(stats["seconds"], 1e-9),
        "tool_errors": float(stats["tool_errors"]),
        "tool_timeouts": float(stats["tool_timeouts"]),
    }
