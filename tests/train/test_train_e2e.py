"""The whole loop for real: vLLM rollouts, DeepSpeed ZeRO-3 over gloo, weight sync, checkpoints.

- 2 ranks under torchrun: finite loss, parameters changed, post-sync log-prob check within
  1e-4 (fp32), metrics every step.
- SIGKILL mid-run, then ``run.resume=true``: the resumed run reproduces the uninterrupted run's
  metrics for the following steps; partial checkpoints are ignored.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aepo.tasks import toy

pytest.importorskip("vllm")
pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "examples" / "smoke.yaml"
TORCHRUN_2 = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--nproc_per_node",
    "2",
    "-m",
    "aepo.cli",
]
TIMING = {"time_rollout", "time_train", "time_sync", "gen_tokens_per_s"}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return toy.build(tmp_path_factory.mktemp("toy") / "model", steps=150)


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)  # the trainer runs the torch backend on CPU
    return env


def _args(run_dir, base_model, *extra) -> list[str]:
    return [
        "train",
        str(SMOKE),
        f"run.dir={run_dir}",
        f"model.path={base_model}",
        "logging.progress=false",
        *extra,
    ]


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_torchrun(tmp_path, base_model):
    run = tmp_path / "run"
    cmd = [
        *TORCHRUN_2,
        *_args(run, base_model, "run.steps=2"),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert all(v is not None for v in r.values()), r
        assert torch.isfinite(torch.tensor(r["loss"])) and r["sync_logprob_diff"] <= 1e-4
    from safetensors.torch import load_file

    before = load_file(Path(base_model) / "model.safetensors")
    after = load_file(run / "final_model" / "model.safetensors")
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(changed) == len(before), "every parameter should have moved"


def _run(run_dir, base_model, *extra, kill_after: str | None = None):
    cmd = [sys.executable, "-m", "aepo.cli", *_args(run_dir, base_model, "run.steps=4", *extra)]
    proc = subprocess.Popen(
        cmd,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    if kill_after is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        return
    marker = Path(run_dir) / "checkpoints" / kill_after / "COMPLETE"
    deadline = time.time() + 600
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill point"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-step: the next step has already started
    proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base_model) -> list[dict]:
    """Metrics of an uninterrupted 4-step run (shared by the kill and preemption tests)."""
    ref = tmp_path_factory.mktemp("ref") / "run"
    _run(ref, base_model)
    return _metrics(ref)


def _assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        for key in ra.keys() - TIMING:
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])


def test_kill_and_resume_reproduces_metrics(tmp_path, base_model, reference):
    killed = tmp_path / "killed"
    _run(killed, base_model, kill_after="step-2")
    ckpts = killed / "checkpoints"
    shutil.copytree(ckpts / "step-2", ckpts / ".tmp-step-9")  # an unfinished save
    (ckpts / "step-7").mkdir()  # a directory without the COMPLETE marker
    _run(killed, base_model, "run.resume=true")
    _assert_same_metrics(reference, _metrics(killed))


def _wait_for_steps(run_dir: Path, proc, n: int) -> None:
    deadline = time.time() + 600
    path = Path(run_dir) / "metrics.jsonl"
    while not (path.exists() and len(path.read_text().splitlines()) >= n):
        assert proc.poll() is None and time.time() < deadline, "run ended before the signal"
        time.sleep(0.05)


def test_sigterm_checkpoints_exits_0_and_resumes_exactly(tmp_path, base_model, reference):
    """SIGTERM after step 0 (no periodic checkpoints): the running step finishes, its
    checkpoint is written, the process exits 0 with the resume line, and resuming reproduces
    the uninterrupted run's metrics exactly."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "aepo.cli", *_args(run, base_model, "run.steps=4")]
    cmd += ["run.save_every=0"]
    proc = subprocess.Popen(
        cmd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _wait_for_steps(run, proc, 1)  # step 0 logged: step 1 is running
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: finishing the current step" in err
    done = len(_metrics(run))  # 1 or 2: the signal lands during step 1 or just before it
    assert done in (1, 2) and done < 4
    where = run / "checkpoints" / f"step-{done}"
    assert f"stopped by SIGTERM after step {done}; checkpoint {where}" in out
    assert "run.resume=true" in out and "run finished" not in out
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == [f"step-{done}"]
    assert not (run / "final_model").exists()
    _run(run, base_model, "run.resume=true", "run.save_every=0")
    _assert_same_metrics(reference, _metrics(run))


def test_sigterm_to_one_rank_stops_both(tmp_path, base_model):
    """2 ranks: SIGTERM to rank 1's process only; both ranks stop after the same step, write
    one checkpoint together and exit 0."""
    run = tmp_path / "run"
    cmd = [
        *TORCHRUN_2,
        *_args(run, base_model, "run.steps=6", "run.save_every=0"),
    ]
    proc = subprocess.Popen(
        cmd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _wait_for_steps(run, proc, 1)
    ranks = _worker_pids(proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    rows = _metrics(run)
    names = [p.name for p in (run / "checkpoints").glob("step-*")]
    assert names == [f"step-{len(rows)}"] and len(rows) < 6
    assert f"stopped by SIGTERM after step {len(rows)}" in out


def _worker_pids(agent: int) -> list[int]:
    """The torchrun agent's worker processes, in rank order (from /proc)."""
    children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    found = []
    for pid in map(int, children):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            found.append((rank, pid))
    return [pid for _, pid in sorted(found)]
