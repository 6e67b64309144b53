"""A fault-injection task for the non-finite guard test: the toy task whose reward is NaN for
every trajectory of the given steps on the given ranks (``aepo train ... task.module=
tests.train.nan_task task.name=toy-nan task.options.nan_steps=[1]``)."""

from __future__ import annotations

import os

from aepo.rollout.rewards import RewardResult
from aepo.tasks.base import register
from aepo.tasks.toy import ToyTask


@register("toy-nan")
class NaNRewardTask(ToyTask):
    """Options: nan_steps (steps whose rewards are NaN), nan_ranks (ranks that see them; all
    when None), per_step (trajectories scored per rank per step: prompts_per_step x k)."""

    name = "toy-nan"

    def __init__(self, nan_steps=(), nan_ranks=None, per_step: int = 8, **kw):
        super().__init__(**kw)
        self.nan_steps, self.nan_ranks, self.per_step = set(nan_steps), nan_ranks, per_step
        self.calls = 0
        clean = self.reward

        def reward(text, sample) -> RewardResult:
            step = self.calls // self.per_step
            self.calls += 1
            rank = int(os.environ.get("RANK", "0"))
            res = clean(text, sample)
            if step in self.nan_steps and (self.nan_ranks is None or rank in self.nan_ranks):
                return RewardResult(float("nan"), res.em, res.f1, res.format_ok, res.reason)
            return res

        self.reward = reward
