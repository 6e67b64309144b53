"""Options of the kernel benchmark suites (``pytest benchmarks/bench_kernels.py ...``).

Defaults follow the device: CPU N=8192, V=32000, fp32 (``make bench``); CUDA N=16384,
V=151936 and 32000, bf16 (``make gpu-check``). Each measured row goes to ``--rows`` (JSON
lines, on disk as soon as it is measured) and into the terminal summary.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rows

DTYPE_NAMES = ("fp32", "bf16", "fp16")  # bench_kernels.DTYPES maps them to torch dtypes


@dataclass(frozen=True)
class BenchConfig:
    device: str  # "cpu" or "cuda"
    n: int  # tokens (rows)
    dtype: str  # one of DTYPE_NAMES
    rounds: int  # timed rounds per benchmark (median reported)


def pytest_addoption(parser):
    group = parser.getgroup("aepo kernel benchmarks")
    cuda = torch.cuda.is_available()
    group.addoption("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    group.addoption("--n", type=int, default=None, help="tokens (default: cpu 8192, cuda 16384)")
    group.addoption("--vocab", type=int, action="append", help="vocabulary size (repeatable)")
    group.addoption("--dtype", choices=DTYPE_NAMES, default=None, help="cpu fp32, cuda bf16")
    group.addoption("--hidden", type=int, default=None, help="bench_linear H (cpu 1024, cuda 5120)")
    group.addoption("--rounds", type=int, default=None, help="timed rounds (cpu 3, cuda 10)")
    group.addoption("--rows", type=Path, default=None, help="append each row to this JSONL file")


@pytest.fixture(scope="session")
def bench_cfg(request) -> BenchConfig:
    opt = request.config.getoption
    gpu = opt("--device") == "cuda"
    if gpu and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: no CUDA GPU is visible")
    return BenchConfig(
        device=opt("--device"),
        n=opt("--n") or (16384 if gpu else 8192),
        dtype=opt("--dtype") or ("bf16" if gpu else "fp32"),
        rounds=opt("--rounds") or (10 if gpu else 3),
    )


def pytest_generate_tests(metafunc):
    if "vocab" in metafunc.fixturenames:
        opt = metafunc.config.getoption
        default = [151936, 32000] if opt("--device") == "cuda" else [32000]
        vocabs = opt("--vocab") or default
        metafunc.parametrize("vocab", vocabs, ids=[f"V{v}" for v in vocabs])


@pytest.fixture(scope="session")
def device_ceilings(bench_cfg) -> dict | None:
    """The cost models' ceilings of the GPU the rows run on, measured there (CUDA only): the
    device-to-device copy bandwidth (bytes/s, read + write), a dense 8192^3 bf16 GEMM
    (FLOP/s), and the issue and exp2 rates of the logits model scaled from a GH100 SXM's by
    this GPU's SM count (aepo.kernels.logprob_entropy.H200, which H100 SXM shares but for its
    bandwidth). Not the H200 constants on every card (GPU_AUDIT 2.2)."""
    if bench_cfg.device != "cuda":
        return None
    import timing

    from aepo.kernels import logprob_entropy

    def device_ms(make, run) -> float:
        """Median device time of ``run(*make())``; the operands are freed on return."""
        args = make()
        return timing.measure(lambda: (), lambda: run(*args), "cuda", rounds=10, warmup=2).device_ms

    copy_bytes, k = 2 << 30, 8192
    buffer = lambda: torch.empty(copy_bytes, dtype=torch.uint8, device="cuda")
    copy_ms = device_ms(lambda: (buffer(), buffer()), lambda src, dst: dst.copy_(src))
    square = lambda: (torch.randn(k, k, device="cuda", dtype=torch.bfloat16),)
    gemm_ms = device_ms(square, lambda a: a @ a)
    sms = torch.cuda.get_device_properties(0).multi_processor_count / 132
    base = logprob_entropy.H200
    return {
        "bytes_per_s": 2 * copy_bytes / (copy_ms * 1e-3),
        "gemm_flops_per_s": 2 * k**3 / (gemm_ms * 1e-3),
        "instructions_per_s": base["instructions_per_s"] * sms,
        "exp2_per_s": base["exp2_per_s"] * sms,
        "flops_per_s": base["flops_per_s"] * sms,
    }


_MEASURED: list[dict] = []


@pytest.fixture
def record_row(request):
    """``record_row(row)``: append a measured row to ``--rows`` at once (and the summary)."""
    path = request.config.getoption("--rows")

    def record(row: dict) -> None:
        row = {"test": request.node.nodeid, **row}
        if path is not None:
            rows.append(path, row)
        _MEASURED.append(row)
        to_pytest_benchmark(request, row)

    return record


def to_pytest_benchmark(request, row: dict) -> None:
    """With pytest-benchmark installed and enabled, the row's device-time samples become the
    test's statistics (seconds) and its scalar fields (``device_ms``, ``x_floor``,
    ``x_model``, ``floor_ms``, ...) the ``extra_info``: ``--benchmark-json``,
    ``--benchmark-compare`` and ``--benchmark-histogram`` then compare device time. The
    plugin's own timer would time the host issuing the call, which on a GPU returns before the
    kernels finish; ``timing.measure`` is the clock here. (pytest-benchmark 5: its fixture
    keeps no public way to hand it measured samples.)"""
    if not request.config.pluginmanager.hasplugin("benchmark"):
        return
    bench = request.getfixturevalue("benchmark")
    if bench.disabled:
        return
    bench._mode = "timing.measure (device time)"
    stats = bench._make_stats(1)
    for ms in row.get("device_samples") or [row["device_ms"]]:
        stats.update(ms / 1e3)
    scalar = (int, float, str, bool, type(None))
    bench.extra_info.update({k: v for k, v in row.items() if isinstance(v, scalar)})


def pytest_terminal_summary(terminalreporter):
    if not _MEASURED:
        return
    terminalreporter.section("benchmark rows")
    for row in _MEASURED:
        keys = ("impl", "op", "vocab", "device_ms", "host_ms", "x_floor", "tflops")
        terminalreporter.write_line(json.dumps({k: row[k] for k in keys if k in row}))
