"""aepo: Agentic Entropy-Balanced Policy Optimization for tool-using LLM agents.

Light at import: ``import aepo`` loads nothing heavy; use the subpackages
(``aepo.kernels``, ...) directly.
"""

__version__ = "0.1.0.dev0"
