"""Tree attention for Hugging Face causal LMs: one forward over a :class:`TreePack`, each shared
token computed (and backpropagated) once.

Registered in transformers' ``AttentionInterface`` as ``"aepo_tree"``. That name is not a mask
implementation, so ``create_causal_mask`` returns None without building a mask, and the model
forward passes its extra keyword arguments down to the attention function::

    with tree_forward(model):
        out = model(input_ids=pack.input_ids, position_ids=pack.position_ids,
                    aepo_tree=pack, use_cache=False)
        logits = unpack(out.logits, pack)  # [B, L, V], zeros at padding
        loss_fn(logits).backward()  # may also run after the block, checkpointing included

Segment s's queries attend to its key list ``kv_index[kv_bounds[s]:kv_bounds[s + 1]]`` (its
ancestors, then itself), causal and aligned bottom-right. CUDA with flash-attn and a 16-bit dtype
runs ``flash_attn_varlen_func``; everything else runs SDPA batched over segments of the same
shape, O(sum over segments of Lq * Lk) memory, never T x T.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aepo.train.tree_pack import TreePack

ATTN_NAME = "aepo_tree"
KWARG = "aepo_tree"  # the model-forward keyword that carries the TreePack

# model_type values whose layers keep recurrent state (Mamba, SSM, linear-attention hybrids).
RECURRENT_MODEL_TYPES = frozenset(
    {
        "mamba",
        "mamba2",
        "jamba",
        "falcon_h1",
        "falcon_mamba",
        "zamba",
        "zamba2",
        "bamba",
        "granitemoehybrid",
        "nemotron_h",
        "qwen3_next",
        "lfm2",
        "lfm2_moe",
        "rwkv",
        "recurrent_gemma",
        "minimax",
        "xlstm",
    }
)
_RECURRENT_CLASS_HINTS = ("Mamba", "GatedDeltaNet", "LinearAttention", "Recurrent")


class TreePackingError(ValueError):
    """The model or the call cannot run as one tree-packed forward."""


def register() -> None:
    """Add ``ATTN_NAME`` to transformers' global attention registry (idempotent)."""
    from transformers import AttentionInterface

    if AttentionInterface._global_mapping.get(ATTN_NAME) is not tree_attention:
        AttentionInterface.register(ATTN_NAME, tree_attention)


