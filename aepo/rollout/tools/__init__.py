"""Tools the policy calls between generation segments: ``tool(text) -> ToolOutput``."""

from aepo.rollout.tools.base import Tool, ToolOutput

__all__ = ["Tool", "ToolOutput"]
