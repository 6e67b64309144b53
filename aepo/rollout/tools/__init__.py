"""Tools the policy calls between generation segments: ``tool(text) -> ToolOutput``.

``PythonTool`` runs model-written code in an OS sandbox (:mod:`aepo.rollout.tools.sandbox`).
"""

from aepo.rollout.tools.base import Tool, ToolOutput
from aepo.rollout.tools.python_tool import PythonTool
from aepo.rollout.tools.search import Document, HTTPSearchTool, SearchTool

__all__ = ["Document", "HTTPSearchTool", "PythonTool", "SearchTool", "Tool", "ToolOutput"]
