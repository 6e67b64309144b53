"""Every documented config key does something: a real run (two ``aepo train`` steps, then
``aepo eval``; tests/train/config_use_worker.py) must read each key of the config reference
(docs/config.md) with the value the user set, not an overwritten copy
(tests/train/config_reads.py), and ``aepo eval`` must honour the run's rollout budgets, tags,
tool deadline and engine settings."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aepo.train import config
from aepo.train import rollout as train_rollout
from aepo.train.config import config_reference
from tests.train.config_reads import ReadTracker

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("config_use_worker.py")
# Keys a plain CPU run cannot reach, and where they are read.
CONDITIONAL = {
    "model.dtype": "CUDA only (engine.deepspeed_config, rollout.make_engine); CPU runs fp32",
    "optim.max_skipped_steps": "after a skipped step (tests/train/test_nonfinite_guard.py)",
    "rollout.m_fixed": "rollout.mode aepo-fixed or arpo (tests/rollout/test_branching.py)",
}
# Rollout keys for training only: eval rolls out unbranched, at eval.temperature (docs/training.md).
TRAIN_ONLY_ROLLOUT = {"mode", "k", "m_fixed", "beta", "tau", "gamma", "lam", "z", "window",
                      "temperature", "top_p", "logprobs_k"}  # fmt: skip


def documented_keys() -> list[str]:
    keys = re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \|", config_reference(), flags=re.M)
    return [k for k in keys if not k.startswith("task.options.")]


@pytest.fixture
def tracker():
    t = ReadTracker()
    undo = t.install()
    yield t
    undo()


def test_tracker_counts_reads_of_the_users_value(tracker):
    cfg = config.load_config(overrides=["optim.lr=0.5", "rollout.tool_timeout_s=7"])
    tracker.track(cfg)
    assert cfg.optim.lr == 0.5 and tracker.reads == {"default": {"optim.lr"}}
    copy = dataclasses.replace(cfg.optim, lr=0.1, grad_clip=2.0)
    assert copy.lr == 0.1 and copy.grad_clip == 2.0 and copy.micro_batch_size == 4
    assert tracker.reads["default"] == {"optim.lr", "optim.micro_batch_size"}, (
        "a field the copy overwrote must not count as read"
    )
    tracker.reads.clear()
    ro = train_rollout.rollout_config(cfg)  # the tracked copy of the rollout section
    assert tracker.reads == {}, "copying the section is not a use of its keys"
    assert ro.tool_timeout_s == 7.0 and ro.branch.k == 8
    assert tracker.reads["default"] == {"rollout.tool_timeout_s", "rollout.k"}
    flat = dataclasses.replace(ro, branch=dataclasses.replace(ro.branch, k=2))
    tracker.reads.clear()
    assert flat.branch.k == 2 and flat.branch.tau == 0.5 and flat.window == 20
    assert tracker.reads["default"] == {"rollout.tau", "rollout.window"}


def test_tracker_ignores_copies_and_other_instances(tracker):
    cfg = config.load_config()
    tracker.track(cfg)
    config.to_dict(cfg)  # dataclasses.asdict: a copy, not a use
    dataclasses.replace(cfg.run, steps=3)
    assert config.OptimConfig().lr == 1e-4 and config.TrainConfig().run.dir  # not the run's
    assert tracker.reads == {}


@pytest.mark.slow
def test_every_documented_key_is_read(tmp_path):
    pytest.importorskip("vllm")
    pytest.importorskip("deepspeed")
    from aepo.tasks import toy

    model = toy.build(tmp_path / "model", steps=20)
    env = dict(os.environ, DS_ACCELERATOR="cpu", VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(WORKER), str(model), str(tmp_path / "run"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reads = json.loads(out.read_text())
    keys = documented_keys()
    assert len(keys) > 60 and "rollout.tool_timeout_s" in keys
    read = set(reads["train"]) | set(reads["eval"])
    unread = [k for k in keys if k not in read and k not in CONDITIONAL]
    assert not unread, f"documented keys no run reads with the user's value: {unread}"
    assert not set(CONDITIONAL) - set(keys)
    rollout_keys = [k for k in keys if k.startswith("rollout.")]
    eval_keys = [k for k in rollout_keys if k.removeprefix("rollout.") not in TRAIN_ONLY_ROLLOUT]
    assert "rollout.max_result_tokens" in eval_keys and "rollout.engine" in eval_keys
    not_in_eval = [k for k in eval_keys if k not in reads["eval"]]
    assert not not_in_eval, f"aepo eval ignores {not_in_eval}"
