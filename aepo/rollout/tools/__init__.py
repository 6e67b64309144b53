"""Tools the policy calls between generation segments: ``tool(text) -> ToolOutput``.

``PythonTool`` lives in :mod:`aepo.rollout.tools.python_tool` (OS sandbox).
"""

from aepo.rollout.tools.base import Tool, ToolOutput
from aepo.rollout.tools.search import Document, HTTPSearchTool, SearchTool

__all__ = ["Document", "HTTPSearchTool", "SearchTool", "Tool", "ToolOutput"]
