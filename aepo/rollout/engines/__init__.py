"""Generation engines behind one interface: :class:`~aepo.rollout.engines.base.Engine`.

``VLLMEngine`` (aepo.rollout.engines.vllm) and ``HFEngine`` (aepo.rollout.engines.hf) are
imported from their own modules so that importing this package pulls in neither.
"""

from aepo.rollout.engines.base import Engine, GenRequest, GenResult, SamplingConfig, topk_entropy

__all__ = ["Engine", "GenRequest", "GenResult", "SamplingConfig", "topk_entropy"]
