"""make gpu-check without a GPU: arguments, the dry run, the per-command time shares, what a
killed command leaves, the report writer; and a real CPU rehearsal of the bench stage (the rows
the GPU report is built from)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_kernels  # noqa: E402
import gpu_check  # noqa: E402
import render_bench  # noqa: E402
import rows  # noqa: E402
import sweep_kernels  # noqa: E402


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
    assert "-m cuda tests/kernels/test_gpu_linear.py" in proc.stdout  # the riskiest first
    assert proc.stdout.count("benchmarks/bench_kernels.py") == 2  # one run per vocabulary
    assert "--vocab 151936" in proc.stdout and "--dtype bf16" in proc.stdout
    assert "--kernel logits" in proc.stdout and "--kernel linear" not in proc.stdout
    assert "benchmarks/bench_linear.py" in proc.stdout and "--hidden 5120" in proc.stdout
    assert proc.stdout.count("--rows=") == 3 and "_sweep.jsonl" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_default_run_fits_seven_minutes_in_at_most_eight_files():
    args = gpu_check.parse_args([])
    assert args.budget <= 7 * 60 - 60  # a minute for the probe, start-up and the report
    assert len(gpu_check.FILES) <= 8


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


def test_every_bench_command_gets_its_own_share():
    """The first (largest-vocabulary) command cannot take the whole bench stage."""
    ctx = gpu_check.Context(Path("."), "s", "py", 100.0, 16384, (151936, 32000), "bf16")
    cmds = gpu_check.stage_commands("bench", ctx)
    assert cmds[0][0][-2:] == ["--vocab", "151936"] and "benchmarks/bench_linear.py" in cmds[-1][0]
    weights = [w for _, w in cmds]
    first = gpu_check.share(240.0, weights[0], weights)
    assert first == pytest.approx(80.0)  # three commands of equal weight
    # the second gets its share of what the first left, plus the first's unused time
    assert gpu_check.share(240.0 - 30.0, weights[1], weights[1:]) == pytest.approx(105.0)


def test_a_killed_command_keeps_its_rows_and_output(tmp_path):
    """A command over its limit is stopped with its whole process group; every row it wrote
    and every line it printed survive."""
    ctx = gpu_check.Context(tmp_path, "gpu_x", sys.executable, 60.0, 1, (1,), "bf16")
    out = tmp_path / "rows.jsonl"
    script = (
        "import subprocess, sys, time; sys.path.insert(0, 'benchmarks'); import rows\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print('CHILD_PID', child.pid)\n"
        f"for i in range(2): rows.append({str(out)!r}, {{'i': i}}); print('row', i)\n"
        "time.sleep(120)\n"
    )
    start = time.monotonic()
    run = gpu_check.run_command([sys.executable, "-c", script], ctx, limit=8.0)
    assert time.monotonic() - start < 8.0 + 2 * gpu_check.KILL_GRACE_S
    assert run["timed_out"] and run["rc"] is None
    assert rows.read(out) == [{"i": 0}, {"i": 1}]
    log = ctx.path("_log.txt").read_text()
    assert "row 0" in log and "row 1" in log and "limit 8 s" in log
    child = int(next(ln for ln in log.splitlines() if ln.startswith("CHILD_PID")).split()[1])
    with pytest.raises(ProcessLookupError):  # the grandchild went with the group
        for _ in range(50):
            os.kill(child, 0)
            time.sleep(0.1)


def test_a_stopped_test_run_is_counted_from_its_log(tmp_path):
    """pytest writes its JUnit XML only at the end: a stopped run is read from its -v lines."""
    ctx = gpu_check.Context(tmp_path, "gpu_x", "py", 60.0, 1, (1,), "bf16")
    ctx.path("_log.txt").write_text(
        "$ python -m pytest -v -m cuda tests\n"
        "tests/kernels/test_gpu.py::test_a[bf16] PASSED      [ 10%]\n"
        "tests/kernels/test_gpu.py::test_b FAILED            [ 20%]\n"
        "tests/kernels/test_gpu.py::test_c SKIPPED (why)     [ 30%]\n"
        "benchmarks/bench_kernels.py::test_kernel[V1-aepo-fwd] PASSED\n"
        "tests/kernels/test_gpu.py::test_d \n[gpu-check: stopped after its 9 s share]\n"
    )
    got = gpu_check.summarize_tests(ctx)
    assert got["counts"] == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1}
    assert got["failed"] == ["tests/kernels/test_gpu.py::test_b"] and got["from_log"]


def test_rows_survive_a_line_cut_off_mid_write(tmp_path):
    path = tmp_path / "r.jsonl"
    rows.append(path, {"a": 1})
    with path.open("a") as f:
        f.write('{"a": 2, "b"')  # killed here
    assert rows.read(path) == [{"a": 1}]
    assert rows.read(tmp_path / "none.jsonl") == []


def test_our_kernels_run_first_and_torch_compile_last():
    assert bench_kernels.IMPLS[:2] == ("aepo", "aepo-inplace")
    assert bench_kernels.IMPLS[-1] == "compiled"


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> Path:
    """The bench and memory stages of gpu_check, rehearsed for real on CPU at a tiny size."""
    out = tmp_path_factory.mktemp("gpu")
    args = ["benchmarks/gpu_check.py", "--rehearse", "--stages", "bench", "memory"]
    args += ["--vocab", "4096", "--out", str(out), "--budget", "500"]
    proc = _run(*args, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _stem(out: Path) -> str:
    return next(p.name for p in out.iterdir() if p.suffix == ".md")[: -len(".md")]


def test_rehearsal_writes_every_row_and_at_most_eight_files(rehearsal):
    stem = _stem(rehearsal)
    assert len(list(rehearsal.iterdir())) <= 8
    got = {(r["suite"], r["impl"], r["op"]): r for r in rows.read(rehearsal / f"{stem}_rows.jsonl")}
    kernels = {(i, o) for s, i, o in got if s == "kernels"}
    assert kernels == {
        ("naive", "fwd"),
        ("naive", "bwd"),
        ("naive", "loss"),
        ("aepo", "fwd"),
        ("aepo", "bwd"),
        ("aepo", "loss"),
        ("aepo-inplace", "bwd"),
        ("aepo-inplace", "loss"),
        ("aepo-e2e", "fwd"),  # the public API end to end, its label check's sync included
        ("aepo-e2e", "loss"),
    }
    linear = {i for s, i, _ in got if s == "linear"}
    assert {"aepo-linear", "matmul+fused", "naive", "trl-chunked", "liger"} <= linear
    logits_bytes = 256 * 4096 * 4
    for (suite, _, op), r in got.items():
        assert r["device_ms"] > 0 and r["host_ms"] > 0 and r["rounds"] == 1
        if suite == "kernels":
            assert r["bytes"] == {"fwd": 1, "bwd": 2, "loss": 3}[op] * logits_bytes
    # the naive loss holds at least an fp32 [N, V] log-softmax besides the inputs
    assert got[("kernels", "naive", "loss")]["peak_extra_bytes"] >= logits_bytes
    log = (rehearsal / f"{stem}_log.txt").read_text()
    assert "test_kernel[V4096-aepo-fwd] PASSED" in log  # streamed as it ran


def test_rehearsal_report(rehearsal):
    stem = _stem(rehearsal)
    md = (rehearsal / f"{stem}.md").read_text()
    assert md.startswith("# GPU check: cpu rehearsal")
    assert "## bench: ok" in md and "## N=256 V=4096 fp32" in md
    assert "| aepo-inplace |" in md and "| trl-chunked |" in md
    assert md.count("| kernels | 4096 | naive |") == 3  # the memory table: one row per op
    saved = json.loads((rehearsal / f"{stem}.json").read_text())
    assert set(saved["stages"]) == {"bench", "memory"}
    assert saved["env"]["peers"]["trl-chunked"] is None  # importable here


def test_report_names_failures_timeouts_and_missing_peers(tmp_path):
    ctx = gpu_check.Context(tmp_path, "gpu_x", "py", 300.0, 256, (4096,), "fp32")
    (tmp_path / "gpu_x_tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.kernels.test_gpu" name="test_a"><failure/></testcase>'
        '<testcase classname="tests.kernels.test_gpu" name="test_b"/></testsuite></testsuites>'
    )
    head = {"kernel": "logits", "n": 256, "vocab": 4096, "dtype": "bf16"}
    default = {"BLOCK_V": 8192, "num_warps": 8}
    grid = [
        {"BLOCK_V": 4096, "num_warps": 8, "fwd_ms": 1.5, "bwd_ms": 3.0},
        {"BLOCK_V": 8192, "num_warps": 8, "fwd_ms": 1.2, "bwd_ms": 3.5},
        {"BLOCK_V": 16384, "num_warps": 4, "error": "OutOfResources: shared memory"},
    ]
    for row in grid:
        rows.append(ctx.path("_sweep.jsonl"), {**head, "default": default, "row": row})
    env = {"device": "Test GPU", "driver": "1.2", "torch": "t", "triton": "3.6", "python": "3"}
    env |= {"date": "today", "peers": {"liger": "not importable", "trl-triton": None}}
    stages = {}
    for name in ("tests", "sweep"):
        stages[name] = {"status": "ok", "runs": [], "seconds": 1.0}
        stages[name].update(gpu_check.SUMMARIES[name](ctx))
    run = {"cmd": "python sweep", "rc": None, "timed_out": True, "seconds": 9.0, "tail": "boom"}
    stages["sweep"]["runs"] = [run, {"cmd": "python sweep2", "rc": None, "skipped": True}]
    gpu_check.write_report(ctx, env, stages)
    md = (tmp_path / "gpu_x.md").read_text()
    assert "# GPU check: Test GPU" in md and "driver 1.2" in md and "Triton 3.6" in md
    assert "skipped): liger (not importable)." in md
    assert "3 tests: 1 failed" in md and "FAILED tests.kernels.test_gpu::test_a" in md
    assert "best fwd: BLOCK_V=8192, num_warps=8" in md and "OutOfResources" in md
    assert "`python sweep` (timed out after 9.0 s)" in md and "boom" in md
    assert "`python sweep2`: not started (no time left)" in md


def test_sweep_rows_rebuild_the_result(tmp_path):
    """A sweep killed after two configurations still reports them, best one included."""
    path = tmp_path / "s.jsonl"
    timed = iter([{"fwd_ms": 2.0, "bwd_ms": 5.0}, {"fwd_ms": 1.0, "bwd_ms": 6.0}])
    head = {"kernel": "logits", "n": 8, "vocab": 64, "dtype": "bf16"}
    grid = sweep_kernels.LOGITS_GRID[:2]
    sweep_kernels._run_grid(grid, lambda c: next(timed), head, dict(grid[0]), path)
    (result,) = sweep_kernels.results_from_rows(rows.read(path))
    assert result["default"] == grid[0] and len(result["rows"]) == 2
    assert result["best"]["fwd"]["fwd_ms"] == 1.0 and result["best"]["bwd"]["bwd_ms"] == 5.0


def test_collecting_the_cuda_tests_needs_no_vllm_deepspeed_or_liger():
    """What `make gpu-check` collects on a GPU machine that has none of the three."""
    args = ["-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p", "tests.block_heavy"]
    proc = _run(*args, "-p", "no:cacheprovider", "tests")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "tests/kernels/test_gpu.py::test_inplace_grad_on_gpu" in proc.stdout
    assert "error" not in proc.stdout.lower().split("short test summary")[0]


def test_cuda_test_order_covers_every_cuda_test_compile_cases_last():
    """The tests stage passes the cuda tests in priority order (GPU_AUDIT 2.3): the same
    set as `-m cuda tests`, each once, the GEMM tests first, the Inductor compile cases last."""
    base = ["-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p", "no:cacheprovider"]
    ids = lambda proc: [ln for ln in proc.stdout.splitlines() if "::" in ln]
    everything = ids(_run(*base, "tests"))
    ordered = ids(_run(*base, *gpu_check.CUDA_TEST_ORDER))
    assert len(ordered) == len(set(ordered)) and set(ordered) == set(everything)
    assert ordered[0].startswith("tests/kernels/test_gpu_linear.py::")
    compile_cases = [i for i, t in enumerate(ordered) if "test_torch_compile" in t]
    assert compile_cases == list(range(len(ordered) - len(compile_cases), len(ordered)))


def test_sweep_render_format():
    default = dict(sweep_kernels.LOGITS_GRID[0])
    good = {**default, "fwd_ms": 2.0, "bwd_ms": 6.0}
    bad = {**sweep_kernels.LOGITS_GRID[1], "error": "OutOfResources: shared memory"}
    result = {"kernel": "logits", "n": 16384, "vocab": 151936, "dtype": "bf16"}
    result |= {"default": default, "rows": [good, bad], "best": {"fwd": good, "bwd": good}}
    md = "\n".join(sweep_kernels.render(result))
    assert "logits kernels, N=16384 V=151936 bf16" in md
    assert "| 2048 | 4 | 2.000 | 6.000 |" in md
    assert "OutOfResources" in md and "best bwd: BLOCK_V=2048, num_warps=4" in md


def test_render_bench_markdown(rehearsal):
    stem = _stem(rehearsal)
    md = render_bench.render(rows.read(rehearsal / f"{stem}_rows.jsonl"))
    naive = next(line for line in md.splitlines() if line.startswith("| naive |"))
    assert naive.split("|")[6].strip() == "1.00"  # loss x naive of naive itself
