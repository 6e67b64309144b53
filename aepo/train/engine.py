"""``PolicyEngine``: the one place that owns DeepSpeed (config, ZeRO-3 model, backward, step,
gathered weights for vLLM, save, load). fp32 + torch AdamW on CPU, bf16 on GPU."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from aepo.distributed import all_reduce
from aepo.lm_head import redirect
from aepo.train.config import ConfigError, TrainConfig
from aepo.train.tree_attention import KWARG, tree_blocker, tree_forward
from aepo.train.tree_pack import TreePack, pack_tree


def init_distributed() -> tuple[int, int]:
    """Start torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); works without a
    launcher by filling in the single-process environment. Returns (rank, world size)."""
    import deepspeed
    import torch.distributed as dist

    problem = unusable_gpus()
    if problem:
        raise RuntimeError(problem)
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(
                RANK="0",
                LOCAL_RANK="0",
                WORLD_SIZE="1",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()),
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def unusable_gpus(gpus: Path = Path("/proc/driver/nvidia/gpus")) -> str | None:
    """Why the NVIDIA GPUs this machine has cannot be used by this torch, or None (no GPU, or
    torch sees them). A CUDA torch newer than the driver reports no GPU at all, and training
    would silently run on the CPU in fp32; a CPU build on a GPU machine is a choice, allowed."""
    if torch.version.cuda is None or torch.cuda.is_available() or not gpus.is_dir():
        return None
    count = len(list(gpus.iterdir()))
    if count == 0:
        return None
    return (
        f"this machine has {count} NVIDIA GPU(s) but torch {torch.__version__} (built for CUDA "
        f"{torch.version.cuda}) cannot use them: most often the driver is older than CUDA "
        f"{torch.version.cuda} needs (nvidia-smi prints the newest CUDA the driver supports). "
        "Update the driver, or install a torch built for the driver's CUDA"
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pack(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """[B, L, ...] -> [1, T, ...] real positions only (identity when ``keep`` is None)."""
    return x if keep is None else x[keep.to(x.device)][None]


def unpack(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`pack` for [1, T] values: [B, L] with zeros at padding."""
    if keep is None:
        return x
    out = x.new_zeros(keep.shape)
    out[keep.to(x.device)] = x[0]
    return out


def _per_token(tensors, layout, device):
    """``tensors`` ([B, L] or a tuple of them) as the loss kernels take them for ``layout``
    (:meth:`PolicyEngine._inputs`), then the kernels' ``rows`` (the TreePack's [B, L] index,
    None otherwise): a single tensor gives (tensor, rows), a tuple (*tensors, rows)."""
    single = isinstance(tensors, torch.Tensor)
    tree = isinstance(layout, TreePack)
    keep = None if tree else layout
    out = [pack(t.to(device), keep) for t in ((tensors,) if single else tensors)]
    return (*out, layout.index if tree else None)


def _flat(values: torch.Tensor, layout) -> torch.Tensor:
    """Per-token kernel outputs back to [B, L]: a tree's already are (``rows=``)."""
    return values if isinstance(layout, TreePack) else unpack(values, layout)


