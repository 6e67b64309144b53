"""Branching policy and the tree rollout's planner, on scripted entropy traces."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

from aepo.rollout.branching import (
    BranchConfig,
    PromptPlanner,
    branch_probability,
    global_budget,
    uniform,
)
from aepo.rollout.trajectory import flatten
from aepo.rollout.tree import RolloutConfig, TreeRollout
from tests.rollout.scripted import EchoSearch, ScriptedEngine, WordTokenizer


def test_global_budget_formula():
    assert global_budget(8, 0.5, 0.5) == 4  # ceil(8 * 0.5)
    assert global_budget(8, 2.0, 0.0) == math.ceil(8 / (1 + math.exp(-1.0)))  # 6
    assert global_budget(8, -40.0, 0.0) == 1 and global_budget(8, 40.0, 0.0) == 8
    assert global_budget(1, 0.0, 3.0) == 1
    with pytest.raises(ValueError, match="k must be"):
        global_budget(0, 0.0, 0.0)


def test_branch_probability_formula_and_cutoff():
    assert branch_probability(0.0, 0) == 0.5
    assert branch_probability(1.0, 2) == pytest.approx(1 - 0.5 / 0.9 + 0.2)
    assert branch_probability(-5.0, 0) == 0.0 and branch_probability(5.0, 0) == 1.0
    assert branch_probability(5.0, 20) == 0.0  # lam * l >= 1
    assert branch_probability(0.3, 3, lam=0.0) == branch_probability(0.3, 0)


@pytest.mark.parametrize(("dh", "n"), [(0.0, 0), (0.4, 1), (-0.6, 3), (1.5, 10), (0.2, 19)])
def test_probability_is_the_law_of_the_released_rule(dh, n):
    """P equals Pr[(U + gamma dH)(1 - lam l) >= tau] for U ~ U(0, 1) (Monte Carlo, 5 sigma)."""
    u = np.random.default_rng(7).random(200_000)
    freq = float(np.mean((u + 0.2 * dh) * (1 - 0.05 * n) >= 0.5))
    p = branch_probability(dh, n)
    assert abs(freq - p) <= 5 * math.sqrt(max(p * (1 - p), 1e-4) / u.size)


def _run(mode="aepo", k=8, prompts=4, seed=0, n_calls=3, **branch):
    tok = WordTokenizer()
    engine = ScriptedEngine(tok, n_calls=n_calls)
    cfg = RolloutConfig(branch=BranchConfig(mode=mode, k=k, **branch), seed=seed, window=4)
    rollout = TreeRollout(engine, tok, {"search": EchoSearch()}, cfg)
    batch = [tok.encode(f"question {i} ?") for i in range(prompts)]
    return rollout.run(batch, step=3), engine


@pytest.mark.parametrize("mode", ["aepo", "aepo-fixed", "arpo", "flat"])
def test_exactly_k_distinct_paths_per_prompt(mode):
    out, _ = _run(mode)
    groups = defaultdict(list)
    for t in out.trajectories:
        groups[t.prompt].append(t)
        assert t.finished and t.finish_reason == "answer"
    for paths in groups.values():
        assert sorted(t.path for t in paths) == list(range(8))
        assert len({id(t) for t in paths}) == 8  # never padded by duplication
    batch = flatten(out.trajectories, pad_id=0)
    assert batch.input_ids.shape[0] == 32 and batch.group_ids.bincount().tolist() == [8] * 4
    if mode == "flat":
        assert all(t.parent is None for t in out.trajectories) and not any(
            d.branched for d in out.decisions
        )


def test_aepo_probe_is_kept_and_sets_m():
    out, _ = _run("aepo", prompts=6)
    for prompt in range(6):
        paths = [t for t in out.trajectories if t.prompt == prompt]
        probe = paths[0]
        assert probe.path == 0 and probe.parent is None  # kept as a global sample
        h_tool = [s.h_seg for s in probe.segments if s.after_tool is not None]
        m = global_budget(8, probe.root_h, sum(h_tool) / len(h_tool))
        roots = [t for t in paths if t.parent is None]
        branched = [t for t in paths if t.parent is not None]
        assert len(roots) >= m and len(roots) + len(branched) == 8
        # the first m path ids are the global samples; later roots are refills only
        assert all(t.parent is None for t in paths[:m])


def test_fixed_modes_start_half_the_budget_as_roots():
    out, _ = _run("aepo-fixed", k=8)
    first_roots = [t for t in out.trajectories if t.parent is None and t.path < 4]
    assert len(first_roots) == 4 * 4


@pytest.mark.parametrize("mode", ["aepo-fixed", "arpo"])
def test_m_fixed_sets_the_first_roots_of_fixed_modes(mode):
    def roots(**kw):
        return PromptPlanner(BranchConfig(mode=mode, k=8, **kw), prompt=0).start()

    assert roots() == [0, 1, 2, 3] and roots(m_fixed=3) == [0, 1, 2]
    assert roots(m_fixed=8) == list(range(8))
    assert PromptPlanner(BranchConfig(mode="aepo", k=8, m_fixed=3), prompt=0).start() == [0]


def test_aligned_timing_forks_and_penalty_bookkeeping():
    out, _ = _run("aepo", prompts=8, tau=0.3)
    by_key = {(t.prompt, t.path): t for t in out.trajectories}
    assert any(d.branched for d in out.decisions)
    streak = {}
    for d in out.decisions:
        t = by_key[(d.prompt, d.path)]
        seg = next(s for s in t.segments if s.after_tool == d.tool_step)
        assert d.h_seg == seg.h_seg  # the continuation after result t decides at t
        assert d.delta_h == pytest.approx(seg.h_seg - t.root_h)
        expected = streak.get((d.prompt, d.path), 0)
        assert d.consecutive == expected
        streak[(d.prompt, d.path)] = expected + 1 if d.branched else 0
        for child in d.children:  # children inherit the lineage's streak and the prefix
            c = by_key[(d.prompt, child)]
            streak[(d.prompt, child)] = expected + 1
            call = t.tool_calls[d.tool_step]
            assert (
                c.fork_pos == call.end and c.response_ids[: call.end] == t.response_ids[: call.end]
            )
            assert c.loss_mask[call.start : call.end] == [0] * (call.end - call.start)


def test_branch_frequency_matches_probability():
    """Pooled over many seeded traces, the branch frequency in each (dH, l) bucket agrees with
    branch_probability within a 4-sigma binomial bound."""
    counts = defaultdict(lambda: [0, 0])
    for seed in range(12):
        out, _ = _run("aepo", k=16, prompts=16, seed=seed, n_calls=4)
        for d in out.decisions:
            if d.reason == "draw" or (d.reason == "no budget"):
                key = (round(d.delta_h, 6), d.consecutive)
                counts[key][0] += d.draw < d.probability
                counts[key][1] += 1
    checked = 0
    for (dh, streak), (hits, n) in counts.items():
        if n < 40:
            continue
        p = branch_probability(dh, streak)
        bound = 4 * math.sqrt(max(p * (1 - p), 0.25 / n) / n)
        assert abs(hits / n - p) <= bound, (dh, streak, hits, n, p)
        checked += 1
    assert checked >= 5


def test_decisions_and_samples_are_reproducible():
    a, _ = _run("aepo", seed=5)
    b, _ = _run("aepo", seed=5)
    c, _ = _run("aepo", seed=6)
    assert [d.as_dict() for d in a.decisions] == [d.as_dict() for d in b.decisions]
    assert [t.response_ids for t in a.trajectories] == [t.response_ids for t in b.trajectories]
    assert [t.response_ids for t in a.trajectories] != [t.response_ids for t in c.trajectories]
    assert uniform(1, 2, 3) == uniform(1, 2, 3) != uniform(1, 2, 4)


def test_no_branching_still_fills_the_budget_with_fresh_roots():
    out, _ = _run("aepo", tau=10.0)  # P = 0 everywhere
    assert not any(d.branched for d in out.decisions)
    assert all(t.parent is None for t in out.trajectories) and len(out.trajectories) == 32


def test_planner_refuses_decisions_before_the_probe():
    planner = PromptPlanner(BranchConfig(mode="aepo", k=4), prompt=0)
    assert planner.start() == [0] and planner.needs_probe
    with pytest.raises(RuntimeError, match="probe"):
        planner.decide(0, 0, 0.5, 0.4, 0)


def test_bad_branch_config_is_named():
    with pytest.raises(ValueError, match="aepo, aepo-fixed, arpo, flat"):
        BranchConfig(mode="tree")
    with pytest.raises(ValueError, match="m_fixed"):
        BranchConfig(k=4, m_fixed=5)
