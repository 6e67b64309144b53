"""torchrun worker (1 rank) of test_device_rehearsal.py: the Trainer's update path with the
model on a nominal GPU (tests/nominal_device.py) and the batch on the host, as the loop builds
it: ``_recompute`` (old log-probs and entropy), one ``_mini_batch`` (loss, backward, optimizer
step over two micro-batches), then a mini-batch with a NaN advantage (the non-finite guard
skips it). Each case runs once all on the CPU and once with the model on the "GPU" (the same
CPU arithmetic, some ops decomposed otherwise for the subclass). Saves both.

    torchrun --nproc_per_node 1 tests/train/rehearsal_worker.py MODEL_DIR OUT.pt
"""

from __future__ import annotations

import sys

import torch
from fused_head_worker import capture_gradients  # beside this script: on sys.path
from tree_worker import ROWS, make_batch

from aepo.train.config import load_config
from aepo.train.engine import init_distributed
from aepo.train.loop import Trainer
from tests.nominal_device import GPU, install, on_gpu

# (lm_head, packing, entropy_adv_norm)
CASES = [
    (head, packing, norm)
    for head in ("fused", "logits")
    for packing in ("flat", "tree")
    for norm in ("batch", "group")
]


def trainer_for(model_dir: str, head: str, packing: str, norm: str) -> Trainer:
    overrides = [
        "deepspeed.zero_stage=0",
        f"objective.lm_head={head}",
        f"train.packing={packing}",
        f"objective.entropy_adv_norm={norm}",
        "objective.backend=torch",  # no Triton on nominal tensors (the interpreter needs CPU)
        "objective.entropy_coef=0.01",
        "optim.micro_batch_size=4",
        f"optim.mini_batch_size={ROWS}",
        "optim.lr=0.01",
        "optim.grad_clip=1.0",
    ]
    return Trainer.update_only(load_config(None, overrides), model_dir)


def update(trainer: Trainer, batch: dict) -> dict:
    """Recompute, one mini-batch step, then a mini-batch whose advantages hold a NaN."""
    out = {}
    out["old_logp"], out["entropy"] = trainer._recompute(batch)
    batch = batch | {"old_logp": out["old_logp"], "entropy": out["entropy"]}
    grads = capture_gradients(trainer.policy)
    out["metrics"] = trainer._mini_batch(batch, slice(0, ROWS))
    out["grads"] = dict(grads)  # before the NaN mini-batch's
    poisoned = batch["advantages"].clone()
    poisoned[1] = float("nan")
    out["nan_metrics"] = trainer._mini_batch(batch | {"advantages": poisoned}, slice(0, ROWS))
    out["skipped"] = trainer.skipped_steps
    return out


def on_the_gpu(model_dir: str, case: tuple, batch: dict) -> dict:
    """``update`` with DeepSpeed's accelerator naming the nominal GPU: the engine places the
    model, its gradients and the optimizer state there, as on a CUDA rank."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator, initialize = get_accelerator(), deepspeed.initialize
    names = accelerator.device_name, accelerator.current_device_name
    accelerator.device_name = lambda index=None: GPU if index is None else f"{GPU}:{index}"
    accelerator.current_device_name = lambda: f"{GPU}:0"

    def placed_initialize(model, model_parameters, config):  # as from_pretrained(device_map=)
        model.to(f"{GPU}:0")
        # DeepSpeed's own module.to(device) would swap each parameter with itself (a wrapper
        # subclass is never "compatible" for .data =), which its weakrefs forbid: it is placed.
        model.to = lambda *args, **kwargs: model
        try:
            return initialize(model=model, model_parameters=model.parameters(), config=config)
        finally:
            del model.to

    deepspeed.initialize = placed_initialize
    try:
        with on_gpu():
            trainer = trainer_for(model_dir, *case)
            out = update(trainer, batch)
    finally:
        accelerator.device_name, accelerator.current_device_name = names
        deepspeed.initialize = initialize
    out["devices"] = {str(p.device) for p in trainer.policy.engine.module.parameters()}
    return out


def main() -> None:
    install()  # before the process's first backward
    model_dir, out_path = sys.argv[1], sys.argv[2]
    init_distributed()
    results = {}
    for case in CASES:
        torch.manual_seed(0)
        trainer = trainer_for(model_dir, *case)
        vocab = trainer.policy.engine.module.config.vocab_size
        cpu = update(trainer, make_batch(vocab, 0, 0))
        torch.manual_seed(0)
        try:
            gpu = on_the_gpu(model_dir, case, make_batch(vocab, 0, 0))
        except RuntimeError as exc:  # the device error is the finding: report it, go on
            results[case] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            continue
        results[case] = {"cpu": cpu, "gpu": gpu}
    torch.save(results, out_path)


if __name__ == "__main__":
    main()
