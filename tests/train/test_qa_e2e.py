"""``aepo train examples/qa.yaml`` then ``aepo eval`` from fresh processes: the user's JSONL
files, a model folder with a ChatML chat template (built by examples/qa/make_example.py), real
vLLM and the real search tool over the example corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "qa.yaml"


def _aepo(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "aepo.cli", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qa") / "model"
    script = ROOT / "examples" / "qa" / "make_example.py"
    cmd = [sys.executable, str(script), "--model", str(out), "--steps", "150"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
    return out


def test_train_then_eval_on_user_files(tmp_path, chat_model):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(chat_model).chat_template  # a real chat template
    run = tmp_path / "run"
    common = [f"run.dir={run}", f"model.path={chat_model}", "logging.progress=false"]
    _aepo("train", str(CONFIG), *common, "run.steps=2", "run.save_every=0")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["sync_logprob_diff"] <= 1e-4 for r in rows)
    assert {"em_1hop", "em_2hop"} <= set(rows[0])  # group_key: hops
    assert list((run / "cache").glob("search-*.sqlite"))  # the corpus index, beside the run
    assert (run / "final_model" / "config.json").is_file()

    proc = _aepo("eval", str(CONFIG), *common, "eval.k=2")
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["model"] == str(run / "final_model") and metrics["n"] == 16
    for key in ("em", "f1", "pass@2", "tool_calls", "format_error", "em_1hop", "em_2hop"):
        assert 0 <= metrics[key] <= (3 if key == "tool_calls" else 1), key
    assert metrics["pass@2"] >= metrics["sampled_em"] - 1e-9  # any of 2 >= the mean of 2
    lines = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert len(lines) == 16 and len({line["id"] for line in lines}) == 16
    first = lines[0]
    assert {"question", "response", "answer", "answers", "reward", "tool_calls"} <= set(first)
    assert len(first["sampled_em"]) == 2
    assert sum(line["em"] for line in lines) / 16 == pytest.approx(metrics["em"])
    assert "eval written" in proc.stdout
    print("qa eval:", {k: metrics[k] for k in ("em", "f1", "pass@2", "tool_calls")})
