"""The entropy-balanced tree rollout (AEPO_SPEC section 3) over any :class:`Engine`.

Rounds of batched generation: every active path samples its next segment (up to a tool-call
stop string, the answer, EOS or the length budget); tool calls run on threads with a deadline
(:class:`ToolRunner`: a hung or failing tool gives an ``ok=False`` result, never a stall) and
their results are appended with mask 0; after the first W tokens that follow tool result t, the
path's :class:`PromptPlanner` decides whether to fork Z new paths at the end of result t.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from aepo.rollout.branching import BranchConfig, BranchDecision, PromptPlanner, seed_for
from aepo.rollout.engines.base import Engine, GenRequest, GenResult, SamplingConfig
from aepo.rollout.tools.base import Tool, ToolOutput
from aepo.rollout.tools.runner import ToolRunner
from aepo.rollout.trajectory import Segment, ToolCall, Trajectory


@dataclass(frozen=True)
class RolloutConfig:
    branch: BranchConfig = field(default_factory=BranchConfig)  # k, mode, tau, gamma, ...
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # temperature, top-k lp
    max_response_tokens: int = 512  # response budget per trajectory (sampled + tool results)
    max_tool_calls: int = 6  # a further call ends the trajectory ("max_tool_calls")
    max_result_tokens: int = 128  # tool result text is truncated to this many tokens
    window: int = 20  # W: tokens of a segment whose mean entropy is its H_seg
    tool_tags: tuple[str, ...] = ("search", "python")  # <tag>query</tag> calls tool "tag"
    answer_tag: str = "answer"  # </answer> ends the trajectory
    result_tag: str = "result"  # tool results are inserted as \n<result>\n...\n</result>\n
    result_open: str | None = None  # text before a result instead (e.g. a chat template's
    result_close: str | None = None  # tool turn around <result>...</result>); see response_text
    seed: int = 0  # run seed; every draw derives from (seed, step, prompt, path, ...)
    tool_workers: int = 4  # tool calls run concurrently in this many threads
    tool_timeout_s: float = 30.0  # a call still running after this gets error="timeout"
    max_hung_calls: int = 8  # per tool: abandoned calls still running before it is skipped


@dataclass
class RolloutOutput:
    """What one :meth:`TreeRollout.run` produced. Among ``stats``: ``tool_timeouts`` counts
    results with ``error="timeout"`` (the runner's deadline or a tool's own), ``tool_errors``
    every other ``ok=False`` result (exceptions, bad returns, a tool's own error outputs)."""

    trajectories: list[Trajectory]  # grouped by prompt, exactly k per prompt, by path id
    decisions: list[BranchDecision]
    stats: dict[str, float]  # counters for the run: rounds, tokens, tool calls, seconds, ...


class TreeRollout:
    """Runs a batch of prompts to k finished trajectories each.

    Args:
        engine: generation backend (vLLM, HF, or a scripted one in tests).
        tokenizer: HF-style tokenizer (``encode(text, add_special_tokens=False)``,
            ``decode(ids)``); only tool results are ever encoded, sampled tokens never are.
        tools: tag name -> tool. Calls run on daemon threads; one past ``tool_timeout_s``
            is answered with ``error="timeout"`` and its thread abandoned, never waited for
            (see :mod:`aepo.rollout.tools.runner` for how many may pile up).
    """

    def __init__(self, engine: Engine, tokenizer, tools: Mapping[str, Tool], config=None):
        self.engine, self.tokenizer = engine, tokenizer
        self.config = config or RolloutConfig()
        c = self.config
        self.runner = ToolRunner(tools, c.tool_workers, c.tool_timeout_s, c.max_hung_calls)
        self.tools = self.runner.tools  # tag name -> tool, as the runner calls them
        self._stops = [f"</{t}>" for t in c.tool_tags] + [f"</{c.answer_tag}>"]
        tags = "|".join(map(re.escape, c.tool_tags))
        self._call_re = re.compile(rf"<({tags})>(.*?)</\1>", re.S)
        self._log_v = math.log(engine.vocab_size)
        opening = f"\n<{c.result_tag}>\n" if c.result_open is None else c.result_open
        closing = f"\n</{c.result_tag}>\n" if c.result_close is None else c.result_close
        self._open = tokenizer.encode(opening, add_special_tokens=False)
        self._close = tokenizer.encode(closing, add_special_tokens=False)

    def response_text(self, t: Trajectory) -> str:
        """The response as the reward reads it (special tokens dropped). With custom result
        wrappers (a chat template's tool turn) each inserted result is written back as
        ``\n<result>\n...\n</result>\n``, so the format gate sees the same text whatever the
        model saw."""
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        c = self.config
        if c.result_open is None and c.result_close is None:
            return decode(t.response_ids)
        parts, pos = [], 0
        for call in t.tool_calls:
            parts.append(decode(t.response_ids[pos : call.start]))
            parts.append(f"\n<{c.result_tag}>\n{call.text}\n</{c.result_tag}>\n")
            pos = call.end
        parts.append(decode(t.response_ids[pos:]))
        return "".join(parts)

    def run(self, prompts: Sequence[list[int]], step: int = 0, group_offset: int = 0):
        c, t0 = self.config, time.perf_counter()
        planners = [PromptPlanner(c.branch, i, c.seed, step) for i in range(len(prompts))]
        paths = [
            Trajectory(i, group_offset + i, pid, list(p))
            for i, p in enumerate(prompts)
            for pid in planners[i].start()
        ]
        stats = dict.fromkeys(
            (
                "rounds",
                "requests",
                "context_tokens",
                "cached_tokens",
                "generated_tokens",
                "tool_calls",
                "tool_errors",
                "tool_timeouts",
            ),
            0.0,
        )
        while True:
            active = [t for t in paths if not t.finished]
            if active:
                paths += self._round(active, planners, step, stats)
            new = [t for i, p in enumerate(planners) for t in self._schedule(p, paths, i)]
            if not active and not new:
                break
            paths += new
        paths.sort(key=lambda t: (t.prompt, t.path))
        stats["seconds"] = time.perf_counter() - t0
        decisions = [d for p in planners for d in p.decisions]
        stats["branches"] = float(sum(len(d.children) for d in decisions))
        return RolloutOutput(paths, decisions, stats)

    def _round(self, active, planners, step, stats) -> list[Trajectory]:
        c = self.config
        requests = []
        for t in active:
            t.generations += 1
            seed = seed_for(c.seed, step, t.prompt, t.path, t.generations)
            requests.append(
                GenRequest(t.context, c.max_response_tokens - len(t.response_ids), seed)
            )
        results = self.engine.generate(requests, c.sampling, self._stops)
        stats["rounds"] += 1
        stats["requests"] += len(requests)
        stats["context_tokens"] += sum(len(r.token_ids) for r in requests)
        stats["cached_tokens"] += sum(r.num_cached_tokens for r in results)
        stats["generated_tokens"] += sum(len(r.token_ids) for r in results)
        calls = [(t, q) for t, r in zip(active, results, strict=True) if (q := self._absorb(t, r))]
        outputs = self.runner.map([q for _, q in calls])
        for (t, (tool, query)), out in zip(calls, outputs, strict=True):
            self._insert(t, tool, query, out)
        stats["tool_calls"] += len(calls)
        stats["tool_timeouts"] += sum(not o.ok and o.error == "timeout" for o in outputs)
        stats["tool_errors"] += sum(not o.ok and o.error != "timeout" for o in outputs)
        forks = []
        for t in active:
            seg = t.segments[-1]
            if seg.after_tool is not None and planners[t.prompt].m is not None:
                forks += self._decide(planners[t.prompt], t, seg)
        return forks

    def _absorb(self, t: Trajectory, r: GenResult) -> tuple[str, str] | None:
        """Append one generated segment; return (tool, query) when it ends in a tool call."""
        c = self.config
        start = len(t.response_ids)
        t.cached_tokens += r.num_cached_tokens
        t.add_sampled(list(r.token_ids), list(r.logprobs), list(r.entropies))
        window = r.entropies[: c.window]
        h_seg = (sum(window) / len(window) / self._log_v) if window else 0.0
        after = len(t.tool_calls) - 1 if t.tool_calls and t.tool_calls[-1].end == start else None
        t.segments.append(Segment(start, len(t.response_ids), after, h_seg))
        if start == 0:
            t.root_h = h_seg
        tool = r.stop[2:-1] if r.stop and r.stop[2:-1] in c.tool_tags else None
        if tool is None:
            answered = r.stop == f"</{c.answer_tag}>"
            reason = "answer" if answered else ("eos" if r.finish_reason == "stop" else "length")
            return self._finish(t, reason)
        if len(t.tool_calls) >= c.max_tool_calls:
            return self._finish(t, "max_tool_calls")
        text = self.tokenizer.decode(r.token_ids)
        calls = self._call_re.findall(text)
        if calls and calls[-1][0] == tool:
            return tool, calls[-1][1].strip()
        return tool, text.rsplit(f"</{tool}>", 1)[0].rsplit(f"<{tool}>", 1)[-1].strip()

    @staticmethod
    def _finish(t: Trajectory, reason: str) -> None:
        t.finished, t.finish_reason = True, reason

    def _insert(self, t: Trajectory, tool: str, query: str, out: ToolOutput) -> None:
        """Append a tool result: truncated to the token budget, wrapped, mask 0."""
        ids = self.tokenizer.encode(out.text, add_special_tokens=False)[
            : self.config.max_result_tokens
        ]
        start = len(t.response_ids)
        t.add_inserted(self._open + ids + self._close)
        t.tool_calls.append(
            ToolCall(
                tool,
                query,
                self.tokenizer.decode(ids),
                out.ok,
                out.error,
                start,
                len(t.response_ids),
                out.elapsed_s,
            )
        )
        if len(t.response_ids) >= self.config.max_response_tokens:
            self._finish(t, "length")

    def _decide(self, planner: PromptPlanner, t: Trajectory, seg: Segment) -> list[Trajectory]:
        """Branch decision at the tool step ``seg`` follows (aligned timing); returns forks."""
        d = planner.decide(t.path, seg.after_tool, seg.h_seg, t.root_h, t.streak)
        t.streak = t.streak + 1 if d.branched else 0
        return [t.fork(pid, seg.start) for pid in d.children]

    def _schedule(self, planner: PromptPlanner, paths, prompt: int) -> list[Trajectory]:
        """New paths for one prompt: after its probe, the other m - 1 roots and the probe's
        deferred decisions; and a fresh root whenever it has budget but no active path."""
        mine = [t for t in paths if t.prompt == prompt]
        new: list[Trajectory] = []
        if planner.needs_probe:
            probe = mine[0]
            if not probe.finished:
                return []
            h_tool = [s.h_seg for s in probe.segments if s.after_tool is not None]
            ids = planner.set_global_budget(probe.root_h or 0.0, h_tool)
            new += [Trajectory(prompt, probe.group, pid, list(probe.prompt_ids)) for pid in ids]
            probe.streak = 0
            for seg in probe.segments:
                if seg.after_tool is not None:
                    new += self._decide(planner, probe, seg)
        if not any(not t.finished for t in mine + new) and planner.budget_left:
            root = mine[0]
            new += [
                Trajectory(prompt, root.group, pid, list(root.prompt_ids))
                for pid in planner.refill()
            ]
        return new
