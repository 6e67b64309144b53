"""What the trainer needs from a task, and the registry of named tasks."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from aepo.rollout.rewards import RewardFn
from aepo.rollout.tools.base import Tool

Sample = Mapping[str, Any]  # at least "prompt" (text) and what the reward reads ("answers")


class Task(Protocol):
    """Optional class attribute ``metric_group``: a sample field (e.g. ``"hops"``) by whose
    values the trainer also logs exact match (``em_1hop``, ``em_2hop``, ...)."""

    name: str
    reward: RewardFn  # (response_text, sample) -> RewardResult

    def samples(self, split: str) -> Sequence[Sample]:
        """ "train" or "eval" samples, in a fixed order."""
        ...

    def tools(self) -> dict[str, Tool]:
        """Tag name -> tool, fresh for this process."""
        ...

    def build_model(self, path: Path, seed: int) -> Path:
        """Create the task's default starting model (HF folder) at ``path``."""
        ...


_REGISTRY: dict[str, Callable[..., Task]] = {}
TASK_MODULES = ("aepo.tasks.toy", "aepo.tasks.synthhop.task", "aepo.tasks.qa")


def register(name: str):
    def wrap(factory):
        _REGISTRY[name] = factory
        return factory

    return wrap


def task_class(name: str, module: str | None = None) -> Callable[..., Task]:
    """The registered factory of task ``name`` (``module`` imported first); unknown names
    list the registered ones."""
    for name_ in (*TASK_MODULES, *([module] if module else [])):  # each registers on import
        importlib.import_module(name_)
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


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
    if getattr(factory, "uses_cache_dir", False) and cache_dir is not None:
        options.setdefault("cache_dir", str(cache_dir))
    return factory(**options)
