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
    # rows of 50 fp32 are not 16-element aligned: one element per lane and load (VEC=1)
    assert launch.kwargs == logprob_entropy.fwd_launch_config(4, aligned=False)
    assert launch.kwargs["VEC"] == 1 and launch.kwargs["LANES"] == 32 * launch.kwargs["num_warps"]


def test_record_only_launches_nothing():
    logits = torch.randn(2, 8)
    with _launch.record_launches(run=False) as log:
        logprobs_and_entropy(logits, torch.tensor([0, 1]), backend="triton")
    assert len(log) == 1
    assert not _launch.recording_only()


def _aligned_16bit_sm90(report, kernel: str) -> list[dict]:
    """sm_90 compiles of ``kernel`` for 16-bit logits with 16-element aligned rows (a vocabulary
    such as 151936 that is a multiple of 16, the shipped launch configuration)."""
    found = []
    for r in report["results"]:
        v = r["variant"]
        aligned = {"stride_t", "V"} <= set(r["divisible"])
        sixteen = v["signature"]["logits_ptr"] in ("*bf16", "*fp16")
        if v["target"] == "sm_90" and v["kernel"] == kernel and aligned and sixteen:
            found.append(r)
    return found


def _elements(r: dict) -> int:
    v = r["variant"]
    return v["constexprs"]["BLOCK_V"] // (32 * v["options"]["num_warps"])


@pytest.mark.parametrize(
    "kernel, op", [("_logp_entropy_fwd_kernel", "fwd"), ("_logp_entropy_bwd_kernel", "bwd")]
)
def test_logits_main_loop_keeps_up_with_h200_bandwidth(report, kernel, op):
    """SASS instructions per vocabulary element of the main loop, sm_90, 16-bit logits.

    Bound: what an H200 can issue per element while the memory streams at full speed
    (logprob_entropy.max_instructions_per_element): 132 SMs x 4 schedulers x 1 warp
    instruction / clock x 1.98 GHz x 32 threads = 3.35e13 thread instructions/s, over the
    element rate of the measured 4.3 TB/s copy bandwidth. Forward, 2 B read per element:
    2.15e12 elements/s -> 15.6, gated at 15. Backward, 2 B read + 2 B written: 1.075e12
    elements/s -> 31.1, gated at 31. (fp32 moves twice the bytes per element: 31 and 62; the
    report lists those variants.) The loop must also be one block iteration (its loads cover
    exactly the thread's BLOCK_V / threads elements), or the count would not be per element.
    """
    bytes_per_element = {"fwd": 2, "bwd": 4}[op]
    bound = int(logprob_entropy.max_instructions_per_element(bytes_per_element))
    assert bound == {"fwd": 15, "bwd": 31}[op]
    found = _aligned_16bit_sm90(report, kernel)
    assert found, f"no aligned 16-bit sm_90 compile of {kernel}"
    for r in found:
        res = r["resources"]
        assert res["loop_load_bytes"] == 2 * _elements(r), r["label"]
        assert res["loop_per_element"] == pytest.approx(res["loop_instructions"] / _elements(r))
        assert res["loop_per_element"] <= bound, (
            f"{r['label']}: {res['loop_per_element']:.2f} SASS instructions per element > {bound}"
        )


def test_cost_model_instruction_counts_match_the_gate(report):
    """logprob_entropy.SASS_PER_ELEMENT (the cost model's issue term) is within 10% of what
    the compile gate measures on sm_90 at aligned rows (backward: both gradients)."""
    for (op, size), modelled in logprob_entropy.SASS_PER_ELEMENT.items():
        kernel = f"_logp_entropy_{op}_kernel"
        dtype = {2: "*bf16", 4: "*fp32"}[size]
        measured = [
            r["resources"]["loop_per_element"]
            for r in report["results"]
            if r["variant"]["target"] == "sm_90"
            and r["variant"]["kernel"] == kernel
            and r["variant"]["signature"]["logits_ptr"] == dtype
            and {"stride_t", "V"} <= set(r["divisible"])
            and r["variant"]["constexprs"].get("HAS_ENTROPY_GRAD", True)
            and r["variant"]["constexprs"].get("HAS_LOGP_GRAD", True)
        ]
        assert len(measured) == 1, (op, size, measured)
        assert measured[0] == pytest.approx(modelled, rel=0.1), (op, size)


