"""Atomic checkpoints: written into a temporary directory, completed with a marker, then
renamed to ``step-N``. A directory without the marker is never loaded.

Holds the DeepSpeed state (weights, optimizer, ZeRO shards of every rank), the step, the data
cursor and every rank's RNG states.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class CheckpointError(OSError):
    """A checkpoint could not be written; the message names the path and the cause."""


def save_checkpoint(policy, root: Path, step: int, state: dict, keep_last: int = 2) -> Path:
    """Collective: every rank calls it. Returns the final ``root/step-N`` directory.

    A write that fails (full disk, permissions, ...) raises :class:`CheckpointError` naming
    the path on the rank that saw it, after removing the temporary directory: no ``step-N``
    appears and the older checkpoints are untouched (they are pruned only after a success).
    Under torchrun the other ranks are then stopped by the launcher.
    """
    root = Path(root)
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    try:
        _write(policy, root, tmp, final, step, state, keep_last)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(root)
        kept = (
            f"the newest complete checkpoint, {previous[-1]}, is intact"
            if previous
            else ("there is no earlier checkpoint")
        )
        raise CheckpointError(
            f"checkpoint step-{step} could not be written to {tmp} "
            f"({type(exc).__name__}: {exc}); {kept}"
        ) from exc
    return final


def _write(policy, root: Path, tmp: Path, final: Path, step: int, state: dict, keep_last: int):
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    policy.save(str(tmp))
    torch.save(rng_state(), tmp / f"rng-rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}))
        marker = tmp / COMPLETE
        with open(marker, "w") as f:
            f.write(str(step))
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(root, keep_last)
    _barrier()


def _prune(root: Path, keep_last: int) -> None:
    done = complete_checkpoints(root)
    for old in done[: max(0, len(done) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete ``step-N`` directories, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(policy, path: Path) -> dict:
    """Restore DeepSpeed state and this rank's RNG; returns the saved state (step, cursor)."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise RuntimeError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    policy.load(str(path))
    rng = path / f"rng-rank{_rank()}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((path / "state.json").read_text())
