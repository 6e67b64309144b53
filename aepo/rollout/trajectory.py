"""Rollout state: one :class:`Trajectory` per path of a prompt's tree, and the flattening of a
batch of trees into training tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Segment:
    """A stretch of policy-sampled response tokens [start, end)."""

    start: int
    end: int
    after_tool: int | None  # index of the tool call this segment follows; None for the root
    h_seg: float  # mean entropy of its first W tokens / ln|V|


@dataclass(frozen=True)
class ToolCall:
    tool: str
    query: str
    text: str  # result text as inserted (after truncation)
    ok: bool
    error: str | None
    start: int  # result token span [start, end) in the response, mask 0
    end: int
    elapsed_s: float = 0.0


@dataclass
class Trajectory:
    """One path: prompt, then segments the policy sampled interleaved with tool results.

    Per response token: ``loss_mask`` (1 sampled, 0 tool result), ``logprobs`` (rollout
    log-prob of sampled tokens, 0 elsewhere), ``entropy`` (the engine's per-token estimate).
    """

    prompt: int  # index of the prompt in its batch
    group: int  # group id (one per prompt) for advantages
    path: int  # id of this path within its group
    prompt_ids: list[int]
    parent: int | None = None  # path it was forked from
    fork_pos: int | None = None  # response length at the fork (end of a tool result)
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    root_h: float | None = None  # H_seg of the lineage's first segment
    streak: int = 0  # consecutive tool steps at which this lineage branched
    generations: int = 0  # engine calls made for this path (seeds)
    cached_tokens: int = 0  # prompt tokens vLLM served from its prefix cache
    finished: bool = False
    finish_reason: str | None = None  # answer, eos, length, max_tool_calls
    reward: float | None = None

    def add_sampled(self, ids, logprobs, entropy) -> None:
        self.response_ids += ids
        self.loss_mask += [1] * len(ids)
        self.logprobs += logprobs
        self.entropy += entropy

    def add_inserted(self, ids) -> None:
        self.response_ids += ids
        self.loss_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.entropy += [0.0] * len(ids)

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def fork(self, path: int, pos: int) -> Trajectory:
        """A new path sharing this one's first ``pos`` response tokens (a tool result's end)."""
        return Trajectory(
            prompt=self.prompt,
            group=self.group,
            path=path,
            prompt_ids=list(self.prompt_ids),
            parent=self.path,
            fork_pos=pos,
            response_ids=self.response_ids[:pos],
            loss_mask=self.loss_mask[:pos],
            logprobs=self.logprobs[:pos],
            entropy=self.entropy[:pos],
            segments=[s for s in self.segments if s.end <= pos],
            tool_calls=[c for c in self.tool_calls if c.end <= pos],
            root_h=self.root_h,
            streak=self.streak,
        )


@dataclass
class TrainBatch:
    """Right-padded training tensors; every per-token field is aligned with ``input_ids``."""

    input_ids: torch.Tensor  # [B, L] prompt + response
    attention_mask: torch.Tensor  # [B, L] 1 for real tokens
    loss_mask: torch.Tensor  # [B, L] 1 where the token was sampled by the policy
    rollout_logprobs: torch.Tensor  # [B, L] rollout log-prob of each sampled token
    group_ids: torch.Tensor  # [B]
    rewards: torch.Tensor  # [B] (NaN where not scored)
    prompt_lengths: torch.Tensor  # [B]


def flatten(trajectories: list[Trajectory], pad_id: int) -> TrainBatch:
    """Stack trajectories (each exactly once: never padded by duplication) into tensors."""
    if not trajectories:
        raise ValueError("flatten() needs at least one trajectory")
    length = max(len(t.prompt_ids) + len(t.response_ids) for t in trajectories)
    b = len(trajectories)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    attn = torch.zeros(b, length, dtype=torch.long)
    mask = torch.zeros(b, length, dtype=torch.float32)
    logp = torch.zeros(b, length, dtype=torch.float32)
    for i, t in enumerate(trajectories):
        p, n = len(t.prompt_ids), len(t.prompt_ids) + len(t.response_ids)
        ids[i, :n] = torch.tensor(t.prompt_ids + t.response_ids)
        attn[i, :n] = 1
        mask[i, p:n] = torch.tensor(t.loss_mask, dtype=torch.float32)
        logp[i, p:n] = torch.tensor(t.logprobs, dtype=torch.float32)
    rewards = [float("nan") if t.reward is None else t.reward for t in trajectories]
    return TrainBatch(
        input_ids=ids,
        attention_mask=attn,
        loss_mask=mask,
        rollout_logprobs=logp,
        group_ids=torch.tensor([t.group for t in trajectories]),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        prompt_lengths=torch.tensor([len(t.prompt_ids) for t in trajectories]),
    )