def tree_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` entry point.

    query: [1, Hq, T, d]; key, value: [1, Hkv, T, d] (Hq a multiple of Hkv);
    ``kwargs["aepo_tree"]``: the :class:`TreePack` of these T tokens.
    Returns ([1, T, Hq, d], None).
    """
    pack = kwargs.get(KWARG)
    if not isinstance(pack, TreePack):
        raise TreePackingError(
            f"attention implementation {ATTN_NAME!r} needs the TreePack as model(..., "
            f"{KWARG}=pack); got {type(pack).__name__}"
        )
    _check_call(query, key, attention_mask, dropout, pack, kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    q = query[0].transpose(0, 1)  # [T, Hq, d]
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, Hkv, d]
    if _flash_ok(q):
        return flash_tree_attention(q, k, v, pack, scale)[None], None
    return sdpa_tree_attention(q, k, v, pack, scale)[None], None


def _check_call(query, key, attention_mask, dropout, pack: TreePack, kwargs) -> None:
    if attention_mask is not None:
        raise TreePackingError("tree attention takes no attention_mask: the TreePack is the mask")
    if dropout:
        raise TreePackingError(f"tree attention supports no attention dropout, got {dropout}")
    t = pack.num_tokens
    if query.shape[0] != 1 or query.shape[2] != t or key.shape[2] != t:
        raise TreePackingError(
            f"tree attention expects query/key [1, H, T={t}, d] (no KV cache: use_cache=False), "
            f"got {tuple(query.shape)} / {tuple(key.shape)}"
        )
    if query.shape[1] % key.shape[1]:
        raise TreePackingError(f"{query.shape[1]} query heads for {key.shape[1]} kv heads")
    for name in ("softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise TreePackingError(f"tree attention does not implement {name}")
    window = kwargs.get("sliding_window")
    if window is not None and pack.max_k > window:
        raise TreePackingError(
            f"sliding window {window} is shorter than the longest row ({pack.max_k} tokens)"
        )


def _flash_ok(q: torch.Tensor) -> bool:
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    problem = flash_attn_problem()
    if problem is not None:
        _warn_sdpa_fallback(problem)
    return problem is None


@functools.cache
def flash_attn_problem() -> str | None:
    """Why flash-attn cannot be imported (the import error), or None when it can."""
    try:
        import flash_attn  # noqa: F401
    except ImportError as exc:  # absent, or built against another torch / CUDA
        return f"{type(exc).__name__}: {exc}"
    return None


@functools.cache
def _warn_sdpa_fallback(problem: str) -> None:
    """Once per process: tree packing on a GPU without flash-attn runs the SDPA path."""
    warnings.warn(
        f"train.packing=tree on CUDA without flash-attn ({problem}): tree attention falls back "
        "to SDPA per group of equal-shape segments, slower on real trees. Install it after "
        "torch: pip install flash-attn --no-build-isolation",
        RuntimeWarning,
        stacklevel=3,
    )


def flash_tree_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pack: TreePack, scale: float
) -> torch.Tensor:
    """flash-attn varlen over segments. q: [T, Hq, d]; k, v: [T, Hkv, d] (CUDA, fp16/bf16).
    Gathers keys/values [K, Hkv, d] by ``kv_index``; returns [T, Hq, d]."""
    from flash_attn import flash_attn_varlen_func

    # flash-attn >= 2.1 aligns the causal mask bottom-right when seqlen_q != seqlen_k: query i
    # of a segment with A ancestor keys sees keys 0..A+i, which is the tree's causal rule.
    return flash_attn_varlen_func(
        q,
        k.index_select(0, pack.kv_index),
        v.index_select(0, pack.kv_index),
        cu_seqlens_q=pack.seg_bounds,
        cu_seqlens_k=pack.kv_bounds,
        max_seqlen_q=pack.max_q,
        max_seqlen_k=pack.max_k,
        dropout_p=0.0,
        softmax_scale=scale,
        causal=True,
    )


@dataclass(frozen=True)
class _Group:
    """Segments of one shape (Lq queries, Lk keys), attended in one SDPA call."""

    q_index: torch.Tensor  # [G, Lq] packed query positions
    k_index: torch.Tensor  # [G, Lk] packed key positions
    mask: torch.Tensor  # [Lq, Lk] bool, tril(diagonal=Lk - Lq)


@dataclass(frozen=True)
class _Plan:
    groups: tuple[_Group, ...]
    inverse: torch.Tensor  # [T] row of the groups' concatenated output for each packed token


_PLANS: weakref.WeakKeyDictionary[TreePack, _Plan] = weakref.WeakKeyDictionary()


def _plan(pack: TreePack) -> _Plan:
    """Group the segments by shape once per pack (one host sync), reused by every layer."""
    if pack in _PLANS:
        return _PLANS[pack]
    qb, kb = pack.seg_bounds.tolist(), pack.kv_bounds.tolist()
    kv = pack.kv_index.cpu()
    shapes: dict[tuple[int, int], list[int]] = {}
    for s in range(pack.num_segments):
        shapes.setdefault((qb[s + 1] - qb[s], kb[s + 1] - kb[s]), []).append(s)
    groups, order = [], []
    for (lq, lk), segs in shapes.items():
        q_index = torch.stack([torch.arange(qb[s], qb[s + 1]) for s in segs])  # [G, Lq]
        k_index = torch.stack([kv[kb[s] : kb[s + 1]] for s in segs])  # [G, Lk]
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        dev = pack.kv_index.device
        groups.append(_Group(q_index.to(dev), k_index.to(dev), mask.to(dev)))
        order.append(q_index.flatten())
    perm = torch.cat(order) if order else torch.zeros(0, dtype=torch.long)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm))
    plan = _Plan(tuple(groups), inverse.to(pack.kv_index.device))
    _PLANS[pack] = plan
    return plan


def sdpa_tree_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pack: TreePack, scale: float
) -> torch.Tensor:
    """The reference path: torch SDPA per group of equal-shape segments.

    q: [T, Hq, d]; k, v: [T, Hkv, d]. Returns [T, Hq, d]. Per group of G segments it allocates
    queries [G, Hq, Lq, d], keys/values [G, Hkv, Lk, d] and scores [G, Hq, Lq, Lk].
    """
    plan = _plan(pack)
    gqa = q.shape[1] != k.shape[1]  # query head h reads kv head h // (Hq / Hkv), not copied
    outs = []
    for g in plan.groups:
        qg = q[g.q_index].transpose(1, 2)  # [G, Hq, Lq, d]
        kg = k[g.k_index].transpose(1, 2)  # [G, Hkv, Lk, d]
        vg = v[g.k_index].transpose(1, 2)
        o = F.scaled_dot_product_attention(
            qg, kg, vg, attn_mask=g.mask, scale=scale, enable_gqa=gqa
        )
        outs.append(o.transpose(1, 2).flatten(0, 1))  # [G * Lq, Hq, d]
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs).index_select(0, plan.inverse)


def _unwrap(model):
    """The HF model under a DeepSpeed / DDP wrapper."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model


def _configs(model) -> list:
    """Every distinct config of the model's modules and their sub-configs."""
    from transformers import PretrainedConfig

    seen: dict[int, PretrainedConfig] = {}
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        cfg = stack.pop()
        if isinstance(cfg, PretrainedConfig) and id(cfg) not in seen:
            seen[id(cfg)] = cfg
            stack.extend(getattr(cfg, key, None) for key in getattr(cfg, "sub_configs", {}))
    return list(seen.values())


def tree_blocker(model, max_len: int | None = None) -> str | None:
    """Why ``model`` cannot run a tree-packed forward, or None.

    Refused: layers with recurrent state (a token's state depends on every earlier token of
    the flat row, which the tree does not replay), sliding-window or chunked attention that
    could cut a row longer than the window (``max_len``: the longest row, None for unknown),
    attention logit soft-capping, and models that do not dispatch attention through
    transformers' ``AttentionInterface``.
    """
    model = _unwrap(model)
    name = type(model).__name__
    for cfg in _configs(model):
        reason = _config_blocker(cfg, max_len)
        if reason:
            return f"{name} (model_type {cfg.model_type!r}): {reason}"
    for module in model.modules():
        kind = type(module).__name__
        if any(hint in kind for hint in _RECURRENT_CLASS_HINTS):
            return f"{name}: layer {kind} keeps recurrent state"
    if not getattr(type(model), "_supports_attention_backend", False):
        return f"{name} does not dispatch attention through transformers' AttentionInterface"
    return None


def _config_blocker(cfg, max_len: int | None) -> str | None:
    if cfg.model_type in RECURRENT_MODEL_TYPES:
        return "its layers keep recurrent state (Mamba / SSM / linear-attention family)"
    layer_types = getattr(cfg, "layer_types", None) or ()
    window = getattr(cfg, "sliding_window", None) or getattr(cfg, "attention_chunk_size", None)
    bites = window is not None and (max_len is None or max_len > window)
    for kind in dict.fromkeys(layer_types):
        if kind in ("sliding_attention", "chunked_attention"):
            if bites:
                return f"{kind} layers (window {window}) could cut rows short"
        elif kind != "full_attention":
            return f"{kind!r} layers keep recurrent state or are not plain attention"
    if not layer_types and bites and getattr(cfg, "use_sliding_window", True) is not False:
        return f"sliding-window attention (window {window}) could cut rows short"
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        return "attention logits are soft-capped"
    return None


@contextlib.contextmanager
def tree_forward(model, max_len: int | None = None) -> Iterator[None]:
    """Run ``model`` (and its sub-models) on tree attention for the duration.

    Raises :class:`TreePackingError` when :func:`tree_blocker` refuses the model. Sets
    ``config._attn_implementation`` on every config of the model to ``ATTN_NAME`` and restores
    each one on exit, also when the body raises. Under gradient checkpointing the layers'
    recompute runs in backward, after the block may have exited: the checkpointed functions
    are wrapped so that their replay switches to tree attention again.
    """
    model = _unwrap(model)
    reason = tree_blocker(model, max_len)
    if reason:
        raise TreePackingError(f"no tree-packed forward: {reason}")
    register()
    configs = _configs(model)
    hooked = [m for m in model.modules() if "_gradient_checkpointing_func" in m.__dict__]
    saved = [m.__dict__["_gradient_checkpointing_func"] for m in hooked]
    with _switched(configs):
        try:
            for module, ckpt in zip(hooked, saved, strict=True):
                module._gradient_checkpointing_func = functools.partial(
                    _checkpoint_in_tree, ckpt, configs
                )
            yield
        finally:
            for module, ckpt in zip(hooked, saved, strict=True):
                module._gradient_checkpointing_func = ckpt


def _checkpoint_in_tree(ckpt, configs, function, *args, **kwargs):
    """``ckpt(function, ...)`` with ``function`` (forward and replay) on tree attention."""

    @functools.wraps(function)
    def replayable(*a, **kw):
        with _switched(configs):
            return function(*a, **kw)

    return ckpt(replayable, *args, **kwargs)


@contextlib.contextmanager
def _switched(configs: list) -> Iterator[None]:
    """Each config on ``ATTN_NAME`` for the duration, then back to its own value."""
    # transformers >= 4.48 stores it as _attn_implementation_internal behind a property whose
    # setter recurses into sub-configs; set and restore the field of each config directly.
    saved = [(cfg, cfg.__dict__.get("_attn_implementation_internal")) for cfg in configs]
    try:
        for cfg in configs:
            cfg._attn_implementation_internal = ATTN_NAME
        yield
    finally:
        for cfg, value in saved:
            cfg._attn_implementation_internal = value
