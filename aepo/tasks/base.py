"""What the trainer needs from a task, and the registry of named tasks."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aepo.rollout.rewards import RewardFn
from aepo.rollout.tools.base import Tool

Sample = Mapping[str, Any]  # at least "prompt" (text) and what the reward reads ("answers")


class Task:
    """What the trainer and ``aepo eval`` take from a task: subclass it (a registered factory
    must build one) and override what the task has. The members with a default here are the
    optional ones; nothing else is looked up on a task.

    Class attributes:
        name: the registered name.
        metric_group: a sample field (e.g. ``"hops"``) by whose values the trainer and the
            evaluation also report exact match (``em_1hop``, ``em_2hop``, ...); None: none.
        uses_cache_dir: the factory takes ``cache_dir=`` (the run's cache folder, e.g. for a
            search index) unless the task options set one.
    Instance attribute ``reward``: ``(response_text, sample) -> RewardResult``.
    """

    name: str = "task"
    metric_group: str | None = None
    uses_cache_dir: bool = False
    reward: RewardFn

    def samples(self, split: str) -> Sequence[Sample]:
        """ "train" or "eval" samples, in a fixed order."""
        raise NotImplementedError(f"task {self.name!r} has no samples()")

    def tools(self) -> dict[str, Tool]:
        """Tag name -> tool, fresh for this process."""
        raise NotImplementedError(f"task {self.name!r} has no tools()")

    def build_model(self, path: Path, seed: int) -> Path:
        """Create the task's default starting model (HF folder) at ``path``."""
        raise NotImplementedError(f"task {self.name!r} has no default model: set model.path")

    def protocol(self, tokenizer) -> dict[str, Any]:
        """Rollout settings of the task's tags for this tokenizer (tool_tags, result_tag,
        answer_tag, result_open / result_close: :class:`~aepo.rollout.tree.RolloutConfig`
        fields); {}: the rollout's defaults."""
        return {}

    def encode_prompt(self, sample: Sample, tokenizer) -> list[int]:
        """Prompt token ids of ``sample`` (e.g. through a chat template)."""
        return tokenizer.encode(sample["prompt"])

    @staticmethod
    def check_options(options: Mapping[str, Any]) -> Any:
        """Validate the task options before a run starts (raise ValueError naming the key)."""
        return None


def group_label(group_by: str, value) -> str:
    """Metric-name suffix of one :attr:`Task.metric_group` value: ``2hop`` for hops=2, else
    ``<field>=<value>``."""
    return f"{value}hop" if group_by == "hops" else f"{group_by}={value}"


_REGISTRY: dict[str, type[Task]] = {}
TASK_MODULES = ("aepo.tasks.toy", "aepo.tasks.synthhop.task", "aepo.tasks.qa")


def register(name: str):
    def wrap(factory):
        _REGISTRY[name] = factory
        return factory

    return wrap


def task_class(name: str, module: str | None = None) -> type[Task]:
    """The registered :class:`Task` subclass ``name`` (``module`` imported first); unknown
    names list the registered ones."""
    for name_ in (*TASK_MODULES, *([module] if module else [])):  # each registers on import
        importlib.import_module(name_)
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    factory = _REGISTRY[name]
    if not (isinstance(factory, type) and issubclass(factory, Task)):
        raise TypeError(
            f"task {name!r} is registered as {factory!r}, which is not a subclass of "
            "aepo.tasks.base.Task"
        )
    return factory


def get_task(
    name: str,
    options: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    module: str | None = None,
) -> Task:
    """Instantiate a registered task; unknown names list the registered ones. ``module`` (the
    config's ``task.module``) is imported first, so it can :func:`register` tasks of its own.
    A task class with ``uses_cache_dir = True`` gets ``cache_dir`` (e.g. the run's, for a
    search index) unless its options set one."""
    factory, options = task_class(name, module), dict(options or {})
    if factory.uses_cache_dir and cache_dir is not None:
        options.setdefault("cache_dir", str(cache_dir))
    return factory(**options)
