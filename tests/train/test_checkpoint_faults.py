"""Disk trouble while checkpointing, for real: the OS refuses the write (a file-size limit,
EFBIG, as a full disk would) in the middle of DeepSpeed's save. The error names the path and
the cause, no ``step-N`` or temporary directory is left, and the previous checkpoint loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aepo.models import build_model, save, train_tokenizer

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_failed_checkpoint_write_is_named_and_leaves_the_previous_one(tmp_path):
    tok = train_tokenizer([f"the {a} of {b}" for a in "xyz" for b in "abc"], vocab_size=300)
    model = save(build_model(tok, hidden=64, layers=2, heads=2), tok, tmp_path / "model")
    root, out = tmp_path / "checkpoints", tmp_path / "report.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        str(ROOT / "tests" / "train" / "disk_fault_worker.py"),
        str(model),
        str(root),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    error = report.get("error", "")
    assert f"checkpoint step-2 could not be written to {root / '.tmp-step-2'}" in error
    assert "RuntimeError: [enforce fail" in error or "File too large" in error  # the cause
    assert f"the newest complete checkpoint, {root / 'step-1'}, is intact" in error
    assert report["entries"] == ["step-1"]  # no step-2, no .tmp-step-2
    assert report["loaded_state"] == {"step": 1, "cursor": 4}
    assert report["restored"]  # step-1's weights came back after they were perturbed
