"""torchrun worker of test_tree_training.py: one mini-batch update of a tiny Llama through the
Trainer's own code (``_recompute``, then ``_mini_batch``: one optimizer step over two
micro-batches) with ``train.packing=flat`` and ``=tree``, from the same weights and batch, for
every objective. Rank 0 saves what it got.

The batch is two rollout trees per rank built with ``Trajectory.fork``: forks at the end of
tool results three levels deep, ragged branch lengths, rewards that give each group
advantages of both signs, and old log-probs perturbed per flat position so that the branches
sharing a token clip differently.

    torchrun --nproc_per_node 2 tests/train/tree_worker.py MODEL_DIR STAGE OUT.pt
"""

from __future__ import annotations

import gc
import sys

import numpy as np
import torch
import torch.distributed as dist
from fused_head_worker import capture_gradients  # beside this script: on sys.path

from aepo.objectives import aggregation_weights, group_advantages
from aepo.rollout.trajectory import Trajectory, flatten
from aepo.train.config import load_config
from aepo.train.engine import init_distributed
from aepo.train.loop import Trainer, _shifted

# (objective, lm_head, agg): every objective on the fused head, two on the logits path, and
# every aggregation (each counts the occurrences of a shared token as the flat path does).
CASES = (
    ("aepo", "fused", "token-mean"),
    ("grpo", "fused", "seq-mean-token-mean"),
    ("ppo", "fused", "constant"),
    ("dapo", "fused", "token-mean"),
    ("gppo", "fused", "seq-mean-token-sum"),
    ("cispo", "fused", "seq-mean-token-mean"),
    ("aepo", "logits", "token-mean"),
    ("cispo", "logits", "seq-mean-token-sum"),
)
ROWS = 8  # trajectories per rank: two groups of four, one mini-batch of two micro-batches


def _grow(t: Trajectory, rng, sampled: int, tool: int, vocab: int) -> None:
    """Append ``sampled`` policy tokens, then ``tool`` tool-result tokens (mask 0)."""
    t.response_ids += rng.integers(3, vocab, sampled + tool).tolist()
    t.loss_mask += [1] * sampled + [0] * tool
    t.logprobs += (-rng.uniform(0.1, 3.0, sampled)).tolist() + [0.0] * tool
    t.entropy += [1.0] * (sampled + tool)


def make_trees(vocab: int, rank: int) -> list[Trajectory]:
    """Two groups of four paths: root -> a -> b -> c, each a fork of the previous at the end
    of a tool result, then every path continued by its own ragged tail."""
    rng = np.random.default_rng(10 + rank)
    out = []
    for group, tails in enumerate(((4, 2, 5, 1), (1, 6, 3, 2))):
        prompt = rng.integers(3, vocab, 5 + group).tolist()
        root = Trajectory(prompt=group, group=group, path=0, prompt_ids=prompt)
        path = [root]
        _grow(root, rng, 3, 2, vocab)
        for depth in range(1, 4):
            child = path[-1].fork(depth, len(path[-1].response_ids))
            _grow(child, rng, 2 + depth, 2, vocab)  # shared by every deeper path
            path.append(child)
        for t, tail in zip(path, tails, strict=True):
            _grow(t, rng, tail, 0, vocab)
        rewards = (1.0, 0.0, 0.6, 0.2) if group else (0.0, 1.0, 0.3, 1.0)
        for t, reward in zip(path, rewards, strict=True):
            t.reward = reward
        out += path
    return out


def make_batch(vocab: int, pad_id: int, rank: int) -> dict[str, torch.Tensor]:
    batch = _shifted(flatten(make_trees(vocab, rank), pad_id))
    adv = group_advantages(batch["rewards"], batch["group_ids"])
    batch["advantages"] = adv[:, None].expand_as(batch["mask"]).contiguous()
    return batch


def loss_scale(trainer: Trainer, batch: dict) -> float:
    """The logged loss's natural size: the mean over micro-batches of sum_t w_t |A_t| (the loss
    at ratio 1 with |A|). The loss itself may nearly cancel: GRPO advantages are centred per
    group, so a seq-mean loss is ~0 at ratio 1, and its relative error is meaningless."""
    mask, agg = batch["mask"][:ROWS], trainer.cfg.objective.agg
    normalizer, micro = trainer._normalizer(mask), trainer.cfg.optim.micro_batch_size
    terms = [
        (
            aggregation_weights(mask[lo : lo + micro], agg, normalizer)
            * batch["advantages"][lo : lo + micro].abs()
        ).sum()
        for lo in range(0, ROWS, micro)
    ]
    return float(torch.stack(terms).mean())


def run(model_dir: str, stage: int, objective: str, head: str, agg: str, packing: str) -> dict:
    overrides = [
        f"deepspeed.zero_stage={stage}",
        f"objective.objective={objective}",
        f"objective.lm_head={head}",
        f"objective.agg={agg}",
        f"train.packing={packing}",
        "objective.entropy_coef=0.01",
        "optim.micro_batch_size=4",
        f"optim.mini_batch_size={ROWS}",
        "task.prompts_per_step=2",
        "rollout.k=4",
        "rollout.max_response_tokens=32",
        "optim.lr=0.01",
        "optim.grad_clip=0",
    ]
    trainer = Trainer.update_only(load_config(None, overrides), model_dir)
    vocab = trainer.policy.engine.module.config.vocab_size
    batch = make_batch(vocab, 0, trainer.rank)
    trainer.policy.take_token_counts()
    batch["old_logp"], batch["entropy"] = trainer._recompute(batch)
    noise = torch.randn(batch["mask"].shape, generator=torch.Generator().manual_seed(7))
    batch["old_logp"] = batch["old_logp"] + 0.3 * noise  # per occurrence: branches clip apart
    grads = capture_gradients(trainer.policy)
    metrics = trainer._mini_batch(batch, slice(0, ROWS))
    forwarded, flat = trainer.policy.take_token_counts()
    out = {
        "grads": grads,
        "metrics": metrics,
        "old_logp": batch["old_logp"] - 0.3 * noise,
        "entropy": batch["entropy"],
        "advantages": batch["advantages"][:, 0],
        "tokens": (forwarded, flat),
        "loss_scale": loss_scale(trainer, batch),
    }
    del trainer
    gc.collect()
    return out


def main() -> None:
    model_dir, stage, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    init_distributed()
    results = {}
    for case in CASES:
        for packing in ("flat", "tree"):
            torch.manual_seed(0)
            results[(*case, packing)] = run(model_dir, stage, *case, packing)
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()


if __name__ == "__main__":
    main()
