"""make gpu-check without a GPU: argument handling, the dry run, the report writer; and the
pytest-benchmark kernel suite run for real on CPU (the JSON the GPU report is built from)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import render_bench  # noqa: E402


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_dry_run_lists_every_stage_and_writes_nothing(tmp_path):
    proc = _run("benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    for stage in gpu_check.STAGES:
        assert f"{stage}: about" in proc.stdout
    assert "-m cuda tests" in proc.stdout
    assert proc.stdout.count("benchmarks/bench_kernels.py") == 2  # one run per vocabulary
    assert "--vocab 151936" in proc.stdout and "--dtype bf16" in proc.stdout
    assert "--kernel logits" in proc.stdout and "--kernel linear" in proc.stdout
    assert "benchmarks/bench_linear.py" in proc.stdout and "--hidden 5120" in proc.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stages", "nope"], "invalid choice: 'nope'"),
        (["--budget", "0"], "must be positive"),
        (["--vocab", "-3"], "must be positive"),
    ],
    ids=["unknown-stage", "zero-budget", "negative-vocab"],
)
def test_bad_arguments_are_refused(args, message):
    proc = _run("benchmarks/gpu_check.py", *args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_without_a_gpu_it_says_so(tmp_path):
    proc = _run("benchmarks/gpu_check.py", "--out", str(tmp_path), "--python", sys.executable)
    assert proc.returncode == 3
    assert "no usable CUDA GPU" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_stage_limits_pass_unused_time_on():
    ctx = gpu_check.Context(Path("."), "s", "py", 100.0, 1, (1,), "bf16")
    first = gpu_check.stage_limit("tests", ctx, list(gpu_check.STAGES))
    assert first == pytest.approx(100 * gpu_check.SHARES["tests"], abs=0.5)
    later = gpu_check.stage_limit("sweep", ctx, ["sweep", "memory"])
    assert later == pytest.approx(ctx.left(), abs=0.5)  # all that is left
    assert gpu_check.stage_limit("memory", ctx, ["memory"]) == 0.0


@pytest.fixture(scope="module")
def cpu_bench(tmp_path_factory) -> Path:
    """The kernel benchmark suite, run for real on CPU at a small size."""
    out = tmp_path_factory.mktemp("bench") / "gpu_x_bench_V4096.json"
    args = ["-m", "pytest", "benchmarks/bench_kernels.py", "-q", "-p", "no:cacheprovider"]
    args += ["--n", "256", "--vocab", "4096", "--rounds", "1", f"--benchmark-json={out}"]
    proc = _run(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_cpu_bench_records_bytes_and_memory(cpu_bench):
    benches = json.loads(cpu_bench.read_text())["benchmarks"]
    got = {(b["extra_info"]["impl"], b["extra_info"]["op"]): b for b in benches}
    assert set(got) == {
        ("naive", "fwd"),
        ("naive", "bwd"),
        ("naive", "loss"),
        ("aepo", "fwd"),
        ("aepo", "bwd"),
        ("aepo", "loss"),
        ("aepo-inplace", "bwd"),
        ("aepo-inplace", "loss"),
    }
    logits_bytes = 256 * 4096 * 4
    for (_, op), b in got.items():
        info = b["extra_info"]
        assert info["bytes"] == {"fwd": 1, "bwd": 2, "loss": 3}[op] * logits_bytes
        assert b["stats"]["median"] > 0
    # the naive loss holds at least an fp32 [N, V] log-softmax besides the inputs
    assert got[("naive", "loss")]["extra_info"]["peak_extra_bytes"] >= logits_bytes


def test_report_writer(cpu_bench, tmp_path):
    ctx = gpu_check.Context(tmp_path, "gpu_x", "py", 300.0, 256, (4096,), "fp32")
    (tmp_path / "gpu_x_bench_V4096.json").write_text(cpu_bench.read_text())
    (tmp_path / "gpu_x_tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.kernels.test_gpu" name="test_a"><failure/></testcase>'
        '<testcase classname="tests.kernels.test_gpu" name="test_b"/></testsuite></testsuites>'
    )
    sweep = {"n": 256, "vocab": 4096, "dtype": "bf16", "default": {"BLOCK_V": 8192, "num_warps": 8}}
    sweep["rows"] = [
        {"BLOCK_V": 4096, "num_warps": 8, "fwd_ms": 1.5, "bwd_ms": 3.0},
        {"BLOCK_V": 8192, "num_warps": 8, "fwd_ms": 1.2, "bwd_ms": 3.5},
        {"BLOCK_V": 16384, "num_warps": 4, "error": "OutOfResources: shared memory"},
    ]
    sweep["best"] = {"fwd": sweep["rows"][1], "bwd": sweep["rows"][0]}
    (tmp_path / "gpu_x_sweep.json").write_text(json.dumps(sweep))
    env = {"device": "Test GPU", "driver": "1.2", "torch": "t", "triton": "3.6", "python": "3"}
    env |= {"date": "today", "peers": {"liger_kernel": False, "transformers": True}}
    stages = {}
    for name in gpu_check.STAGES:
        stages[name] = {"status": "ok", "runs": [], "seconds": 1.0}
        stages[name].update(gpu_check.SUMMARIES[name](ctx))
    stages["sweep"]["runs"] = [{"cmd": "python sweep", "rc": 1, "tail": "boom", "stderr_tail": ""}]
    gpu_check.write_report(ctx, env, stages)
    md = (tmp_path / "gpu_x.md").read_text()
    assert "# GPU check: Test GPU" in md and "driver 1.2" in md and "Triton 3.6" in md
    assert "skipped): liger_kernel" in md
    assert "3 tests: 1 failed" in md and "FAILED tests.kernels.test_gpu::test_a" in md
    assert "| naive |" in md and "| aepo-inplace |" in md
    assert "best fwd: BLOCK_V=8192, num_warps=8" in md and "OutOfResources" in md
    assert md.count("| 4096 | naive |") == 3  # the memory table: one row per op
    assert "`python sweep` (rc 1)" in md and "boom" in md
    saved = json.loads((tmp_path / "gpu_x.json").read_text())
    assert saved["env"]["device"] == "Test GPU" and set(saved["stages"]) == set(gpu_check.STAGES)


def test_render_bench_markdown(cpu_bench):
    md = render_bench.render(json.loads(cpu_bench.read_text()))
    assert "## N=256 V=4096 fp32" in md
    naive = next(line for line in md.splitlines() if line.startswith("| naive |"))
    assert naive.split("|")[5].strip() == "1.00"  # loss x naive of naive itself


def test_collecting_the_cuda_tests_needs_no_vllm_deepspeed_or_liger():
    """What `make gpu-check` collects on a GPU machine that has none of the three."""
    args = ["-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p", "tests.block_heavy"]
    proc = _run(*args, "-p", "no:cacheprovider", "tests")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "tests/kernels/test_gpu.py::test_inplace_grad_on_gpu" in proc.stdout
    assert "error" not in proc.stdout.lower().split("short test summary")[0]


def test_sweep_render_linear_format():
    import sweep_kernels

    default = dict(sweep_kernels.LINEAR_GRID[0])
    good = {**default, "fwd_ms": 2.0, "bwd_ms": 6.0, "fwd_tflops": 410.0, "bwd_tflops": 400.0}
    bad = {**sweep_kernels.LINEAR_GRID[1], "error": "OutOfResources: shared memory"}
    result = {"kernel": "linear", "n": 4096, "hidden": 5120, "vocab": 151936, "dtype": "bf16"}
    result |= {"default": default, "rows": [good, bad], "best": {"fwd": good, "bwd": good}}
    md = "\n".join(sweep_kernels.render(result))
    assert "linear kernels, N=4096 H=5120 V=151936 bf16" in md
    assert "| 64 | 128 | 64 | 8 | 3 | 2.000 | 6.000 | 410.000 | 400.000 |" in md
    assert "OutOfResources" in md and "best bwd: BLOCK_N=64, BLOCK_V=128" in md
