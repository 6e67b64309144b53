"""The logits kernels' cost model in the benchmark rows and tables: what a GPU run compares its
measured times to (bench_kernels.model_ms, render_bench's "x model" column)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_kernels  # noqa: E402
import render_bench  # noqa: E402

from aepo.kernels import logprob_entropy  # noqa: E402

H200 = logprob_entropy.H200
H100 = H200 | {"bytes_per_s": 3.0e12}  # the same GH100 chip, HBM3 (measured copy, KINDS.md)


def test_model_ms_is_the_cost_model_of_our_kernels():
    n, vocab = 64, 151936
    fwd = logprob_entropy.cost_model("fwd", n, vocab, 2)["model_ms"]
    bwd = logprob_entropy.cost_model("bwd", n, vocab, 2)["model_ms"]
    assert bench_kernels.model_ms("aepo", "fwd", n, vocab, 2, H200) == fwd
    assert bench_kernels.model_ms("aepo", "bwd", n, vocab, 2, H200) == bwd
    assert bench_kernels.model_ms("aepo-inplace", "loss", n, vocab, 2, H200) == fwd + bwd
    assert bench_kernels.model_ms("naive", "fwd", n, vocab, 2, H200) is None
    # bf16 on an H200 is memory-bound: the model is the byte time, twice as long backward
    assert bwd / fwd > 1.9


def test_model_ms_follows_the_measured_device():
    """On an H100 a kernel at the bandwidth floor must read x_model ~1, not 1.43 (GPU_AUDIT
    2.2): the model takes the ceilings measured on the card the rows ran on."""
    n, vocab = 64, 151936
    h200 = bench_kernels.model_ms("aepo", "fwd", n, vocab, 2, H200)
    h100 = bench_kernels.model_ms("aepo", "fwd", n, vocab, 2, H100)
    assert abs(h100 / h200 - 4.3 / 3.0) < 1e-9  # memory-bound: the byte time scales


def _row(impl: str, op: str, **extra) -> dict:
    row = {"suite": "kernels", "device_name": "H200", "n": 8, "vocab": 32, "dtype": "bf16"}
    row |= {"impl": impl, "op": op, "device_ms": 1.0, "host_ms": 0.1, "computes": impl}
    return row | {"peak_extra_bytes": 0, **extra}


def test_table_shows_measured_over_model():
    rows = [
        _row("aepo", "fwd", x_model=1.25),
        _row("aepo", "bwd", x_model=1.5),
        _row("naive", "fwd"),
    ]
    md = render_bench.render(rows)
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| impl |")).split("|")
    col = header.index(" fwd / bwd x model ")
    ours = next(line for line in lines if line.startswith("| aepo |")).split("|")
    naive = next(line for line in lines if line.startswith("| naive |")).split("|")
    assert ours[col].strip() == "1.25 / 1.50"
    assert naive[col].strip() == ""
    assert "logprob_entropy.cost_model" in md
    assert "cost_model" not in render_bench.render(rows[2:])


def test_kernel_rows_skip_the_label_host_sync_and_the_e2e_row_keeps_it(monkeypatch):
    """GPU_AUDIT 2.1: the aepo kernel rows must not contain the public API's host sync (the
    label range check), the aepo-e2e row must; both compute the same values."""
    from aepo.kernels import _checks

    calls = []
    real = _checks._check_label_range
    monkeypatch.setattr(_checks, "_check_label_range", lambda *a: calls.append(1) or real(*a))
    case = bench_kernels.make_case(8, 64, bench_kernels.DTYPES["fp32"], "cpu")
    calls.clear()  # make_case's own old log-probs
    kernel = bench_kernels.forward("aepo", case.logits, case)
    loss = bench_kernels.loss("aepo", case.logits.detach().requires_grad_(), case)
    assert calls == []
    e2e = bench_kernels.forward("aepo-e2e", case.logits, case)
    e2e_loss = bench_kernels.loss("aepo-e2e", case.logits.detach().requires_grad_(), case)
    assert len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(kernel, e2e, strict=True))
    assert torch.equal(loss, e2e_loss)
    assert bench_kernels.skip_reason("aepo-e2e", "bwd", "cuda")


def test_suites_feed_pytest_benchmark_the_device_times(tmp_path):
    """The kernel suites are pytest-benchmark suites: each test's statistics are the device
    times timing.measure took (not the plugin's host clock), its extra_info the row, and
    --benchmark-save / --benchmark-compare work on them."""
    import json
    import os
    import subprocess

    pytest = __import__("pytest")
    pytest.importorskip("pytest_benchmark")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    storage = f"file://{tmp_path / 'store'}"
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    base += ["benchmarks/bench_kernels.py", "--n", "16", "--vocab", "256", "--rounds", "3"]
    base += ["-k", "aepo-fwd or naive-loss", f"--benchmark-storage={storage}"]
    out = tmp_path / "bench.json"
    first = [*base, f"--benchmark-json={out}", "--benchmark-save=first"]
    proc = subprocess.run(first, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    benches = json.loads(out.read_text())["benchmarks"]
    assert {b["extra_info"]["impl"] for b in benches} == {"aepo", "naive"}
    for b in benches:
        info, stats = b["extra_info"], b["stats"]
        assert stats["rounds"] == info["rounds"] == 3
        assert abs(stats["median"] - info["device_ms"] / 1e3) <= 5e-8  # its JSON keeps 0.1 us
    again = [*base, "--benchmark-compare=0001"]  # a table against the saved run
    proc = subprocess.run(again, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "0001_first" in proc.stdout, proc.stdout[-3000:]