def test_cost_model_bytes_and_bounds():
    fwd = logprob_entropy.cost_model("fwd", 16384, 151936, 2)
    bwd = logprob_entropy.cost_model("bwd", 16384, 151936, 2)
    elements = 16384 * 151936
    assert fwd["bytes"] == 2 * elements + 16384 * (8 + 2 + 16)
    assert bwd["bytes"] == 4 * elements + 16384 * (20 + 8 + 4)
    assert fwd["bound"] == bwd["bound"] == "bytes"  # bf16 at H200: memory-bound, both ways
    assert fwd["model_ms"] == pytest.approx(1e3 * fwd["bytes"] / 4.3e12)
    assert bwd["floors_ms"]["instructions"] < bwd["floors_ms"]["bytes"]


# cuobjdump --dump-sass, shortened: a loop that loads (16 + 8 bytes per thread, 6 instructions),
# a longer store-only loop (closed by sm_100's uniform-predicate branch), the trap after EXIT.
SASS = """
        code for sm_90a
                Function : _k
        /*0000*/        LDC R1, c[0x0][0x28] ;                   /* 0x00000a00ff017b82 */
                                                         /* 0x000fe20000000800 */
        /*0010*/    @P0 BRA 0x80 ;                               /* 0x0000000000580947 */
        /*0020*/        IADD3 R2, R2, 0x1, RZ ;                  /* 0x0000000102027810 */
        /*0030*/   @!P0 LDG.E.128 R4, desc[UR6][R30.64] ;        /* 0x000000061e048981 */
        /*0040*/        LDG.E.64 R8, desc[UR6][R30.64+0x10] ;    /* 0x000000061e048981 */
        /*0050*/        MUFU.EX2 R4, R4 ;                        /* 0x0000000400047308 */
        /*0060*/        ISETP.GE.AND P1, PT, R2, R26, PT ;       /* 0x0000001a0200720c */
        /*0070*/   @!P1 BRA 0x20 ;                               /* 0xffffffdc00609947 */
        /*0080*/        STG.E desc[UR6][R30.64], RZ ;            /* 0x000000ff1e007986 */
        /*0090*/        IADD3 R2, R2, 0x1, RZ ;                  /* 0x0000000102027810 */
        /*00a0*/        IADD3 R3, R3, 0x1, RZ ;                  /* 0x0000000102027810 */
        /*00b0*/        IADD3 R5, R5, 0x1, RZ ;                  /* 0x0000000102027810 */
        /*00c0*/        IADD3 R6, R6, 0x1, RZ ;                  /* 0x0000000102027810 */
        /*00d0*/        IADD3 R7, R7, 0x1, RZ ;                  /* 0x0000000102027810 */
        /*00e0*/        BRA.U !UP0, 0x80 ;                       /* 0xffffffdc00609947 */
        /*00f0*/        EXIT ;                                   /* 0x000000000000794d */
        /*0100*/        BRA 0x100;                               /* 0xfffffffc00fc7947 */
"""


def test_sass_main_loop_is_the_loop_that_loads():
    loops = _resources.sass_loops(SASS)
    assert [(lp["start"], lp["end"], lp["instructions"]) for lp in loops] == [
        (0x20, 0x70, 6),
        (0x80, 0xE0, 7),
        (0x100, 0x100, 1),
    ]
    assert _resources.main_loop(SASS) == loops[0]
    assert loops[0]["loads"] == 2 and loops[0]["load_bytes"] == 24 and loops[0]["stores"] == 0
    assert loops[1]["stores"] == 1 and loops[1]["loads"] == 0
    assert _resources.loop_resources(SASS) == {"loop_instructions": 6, "loop_load_bytes": 24}
    assert _resources.loop_resources(SASS.replace("LDG", "LDS")) == {
        "loop_instructions": None,
        "loop_load_bytes": None,
    }


def test_sass_innermost_loop_wins():
    nested = SASS.replace("!UP0, 0x80 ;", "!UP0, 0x20 ;")  # an outer loop around both
    loops = _resources.sass_loops(nested)
    assert [lp["innermost"] for lp in loops] == [True, False, True]
    assert _resources.main_loop(nested)["end"] == 0x70


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
