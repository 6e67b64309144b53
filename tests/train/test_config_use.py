"""Every documented config key does something: a real run (two ``aepo train`` steps, then
``aepo eval``; tests/train/config_use_worker.py) must read each key of the config reference
(docs/config.md) outside the config module, and ``aepo eval`` must read every rollout key
(its budgets, tags and tool deadline are the training run's)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aepo.tasks import toy
from aepo.train.config import config_reference

pytest.importorskip("vllm")
pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("config_use_worker.py")
# Keys a plain CPU run cannot reach, and where they are read.
CONDITIONAL = {
    "model.dtype": "CUDA only (engine.deepspeed_config, rollout.make_engine); CPU runs fp32",
    "optim.max_skipped_steps": "after a skipped step (tests/train/test_nonfinite_guard.py)",
}


def documented_keys() -> list[str]:
    keys = re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \|", config_reference(), flags=re.M)
    return [k for k in keys if not k.startswith("task.options.")]


def test_every_documented_key_is_read(tmp_path):
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
    assert not unread, f"documented keys no run reads: {unread}"
    assert not set(CONDITIONAL) - set(keys)
    not_in_eval = [k for k in keys if k.startswith("rollout.") and k not in reads["eval"]]
    assert not not_in_eval, f"aepo eval ignores {not_in_eval}"
