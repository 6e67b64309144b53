"""The non-finite guard for real: ``aepo train`` with a task whose rewards are NaN at chosen
steps (tests/train/nan_task.py), so the loss is NaN. A skipped step leaves the weights and the
optimizer state bit for bit as they were (compared through the DeepSpeed checkpoints written
before and after it), every rank skips even when only one saw the NaN, training goes on, and
optim.max_skipped_steps consecutive skips stop the run with the last good checkpoint newest."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.test_train_e2e import ROOT, SMOKE, _env

pytest.importorskip("vllm")
pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    from aepo.tasks import toy

    return toy.build(tmp_path_factory.mktemp("toy") / "model", steps=150)


def _train(run: Path, model: Path, ranks: int, *extra: str) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
    cmd = [*(launch if ranks > 1 else [sys.executable]), "-m", "aepo.cli", "train", str(SMOKE)]
    cmd += [f"run.dir={run}", f"model.path={model}", "logging.progress=false"]
    cmd += ["task.module=tests.train.nan_task", "task.name=toy-nan", "run.save_every=1"]
    cmd += ["run.keep_last=10", "logging.tensorboard=false", *extra]
    return subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every DeepSpeed file of a checkpoint: weights and optimizer state."""
    out = {}
    for f in sorted((ckpt / "ds").rglob("*.pt")):
        blob = torch.load(f, map_location="cpu", weights_only=False)
        out |= {f"{f.name}{k}": t for k, t in _tensors(blob)}
    assert len(out) > 10, ckpt
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_skip_one_step_on_one_rank_stage3_then_stop_after_three(tmp_path, base_model):
    """2 ranks, ZeRO-3, NaN on rank 1 only at step 1, then at steps 3-5: step 1 is skipped on
    both ranks with the state bit-identical, step 2 trains, steps 3-5 skip and the run stops
    with the newest checkpoint holding the state step 2 left."""
    run = tmp_path / "run"
    proc = _train(
        run,
        base_model,
        2,
        "task.options.nan_steps=[1,3,4,5]",
        "task.options.nan_ranks=[1]",
        "run.steps=8",
    )
    assert proc.returncode != 0
    assert "3 consecutive optimizer steps had a non-finite loss" in proc.stderr
    assert "optim.max_skipped_steps=3" in proc.stderr
    assert "step 1: non-finite loss; optimizer step skipped on every rank" in proc.stdout
    rows = _metrics(run)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 2, 3]  # step 5 raised before logging
    assert math.isfinite(rows[2]["loss"]) and rows[2]["skipped"] == 0
    ckpts = run / "checkpoints"
    names = sorted((p.name for p in ckpts.glob("step-*")), key=lambda n: int(n[5:]))
    assert names == ["step-1", "step-2", "step-3", "step-4", "step-5"]
    state = {n: _state(ckpts / n) for n in names}
    assert _same(state["step-1"], state["step-2"])  # step 1 skipped: nothing changed
    assert not _same(state["step-2"], state["step-3"])  # step 2 trained
    assert _same(state["step-3"], state["step-5"])  # steps 3, 4 skipped; 5 raised, no save


def test_skipped_step_leaves_state_bit_identical_stage0(tmp_path, base_model):
    """1 rank, ZeRO stage 0 (DeepSpeed's skip path driven by us): the checkpoints before and after
    the skipped step are identical tensor for tensor; the run finishes and step 2 trains."""
    run = tmp_path / "run"
    proc = _train(
        run, base_model, 1, "task.options.nan_steps=[1]", "run.steps=3", "deepspeed.zero_stage=0"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(run)
    assert [r["skipped"] for r in rows] == [0, 1, 0]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]
    assert rows[1]["loss"] is None and math.isfinite(rows[2]["loss"])  # NaN is logged as null
    ckpts = run / "checkpoints"
    state = {n: _state(ckpts / f"step-{n}") for n in (1, 2, 3)}
    assert _same(state[1], state[2]) and not _same(state[2], state[3])
    assert all(torch.isfinite(t).all() for t in state[3].values() if t.is_floating_point())
