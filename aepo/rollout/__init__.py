"""Agentic rollout: trajectories, the entropy-balanced branching planner, engines, tools, rewards.

Knows nothing of training. Importing it does not import vLLM; ``aepo.rollout.engines.vllm``
does.
"""
