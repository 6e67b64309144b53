"""Tools the policy calls between generation segments: ``tool(text) -> ToolOutput``.

``PythonTool`` runs model-written code in an OS sandbox (:mod:`aepo.rollout.tools.sandbox`);
``ToolRunner`` runs calls with a deadline, so a hung or failing tool never stalls the rollout.
"""

from aepo.rollout.tools.base import Tool, ToolOutput
from aepo.rollout.tools.python_tool import PythonTool
from aepo.rollout.tools.runner import ToolRunner
from aepo.rollout.tools.search import Document, HTTPSearchTool, SearchTool

__all__ = [
    "Document",
    "HTTPSearchTool",
    "PythonTool",
    "SearchTool",
    "Tool",
    "ToolOutput",
    "ToolRunner",
]
