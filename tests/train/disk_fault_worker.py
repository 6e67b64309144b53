"""torchrun worker of test_checkpoint_faults.py: a real PolicyEngine (DeepSpeed, gloo) saves
step-1, then, under a file-size limit that makes every larger write fail with EFBIG (the
error a full disk gives, for real, from the OS), tries step-2; reports what it saw as JSON.

    torchrun --nproc_per_node 1 tests/train/disk_fault_worker.py MODEL_DIR ROOT OUT.json
"""

from __future__ import annotations

import json
import resource
import signal
import sys
from pathlib import Path

import torch

from aepo.train import checkpoint
from aepo.train.config import load_config
from aepo.train.engine import PolicyEngine, init_distributed


def main() -> None:
    model_dir, root, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    init_distributed()
    cfg = load_config(None, ["deepspeed.zero_stage=3", "optim.lr=0.01"])
    policy = PolicyEngine(cfg, model_dir, grad_accum=1)
    first = checkpoint.save_checkpoint(policy, root, 1, {"cursor": 4})
    before = {n: t.clone() for n, t in policy.gathered_parameters()}
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death by signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    report = {"first": str(first)}
    try:
        checkpoint.save_checkpoint(policy, root, 2, {"cursor": 8})
    except checkpoint.CheckpointError as exc:
        report["error"] = str(exc)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    for p in policy.engine.module.parameters():  # perturb, then load step-1 back
        p.data.add_(1.0)
    state = checkpoint.load_checkpoint(policy, Path(first))
    after = {n: t.clone() for n, t in policy.gathered_parameters()}
    report["loaded_state"] = state
    report["restored"] = all(torch.equal(before[n], after[n]) for n in before)
    report["entries"] = sorted(p.name for p in root.iterdir())
    out.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
