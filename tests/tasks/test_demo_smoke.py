"""CI smoke of `make demo`'s pipeline with tiny budgets: SFT, eval, one real RL step
(`aepo train`: vLLM + DeepSpeed), eval of the RL model through a vLLM weight update."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_demo_pipeline_quick(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    cmd = [
        sys.executable,
        "-m",
        "aepo.demo",
        "--quick",
        "--compare",
        "--run-dir",
        str(tmp_path),
        "logging.progress=false",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("demo: 2-hop EM sft=") and last.endswith(("target met", "target missed"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    for stage in ("sft", "flat", "arpo", "aepo"):
        assert summary["results"][stage]["n_2hop"] == 16
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert "| aepo |" in proc.stdout and "distinct / group" in proc.stdout
    rows = [
        json.loads(x) for x in (tmp_path / "rl_aepo" / "metrics.jsonl").read_text().split("\n") if x
    ]
    assert len(rows) == 1 and rows[0]["sync_logprob_diff"] <= 1e-4
    assert rows[0]["grad_norm"] > 0  # ZeRO stage 0 (examples/synthhop.yaml) logs it too
    # SynthHop's metric_group: training EM per hop count of the RL mix (null when a step drew
    # no question of that count).
    per_hop = [rows[0][f"em_{h}hop"] for h in (1, 2)]
    assert "em_3hop" not in rows[0] and any(v is not None for v in per_hop)
    assert all(0.0 <= v <= 1.0 for v in per_hop if v is not None)
    assert (tmp_path / "rl_aepo" / "plots" / "em_groups.png").is_file()
    assert (tmp_path / "rl_aepo" / "final_model" / "model.safetensors").is_file()
    assert (tmp_path / "rl_aepo" / "plots" / "reward.png").is_file()
