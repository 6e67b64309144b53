"""torchrun worker of test_fused_head.py: one mini-batch update of a tiny Llama through the
Trainer's own code (``_recompute``, then ``_mini_batch``: one optimizer step over two
micro-batches) with ``objective.lm_head=logits`` and ``=fused``, from the same weights and
batch. Rank 0 saves what it got.

    torchrun --nproc_per_node 2 tests/train/fused_head_worker.py MODEL_DIR STAGE OUT.pt
"""

from __future__ import annotations

import gc
import sys

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from aepo.train.config import load_config
from aepo.train.engine import PolicyEngine, init_distributed
from aepo.train.loop import Trainer, choose_lm_head

B, L = 4, 14  # rows per rank (one mini-batch of 2 micro-batches), padded length


def make_batch(vocab: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(3, vocab, (B, L), generator=g)
    lengths = torch.tensor([14, 11, 9, 13])
    attn = (torch.arange(L) < lengths[:, None]).long()
    labels = torch.zeros_like(ids)
    labels[:, :-1] = ids[:, 1:]
    mask = ((torch.arange(L) >= 4) & (torch.arange(L) < lengths[:, None] - 1)).float()
    mask[1, 6:8] = 0  # a tool result inside the completion
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "labels": labels,
        "mask": mask,
        "advantages": torch.randn(B, 1, generator=g).expand(B, L).contiguous(),
        "group_ids": torch.zeros(B, dtype=torch.long),
    }


def capture_gradients(policy: PolicyEngine) -> dict[str, torch.Tensor]:
    """Fills the returned dict with every parameter's full (reduced, unpartitioned) gradient
    just before the optimizer step, on every rank (under ZeRO-3 it is a collective)."""
    grads: dict[str, torch.Tensor] = {}
    real_step = policy.step

    def step(*args, **kwargs):
        if policy.engine.is_gradient_accumulation_boundary():
            for name, param in policy.engine.module.named_parameters():
                grads[name] = safe_get_full_grad(param).detach().float().cpu().clone()
        return real_step(*args, **kwargs)

    policy.step = step
    return grads


def run(model_dir: str, stage: int, mode: str) -> dict:
    overrides = [
        f"deepspeed.zero_stage={stage}",
        f"objective.lm_head={mode}",
        "objective.entropy_coef=0.01",
        "optim.micro_batch_size=2",
        "optim.mini_batch_size=4",
        "task.prompts_per_step=1",
        "rollout.k=4",
        "optim.lr=0.01",
        "optim.grad_clip=0",  # see the note in test_fused_head.py
    ]
    cfg = load_config(None, overrides)
    trainer = Trainer.__new__(Trainer)  # the update path only: no rollout engine, no task
    trainer.cfg, trainer.rank, trainer.world = cfg, dist.get_rank(), dist.get_world_size()
    trainer.policy = PolicyEngine(cfg, model_dir, grad_accum=2)
    trainer.loss_kwargs = cfg.objective.policy_loss_kwargs()
    trainer.loss_kwargs.pop("entropy_adv_norm")
    trainer.fused_head = choose_lm_head(mode, trainer.policy, trainer.rank)
    vocab = trainer.policy.engine.module.config.vocab_size
    batch = make_batch(vocab, trainer.rank)
    batch["old_logp"], batch["entropy"] = trainer._recompute(batch)
    noise = torch.randn(B, L, generator=torch.Generator().manual_seed(7 + trainer.rank))
    batch["old_logp"] = batch["old_logp"] + 0.05 * noise  # ratios != 1: some are clipped
    grads = capture_gradients(trainer.policy)
    metrics = trainer._mini_batch(batch, slice(0, B))
    params = {n: t.float().clone() for n, t in trainer.policy.gathered_parameters()}
    out = {
        "params": params,
        "grads": grads,
        "metrics": metrics,
        "entropy": batch["entropy"],
        "fused": trainer.fused_head,
    }
    del trainer
    gc.collect()
    return out


def main() -> None:
    model_dir, stage, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    init_distributed()
    torch.manual_seed(0)
    results = {mode: run(model_dir, stage, mode) for mode in ("logits", "fused")}
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()


if __name__ == "__main__":
    main()
