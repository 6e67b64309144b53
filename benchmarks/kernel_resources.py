"""Resource report of every shipped kernel launch configuration, for every GPU target.

Runs the compile gate (:mod:`aepo.kernels.compile_gate`: no GPU needed) and writes
``kernel_resources.md`` (one row per kernel variant and target: registers, spills, shared
memory, and for CUDA the blocks per SM and occupancy those allow and the main loop's SASS
instructions per element), and with ``--json PATH`` the full gate report. Exits 1 when a
kernel does not compile.

    python benchmarks/kernel_resources.py [--out benchmarks/results] [--json report.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from aepo.kernels._resources import spilled

RESULTS = Path(__file__).resolve().parent / "results"


def _loop_cell(res: dict) -> str:
    """ "per element (instructions)" of the main loop, "(instructions)" without an element
    count for the kernel, "-" without a loop."""
    n, per = res.get("loop_instructions"), res.get("loop_per_element")
    if not n:
        return "-"
    return f"{per:.2f} ({n})" if per else f"({n})"


def _cuda_row(r: dict) -> str:
    res, v = r["resources"], r["variant"]
    smem = res["shared_static"] + res["shared_dynamic"]
    return (
        f"| {v['target']} | {r['label']} | {', '.join(r['divisible']) or '-'} | "
        f"{res['registers']} | {spilled(res)} | {res['stack']} | {smem} | "
        f"{res['blocks_per_sm']} | {100 * res['occupancy']:.1f}% ({res['occupancy_limiter']}) | "
        f"{_loop_cell(res)} |"
    )


def _amd_row(r: dict) -> str:
    res, v = r["resources"], r["variant"]
    return (
        f"| {v['target']} | {r['label']} | {', '.join(r['divisible']) or '-'} | "
        f"{res['vgprs']} v / {res['sgprs']} s | {res['vgpr_spills'] + res['sgpr_spills']} | "
        f"{res['scratch']} | {res['lds']} | - | {res['waves_per_simd']} waves/SIMD | - |"
    )


def render(report: dict) -> str:
    """Markdown for a compile-gate report."""
    lines = [
        "# Kernel resources (compile gate, no GPU needed)",
        "",
        f"Triton {report['triton']}, torch {report['torch']}; written by "
        "`python benchmarks/kernel_resources.py`. One row per launch variant the launchers "
        "produce (dtype, constexprs, num_warps; Triton specialises integer arguments that are "
        "multiples of 16, listed in the third column) and target. CUDA: registers per thread, "
        "spilled bytes per thread (stack frame + local memory: Triton's spills land in the stack "
        "frame, cuobjdump's LOCAL stays 0), stack, shared memory per block (static + "
        "dynamic), resident blocks per SM and occupancy with its limiter, and the SASS "
        "instructions of the main loop (the longest innermost loop that reads global memory, "
        "from `cuobjdump --dump-sass`) per element one thread handles in an iteration (the "
        "logits kernels: BLOCK_V / threads), with the loop's instruction count in brackets. "
        "ROCm: VGPRs / SGPRs, spilled registers, scratch and LDS bytes, the compiler's waves "
        "per SIMD.",
        "",
        "| target | kernel [dtypes; constexprs; warps] | 16-divisible ints | registers | "
        "spills B | stack B | shared B | blocks/SM | occupancy | loop SASS / element |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    ok = [r for r in report["results"] if r["ok"]]
    for r in sorted(ok, key=lambda r: (r["variant"]["target"], r["label"])):
        lines.append(_cuda_row(r) if r["variant"]["target"].startswith("sm_") else _amd_row(r))
    if report["failures"]:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in report["failures"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    from aepo.kernels import compile_gate

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--json", type=Path, help="also write the full gate report here")
    p.add_argument("--targets", nargs="+", default=list(compile_gate.TARGETS))
    p.add_argument("--also", nargs="*", default=[], help="extra modules holding kernels")
    args = p.parse_args(argv)
    report = compile_gate.run_gate(tuple(args.targets), tuple(args.also))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    (args.out / "kernel_resources.md").write_text(render(report))
    print(f"{len(report['results'])} compiles, {len(report['failures'])} failures")
    for line in report["failures"]:
        print("FAIL", line)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
