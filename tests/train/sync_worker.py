"""torchrun worker of test_weight_sync.py: for each model folder given (a tied and an untied
Llama), a ZeRO-3 PolicyEngine and its colocated vLLM, one optimizer step that moves the weights,
then the Trainer's own streaming ``sync_weights`` and ``check_sync``. Rank 0 saves what every
rank got.

    torchrun --nproc_per_node 2 tests/train/sync_worker.py OUT.json MODEL_DIR [MODEL_DIR ...]
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from aepo.train.config import load_config
from aepo.train.engine import PolicyEngine, init_distributed
from aepo.train.loop import Trainer
from aepo.train.rollout import make_engine
from aepo.train.sync_check import Probe, sync_tolerance, sync_verdict

PROMPT = [5, 17, 42, 8, 23, 11, 64, 3]  # token ids (every test model's vocabulary has them)


def make_trainer(model_dir: str) -> Trainer:
    """A Trainer with only what a sync and its check need: the policy and the vLLM engine."""
    overrides = [
        "deepspeed.zero_stage=3",
        "deepspeed.sync_bucket_mb=1",  # several buckets per model
        "optim.lr=0.01",
        "logging.sync_check_tokens=16",
    ]
    cfg = load_config(None, overrides)
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.rank, trainer.world = cfg, dist.get_rank(), dist.get_world_size()
    trainer.policy = PolicyEngine(cfg, model_dir, grad_accum=1)
    trainer.engine = make_engine(cfg, model_dir, trainer.world, None)
    return trainer


def optimizer_step(trainer: Trainer) -> None:
    """One AdamW step on a next-token loss over a rank-dependent random batch."""
    vocab = trainer.policy.engine.module.config.vocab_size
    g = torch.Generator().manual_seed(trainer.rank)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    logits, _ = trainer.policy.logits(ids, torch.ones_like(ids))
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()
    )
    trainer.policy.backward(loss)
    assert trainer.policy.step() is True


def skipped_sync_verdict(trainer: Trainer, before: Probe) -> str | None:
    """What the check says after an update with no sync (vLLM serving the previous policy),
    with a tolerance (10 nats) that the log-prob gap alone could never exceed: the detection
    must not rest on the tolerance, which bf16 kernel noise forces wide."""
    return sync_verdict(before, trainer.probe_sync(PROMPT, 1), tolerance=10.0)


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in trainer.policy.gathered_parameters()}


def run(trainer: Trainer) -> dict:
    """Probe, step, check without a sync, streaming sync, check; what each showed."""
    probe = trainer.probe_sync(PROMPT, 1)  # vLLM and trainer on the same (initial) weights
    optimizer_step(trainer)
    skipped = skipped_sync_verdict(trainer, probe)
    before = snapshot(trainer)
    trainer.sync_weights()
    diff = trainer.check_sync(PROMPT, 1, probe)  # raises above the fp32 tolerance (1e-4)
    after = snapshot(trainer)
    module = trainer.policy.engine.module
    dtype = next(module.parameters()).dtype
    return {
        "tied": bool(module.config.tie_word_embeddings),
        "skipped_sync": skipped,
        "diff": diff,
        "tolerance": sync_tolerance(trainer.cfg.logging.sync_tolerance, dtype),
        "trainer_unchanged": all(torch.equal(before[n], after[n]) for n in before),
        "buckets": len(list(trainer.policy._buckets())),
        "partitioned": sum(p.data.numel() == 0 for p in module.parameters()),  # not persistent
    }


def main() -> None:
    out, model_dirs = sys.argv[1], sys.argv[2:]
    init_distributed()
    # every engine kept until the end: a vLLM engine torn down under external_launcher takes
    # the default process group with it
    trainers = [make_trainer(d) for d in model_dirs]
    rows = [run(t) for t in trainers]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.barrier()


if __name__ == "__main__":
    main()
