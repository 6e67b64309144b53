"""The tool protocol: a named callable from the model's query text to a :class:`ToolOutput`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class ToolOutput:
    """What a tool call produced. Errors and timeouts are outputs too (``ok=False``): the
    rollout inserts ``text`` either way and continues."""

    text: str  # result text shown to the policy (before token-budget truncation)
    ok: bool  # False on error, timeout or refusal
    error: str | None = None  # short machine-readable reason: "timeout", "memory", ...
    elapsed_s: float = 0.0  # wall time of the call
    cached: bool = False  # served from the tool's result cache


@runtime_checkable
class Tool(Protocol):
    """``name`` is the tag the policy writes (``<search>...</search>`` calls tool "search")."""

    name: str

    def __call__(self, query: str) -> ToolOutput: ...
