"""The rollout side of a run, from its :class:`~aepo.train.config.TrainConfig`: the rollout's
settings and the generation engine, shared by ``aepo train`` and ``aepo eval``."""

from __future__ import annotations

import dataclasses

import torch

from aepo.rollout.branching import BranchConfig
from aepo.rollout.engines.base import SamplingConfig
from aepo.rollout.tree import RolloutConfig
from aepo.train.config import TrainConfig


def _fields_of(cls, section) -> dict:
    """The ``cls`` fields that ``section`` (the config's rollout section) sets."""
    return {
        f.name: getattr(section, f.name)
        for f in dataclasses.fields(cls)
        if hasattr(section, f.name)
    }


def rollout_config(cfg: TrainConfig, protocol: dict | None = None) -> RolloutConfig:
    """The rollout's settings: every ``rollout.*`` key that names a field of
    :class:`BranchConfig`, :class:`SamplingConfig` or :class:`RolloutConfig`, the run seed,
    and ``protocol`` (a task's tags, :meth:`~aepo.tasks.base.Task.protocol`)."""
    r = cfg.rollout
    rest = _fields_of(RolloutConfig, r)
    return RolloutConfig(
        **rest,
        branch=BranchConfig(**_fields_of(BranchConfig, r)),
        sampling=SamplingConfig(**_fields_of(SamplingConfig, r)),
        seed=cfg.run.seed,
        **(protocol or {}),
    )


def make_engine(cfg: TrainConfig, model_path: str, world: int, tokenizer):
    """The colocated generation engine: one in-process vLLM per rank (or HF)."""
    if cfg.rollout.engine == "hf":
        from transformers import AutoModelForCausalLM

        from aepo.rollout.engines.hf import HFEngine

        return HFEngine(AutoModelForCausalLM.from_pretrained(model_path), tokenizer)
    from aepo.rollout.engines.vllm import VLLMConfig, VLLMEngine

    dtype = "bfloat16" if torch.cuda.is_available() and cfg.model.dtype != "float32" else "float32"
    vcfg = VLLMConfig(
        dtype=dtype,
        cpu_kv_cache_gib=cfg.rollout.cpu_kv_cache_gib,
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        max_model_len=cfg.rollout.max_model_len,
        executor="external_launcher" if world > 1 else "uni",
        seed=cfg.run.seed,
    )
    return VLLMEngine(model_path, vcfg)
