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
    dtype = "bfloat16" if torch.cuda.is_available() and cfg.model.dtype != "float32" else "float32"
    if cfg.rollout.engine == "hf":
        from aepo.rollout.engines.hf import HFEngine

        return HFEngine(_hf_rollout_model(model_path, getattr(torch, dtype)), tokenizer)
    from aepo.rollout.engines.vllm import VLLMConfig, VLLMEngine

    vcfg = VLLMConfig(
        dtype=dtype,
        cpu_kv_cache_gib=cfg.rollout.cpu_kv_cache_gib,
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        max_model_len=cfg.rollout.max_model_len,
        executor="external_launcher" if world > 1 else "uni",
        seed=cfg.run.seed,
    )
    return VLLMEngine(model_path, vcfg)


def _hf_rollout_model(model_path: str, dtype: torch.dtype):
    """The HF rollout engine's own full copy of the model, on this rank's device in ``dtype``.

    The trainer's ``HfDeepSpeedConfig`` is alive by now, and under ZeRO-3 transformers would
    build any model inside ``zero.Init`` (partitioned, its parameters of size 0, left on the
    host): the rollout copy is loaded with it set aside."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # no public getter
    held = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=dtype)
    finally:
        if held is not None:
            hf_deepspeed.set_hf_deepspeed_config(held)
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()
