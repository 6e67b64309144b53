"""The compile gate: every kernel compiles for real GPU targets, and the gate can fail.

The gate runs in a subprocess without TRITON_INTERPRET (interpreted kernels cannot be compiled);
one run of the resource-report script serves the compile, coverage and spill checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aepo.kernels import (
    _launch,
    _resources,
    compile_gate,
    linear_triton,
    logprob_entropy,
    logprobs_and_entropy,
)
from tests.kernels import gate_fixture

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gate")
    report = out / "report.json"
    proc = _run(["benchmarks/kernel_resources.py", "--out", str(out), "--json", str(report)])
    assert (out / "kernel_resources.md").exists(), proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    data["markdown"] = (out / "kernel_resources.md").read_text()
    data["returncode"] = proc.returncode
    return data


def test_every_kernel_compiles_for_every_target(report):
    assert report["failures"] == [], "\n".join(report["failures"])
    assert report["returncode"] == 0
    by_kernel: dict[str, set] = {}
    for r in report["results"]:
        by_kernel.setdefault(r["variant"]["kernel"], set()).add(r["variant"]["target"])
    found = compile_gate.find_kernels(compile_gate.import_kernel_modules())
    assert {name for _, name in found} == set(by_kernel)
    assert {"_logp_entropy_fwd_kernel", "_logp_entropy_bwd_kernel"} <= set(by_kernel)
    assert all(targets == set(compile_gate.TARGETS) for targets in by_kernel.values())


def _flags(v: dict) -> tuple:
    return (v["constexprs"].get("HAS_LOGP_GRAD"), v["constexprs"].get("HAS_ENTROPY_GRAD"))


BACKWARD_FLAGS = {(True, False), (False, True), (True, True)}


def test_logits_variants_are_what_the_launchers_produce(report):
    """Each dtype gets the launcher's (BLOCK_V, num_warps), and the backward every gradient
    combination, without a hand-kept list: all of it came from recorded launches."""
    seen = set()
    for r in report["results"]:
        v = r["variant"]
        if not v["kernel"].startswith("_logp_entropy"):
            continue
        dtype = v["signature"]["logits_ptr"][1:]
        size = {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]
        assert v["constexprs"]["BLOCK_V"] == logprob_entropy.GPU_CONFIGS[size][0]
        assert v["options"]["num_warps"] == logprob_entropy.GPU_CONFIGS[size][1]
        seen.add((v["kernel"], dtype, _flags(v)))
    for dtype in ("fp32", "bf16", "fp16"):
        assert ("_logp_entropy_fwd_kernel", dtype, (None, None)) in seen
        bwd = {f for k, d, f in seen if k == "_logp_entropy_bwd_kernel" and d == dtype}
        assert bwd == BACKWARD_FLAGS


def test_linear_variants_are_what_the_launchers_produce(report):
    seen = set()
    for r in report["results"]:
        v = r["variant"]
        if not v["kernel"].startswith("_linear"):
            continue
        assert v["options"]["num_warps"] in (linear_triton.GPU_CONFIG["num_warps"], 4)
        if v["kernel"] == "_linear_merge_kernel":
            continue
        for key in ("BLOCK_N", "BLOCK_V", "BLOCK_H"):
            assert v["constexprs"][key] == linear_triton.GPU_CONFIG[key]
        assert v["options"]["num_stages"] == linear_triton.GPU_CONFIG["num_stages"]
        dtype = v["signature"]["x_ptr"][1:]
        assert v["constexprs"]["DOT_FP32"] == (dtype == "fp32")
        seen.add((v["kernel"], dtype, _flags(v)))
    for dtype in ("fp32", "bf16", "fp16"):
        assert ("_linear_fwd_kernel", dtype, (None, None)) in seen
        bwd = {f for k, d, f in seen if k == "_linear_dz_kernel" and d == dtype}
        assert bwd == BACKWARD_FLAGS


def test_no_shipped_configuration_spills_on_sm90(report):
    sm90 = [r for r in report["results"] if r["variant"]["target"] == "sm_90"]
    assert sm90
    # Triton's spills land in the stack frame (cuobjdump's LOCAL stays 0): count both
    spills = [f"{r['label']}: {_resources.spilled(r['resources'])} B spilled" for r in sm90]
    assert all(_resources.spilled(r["resources"]) == 0 for r in sm90), "\n".join(spills)


def test_resource_report_lists_every_compile(report):
    md = report["markdown"]
    assert f"Triton {report['triton']}" in md
    rows = [line for line in md.splitlines() if line.startswith("| sm_") or "| gfx" in line]
    assert len(rows) == len(report["results"])
    assert all(f"| {t} |" in md for t in compile_gate.TARGETS)


def test_gate_fails_on_a_kernel_the_interpreter_accepts(tmp_path):
    # The interpreter (this process) runs the kernel and gets the right answer ...
    x = torch.arange(100, dtype=torch.float32)
    torch.testing.assert_close(gate_fixture.scale(x), 2 * x)
    # ... the compiler refuses it, and the gate says which kernel, which target and why; the
    # kernel that no exercise launches is named too.
    out = tmp_path / "gate.json"
    args = ["-m", "aepo.kernels.compile_gate", "--targets", "sm_90", "--json", str(out)]
    proc = _run([*args, "--also", "tests.kernels.gate_fixture"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failures = json.loads(out.read_text())["failures"]
    broken = [f for f in failures if "_reads_global_kernel" in f]
    assert len(broken) == 1, failures
    assert "for sm_90" in broken[0] and "Cannot access global variable _SCALE" in broken[0]
    assert any("_never_launched_kernel is never launched" in f for f in failures)
    assert "FAIL" in proc.stdout and "_reads_global_kernel" in proc.stdout


def test_gate_refuses_to_run_interpreted():
    if not _launch.INTERPRET:
        pytest.skip("only meaningful under TRITON_INTERPRET=1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET unset"):
        compile_gate.run_gate()


def test_recorded_launch_has_gpu_config_while_interpreter_runs_its_own():
    logits = torch.randn(3, 50)
    labels = torch.tensor([1, 2, 3])
    with _launch.record_launches() as log:
        logp, _ = logprobs_and_entropy(logits, labels, backend="triton")
    expected = torch.log_softmax(logits, -1).gather(-1, labels[:, None])[:, 0]
    torch.testing.assert_close(logp, expected)
    (launch,) = log
    assert launch.kernel is logprob_entropy._logp_entropy_fwd_kernel
    assert launch.kwargs == logprob_entropy.launch_config(4)


def test_record_only_launches_nothing():
    logits = torch.randn(2, 8)
    with _launch.record_launches(run=False) as log:
        logprobs_and_entropy(logits, torch.tensor([0, 1]), backend="triton")
    assert len(log) == 1
    assert not _launch.recording_only()


def test_parse_cuobjdump():
    text = (
        "Resource usage:\n Common:\n  GLOBAL:11 CONSTANT[4]:8\n Function _k:\n"
        "  REG:63 STACK:8 SHARED:1024 LOCAL:16 CONSTANT[0]:616 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
    )
    assert _resources.parse_cuobjdump(text) == {
        "registers": 63,
        "stack": 8,
        "local": 16,
        "shared_static": 1024,
    }
    with pytest.raises(ValueError, match="unexpected cuobjdump output"):
        _resources.parse_cuobjdump("Resource usage:\n")


@pytest.mark.parametrize(
    "regs, smem, warps, arch, blocks, limiter",
    [
        (32, 0, 8, 90, 8, "warps"),  # 1024 regs/warp: 64 warps fit; warps cap at 64
        (63, 1056, 8, 90, 4, "registers"),  # 64 regs -> 2048/warp -> 32 warps -> 4 blocks
        (118, 0, 8, 90, 2, "registers"),  # 120 regs -> 3840/warp -> 17 warps -> 2 blocks
        (32, 100_000, 4, 80, 1, "shared"),  # 164 KiB / (100000 + 1024) -> 1 block
    ],
)
def test_cuda_occupancy(regs, smem, warps, arch, blocks, limiter):
    occ = _resources.cuda_occupancy(regs, smem, warps, arch)
    assert occ["blocks_per_sm"] == blocks
    assert occ["occupancy_limiter"] == limiter
    assert occ["occupancy"] == pytest.approx(blocks * warps / 64)


def test_amd_resources_parse_and_refuse():
    asm = (
        "    .group_segment_fixed_size: 0\n    .private_segment_fixed_size: 0\n"
        "    .sgpr_count:     69\n    .sgpr_spill_count: 0\n    .vgpr_count:     72\n"
        "    .vgpr_spill_count: 2\n; Occupancy: 7\n"
    )
    found = _resources.amd_resources(asm)
    assert (found["vgprs"], found["sgprs"], found["vgpr_spills"], found["waves_per_simd"]) == (
        72,
        69,
        2,
        7,
    )
    with pytest.raises(ValueError, match="vgprs not found"):
        _resources.amd_resources("nothing")