def deepspeed_config(cfg: TrainConfig, grad_accum: int) -> dict:
    on_gpu = torch.cuda.is_available()
    o, z = cfg.optim, cfg.deepspeed
    zero = {"stage": z.zero_stage}
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": o.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": on_gpu and cfg.model.dtype != "float32"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": 1e-8,
                "weight_decay": o.weight_decay,
                # torch's AdamW (fused kernel on GPU): DeepSpeed's FusedAdam is JIT-built at
                # start-up with an nvcc matching torch's CUDA. Offloaded states keep DeepSpeed's
                # CPU Adam (it requires it; a host C++ compiler builds it).
                "torch_adam": not (on_gpu and z.offload_optimizer),
                "fused": on_gpu and not z.offload_optimizer,
            },
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class PolicyEngine:
    """The trained policy under DeepSpeed.

    Args:
        cfg: the training config.
        model_path: HF folder to start from.
        grad_accum: micro-batches per optimizer step (DeepSpeed steps at that boundary).
    """

    def __init__(self, cfg: TrainConfig, model_path: str, grad_accum: int):
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        if cfg.model.attn_implementation == "flash_attention_2" and not torch.cuda.is_available():
            raise RuntimeError(
                "model.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn "
                "package (pip install flash-attn --no-build-isolation); use sdpa on CPU"
            )
        self.ds_config = deepspeed_config(cfg, grad_accum)
        self._hf_ds = HfDeepSpeedConfig(self.ds_config)  # keep alive: ZeRO-3-aware loading
        dtype = torch.bfloat16 if self.ds_config["bf16"]["enabled"] else torch.float32
        model = AutoModelForCausalLM.from_pretrained(
            model_path, torch_dtype=dtype, attn_implementation=cfg.model.attn_implementation
        )
        blocker = tree_blocker(model, max_len=1) if cfg.train.packing == "tree" else None
        if blocker:  # sliding windows are checked per batch, against its longest row
            raise ConfigError(
                f"train.packing=tree is not possible for this model: {blocker}; set "
                "train.packing=flat"
            )
        if cfg.train.gradient_checkpointing:  # tree attention replays as itself (tree_forward)
            model.gradient_checkpointing_enable({"use_reentrant": False})
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=self.ds_config
        )
        self.bucket_bytes = cfg.deepspeed.sync_bucket_mb << 20
        self.tree = cfg.train.packing == "tree"
        self.packed = cfg.model.attn_implementation == "flash_attention_2" and not self.tree
        self.token_counts = torch.zeros(2, dtype=torch.long)  # tree: (forwarded, flat) tokens
        # DeepSpeed's fp32 stage-0 path clips but drops the norm it computed: keep our own.
        self.stage = self.ds_config["zero_optimization"]["stage"]
        self._own_norm = self.stage == 0 and not self.ds_config["bf16"]["enabled"]
        self._last_norm: torch.Tensor | None = None
        self.skip_reason = "loss"  # of the last skipped step: "loss" or "gradient norm"

    def _inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tree: bool):
        """(forward kwargs, layout) of a right-padded [B, L] batch. The layout is None (padded:
        the model sees [B, L]), a [B, L] bool ``keep`` (flash-attention 2 packing: the real
        tokens as one [1, T] sequence whose position ids restart per row) or a
        :class:`~aepo.train.tree_pack.TreePack` (train.packing=tree: the [1, T] unique tokens
        of the batch's trie, each shared prefix once; ``tree`` and train.packing=tree)."""
        device = self.engine.device
        if tree and self.tree:  # packed on the host (where the batch is), then moved once
            tree = pack_tree(input_ids, attention_mask).to(device)
            self.token_counts += torch.tensor([tree.num_tokens, tree.flat_tokens])
            inputs = {"input_ids": tree.input_ids, "position_ids": tree.position_ids}
            return inputs | {KWARG: tree}, tree
        ids, attn = input_ids.to(device), attention_mask.to(device)
        if not self.packed:
            return {"input_ids": ids, "attention_mask": attn}, None
        keep = attn.bool()
        positions = (keep.cumsum(-1) - 1)[keep][None]
        return {"input_ids": ids[keep][None], "position_ids": positions}, keep

    def _forward(self, inputs: dict, layout):
        """The engine's forward on :meth:`_inputs`' kwargs (on tree attention for a tree)."""
        if not isinstance(layout, TreePack):
            return self.engine(**inputs)
        with tree_forward(self.engine.module, max_len=layout.max_k):
            return self.engine(**inputs)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Logits of a right-padded [B, L] batch (ZeRO-3 gathers each layer on the fly), never
        tree-packed (the training passes are: :meth:`logprobs`, :meth:`policy_loss`).

        Returns ``(logits, keep)``: padded, ``([B, L, V], None)``; with flash-attention 2 the
        rows are packed without padding into one sequence whose position ids restart per row,
        ``([1, T, V], keep)`` with ``keep`` the [B, L] attention mask: per-token tensors are
        then packed with :func:`pack` (T = number of real tokens).
        """
        return self._logits(input_ids, attention_mask, tree=False)

    def _logits(self, input_ids, attention_mask, tree: bool):
        """(logits, layout) (see :meth:`_inputs`): a tree's are [1, T, V], T unique tokens."""
        inputs, layout = self._inputs(input_ids, attention_mask, tree)
        return self._forward(inputs, layout).logits, layout

    def logprobs(self, input_ids, attention_mask, labels, *, fused: bool, **kernel_kwargs):
        """Per-token (logp, entropy), each [B, L] on the engine's device (0 at padding and at
        ``labels`` -100), of a right-padded [B, L] batch: from the last hidden states and the
        lm_head weight when ``fused`` (:func:`aepo.kernels.linear_logprobs_and_entropy`, the
        logits never materialised; see :meth:`_through_head` for ZeRO-3), from the logits
        otherwise. ``kernel_kwargs``: temperature, backend."""
        from aepo.kernels import (
            linear_logprobs_and_entropy,
            logprobs_and_entropy,
            tree_logprobs_and_entropy,
        )

        if fused:

            def head_call(hidden, weight, layout):
                y, rows = _per_token(labels, layout, self.engine.device)
                return linear_logprobs_and_entropy(hidden, weight, y, rows=rows, **kernel_kwargs)

            (logp, entropy), layout = self._through_head(input_ids, attention_mask, head_call)
        else:
            logits, layout = self._logits(input_ids, attention_mask, tree=True)
            y, rows = _per_token(labels, layout, logits.device)
            if rows is None:
                logp, entropy = logprobs_and_entropy(logits, y, **kernel_kwargs)
            else:
                logp, entropy = tree_logprobs_and_entropy(logits, y, rows, **kernel_kwargs)
        return _flat(logp, layout), _flat(entropy, layout)

    def policy_loss(self, input_ids, attention_mask, tokens, *, fused: bool, **kw):
        """(loss, metrics) of the policy loss of a right-padded [B, L] batch; ``tokens`` =
        (labels, old_logp, advantages, mask), each [B, L]. ``fused``:
        :func:`aepo.kernels.fused_linear_policy_loss` run as the lm_head's forward
        (:meth:`_through_head`; its single pass computes the gradients with the loss where it
        applies); else :func:`aepo.kernels.fused_policy_loss` on the logits, whose gradient
        overwrites them. A tree's shared tokens are computed once (``rows=``), each flat
        position keeping its own advantage, clipping and weight."""
        from aepo.kernels import fused_linear_policy_loss, fused_policy_loss

        if fused:

            def head_call(hidden, weight, layout):
                *per_token, rows = _per_token(tokens, layout, self.engine.device)
                return fused_linear_policy_loss(hidden, weight, *per_token, rows=rows, **kw)

            return self._through_head(input_ids, attention_mask, head_call)[0]
        logits, layout = self._logits(input_ids, attention_mask, tree=True)
        *per_token, rows = _per_token(tokens, layout, logits.device)
        return fused_policy_loss(logits, *per_token, rows=rows, inplace_grad=True, **kw)

    def _through_head(self, input_ids, attention_mask, head_call):
        """(head_call's result, layout): the engine's forward with the backbone's last hidden
        states handed to ``head_call(hidden, lm_head.weight, layout)`` in place of the lm_head
        (``layout`` as in :meth:`_inputs`).

        The call goes through the DeepSpeed engine's forward, and ``head_call`` runs as the
        lm_head module's forward (both redirected for the duration of the call): ZeRO-3
        gathers the weight around it and again around its backward, and the weight's gradient
        is accumulated and reduced exactly as the model's own lm_head's.
        """
        module = self.engine.module
        backbone, head = getattr(module, module.base_model_prefix), module.get_output_embeddings()
        inputs, layout = self._inputs(input_ids, attention_mask, tree=True)
        forward = lambda **kw: head(backbone(**kw).last_hidden_state)
        head_forward = lambda hidden: head_call(hidden, head.weight, layout)
        with redirect(module, forward), redirect(head, head_forward):
            return self._forward(inputs, layout), layout

    def take_token_counts(self) -> tuple[int, int]:
        """(tokens forwarded, flat real tokens) of the tree-packed forwards since the last
        call (0, 0 with train.packing=flat), and reset the counters."""
        forwarded, flat = (int(c) for c in self.token_counts)
        self.token_counts.zero_()
        return forwarded, flat

    def backward(self, loss: torch.Tensor) -> None:
        """Our losses are already normalised by the global token count: no 1/GAS scaling."""
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, nonfinite_loss: torch.Tensor | None = None) -> bool | None:
        """Optimizer step at the accumulation boundary (DeepSpeed counts micro-batches).

        The non-finite guard: at the boundary, a non-finite loss seen by any rank (the flag
        ``nonfinite_loss``, all-reduced) or a non-finite gradient skips the optimizer step on
        every rank, gradients dropped and parameters and optimizer state untouched. ZeRO 1-3
        skip it themselves on an invalid global grad norm (checked afterwards); at stage 0 the
        gradients are set to None, so the torch optimizer leaves every parameter and its state
        alone. Returns None off the boundary, True for a step taken, False for one skipped.
        """
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if self._own_norm:
            self._last_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        bad = torch.zeros(2, dtype=torch.float32)  # [non-finite loss, non-finite gradient]
        if nonfinite_loss is not None:
            bad[0] = nonfinite_loss.detach().float().cpu()
        if self.stage == 0 and grads:  # reduced already: every rank sees the same gradients
            bad[1] = (~torch.stack([torch.isfinite(g).all() for g in grads]).all()).float().cpu()
        all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # any rank's flag, on every rank
        skip = bool(bad.any())
        self.skip_reason = "loss" if bad[0] else "gradient norm"
        if skip and self.stage == 0:
            self._skip_stage0_step()
        else:
            self.engine.step()
        skipped_by_zero = self.stage > 0 and bool(getattr(self.engine.optimizer, "overflow", False))
        if skip and self.stage > 0 and not skipped_by_zero:
            raise RuntimeError(
                f"non-finite loss but DeepSpeed ZeRO stage {self.stage} took the optimizer step "
                "(its overflow check is off for this dtype); the weights may be corrupted"
            )
        return not (skip or skipped_by_zero)

    def _skip_stage0_step(self) -> None:
        """DeepSpeed's own skip path (the one its fp16 overflow takes) at stage 0: gradients
        zeroed, the optimizer's update not run, ``skipped_steps`` counted, the LR schedule and
        the micro-step accounting kept in step with the other ranks."""
        for p in self.engine.module.parameters():
            if p.grad is not None:
                p.grad.zero_()
        optimizer = self.engine.optimizer
        had = "overflow" in vars(optimizer)
        previous = optimizer.__dict__.get("overflow")
        optimizer.step = lambda *a, **k: None  # an instance attribute shadows the class's
        optimizer.overflow = True
        try:
            self.engine.step()
        finally:
            del optimizer.step
            if had:
                optimizer.overflow = previous
            else:
                del optimizer.overflow

    def grad_norm(self) -> float:
        """Global gradient norm (before clipping) of the last optimizer step; nan before one."""
        norm = self.engine.get_global_grad_norm()
        if norm is None and self._last_norm is not None:
            norm = self._last_norm.item()  # one host sync per logged step, not per optimizer step
        return float(norm) if norm is not None else float("nan")

    def gathered_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(HF name, full tensor)`` of every parameter, in the model's dtype, streamed: the
        ZeRO-3 shards are gathered a bucket of about ``sync_bucket_mb`` at a time, when the
        consumer reaches the bucket, and partitioned again when it moves past it, so that the
        stream itself holds one bucket at most.

        Collective under ZeRO-3: every rank must iterate it to the end, in step.

        The tensors are not copies. Inside the bucket's ``GatheredParameters`` context they are
        the gathered parameters (``p.detach()``, no clone); leaving it only rebinds each
        parameter's ``.data`` to an empty tensor (DeepSpeed's ``free_param``), so a tensor the
        consumer still holds keeps its own full storage and its values (what vLLM's layerwise
        reload relies on when it buffers a layer's q/k/v across a bucket boundary). A clone
        per bucket would only add a bucket of memory: a consumer that must keep a tensor past
        the next optimizer step copies it (as vLLM's loader does, into its own parameters).
        Under ZeRO 0-2, and for ZeRO-3's small persistent parameters, a tensor is the live
        parameter: read it, never write it (``modifier_rank=None``: writes would not reach the
        shards and are a DeepSpeed error when its sanity checks are on).
        """
        import deepspeed

        for bucket in self._buckets():
            with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
                for name, p in bucket:
                    yield name, p.detach()

    def _buckets(self) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
        """Named parameters in consecutive groups of about ``bucket_bytes`` (full sizes)."""
        bucket, size = [], 0
        for name, p in self.engine.module.named_parameters():
            numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
            bucket.append((name, p))
            size += numel * p.element_size()
            if size >= self.bucket_bytes:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket

    def save(self, directory: str, tag: str = "ds") -> None:
        self.engine.save_checkpoint(directory, tag=tag)

    def load(self, directory: str, tag: str = "ds") -> None:
        path, _ = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load a checkpoint from {directory}/{tag}")

    def save_pretrained(self, directory: str, tokenizer=None) -> None:
        """HF folder of the full model (rank 0 writes; collective gather on every rank)."""
        import torch.distributed as dist

        rank0 = dist.get_rank() == 0
        state = {}
        for name, t in self.gathered_parameters():  # on the host; rank 0 alone keeps them
            if rank0:  # in the model's dtype: an fp32 copy of bf16 weights is twice the disk
                state[name] = t.to("cpu", copy=True)
        if rank0:
            module = self.engine.module
            module.save_pretrained(directory, state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
