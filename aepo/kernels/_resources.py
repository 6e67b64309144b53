"""Resource usage of a compiled Triton kernel, read from its binary, and what it implies.

CUDA: ``cuobjdump --dump-resource-usage`` on the cubin (registers per thread, stack, local
memory = spills and local arrays, static shared memory) plus Triton's dynamic shared memory,
and the blocks per SM those allow; from ``--dump-sass``, the size of the main loop (SASS
instructions per iteration and the bytes one thread loads in it). ROCm: the AMDGPU assembly's
metadata (VGPRs, SGPRs, spill counts, scratch, LDS) and the compiler's own occupancy (waves per
SIMD).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

# Per-SM limits by compute capability (CUDA programming guide, "Compute capabilities").
SM_LIMITS = {
    80: {"regs": 65536, "warps": 64, "blocks": 32, "smem": 164 * 1024},
    90: {"regs": 65536, "warps": 64, "blocks": 32, "smem": 228 * 1024},
    100: {"regs": 65536, "warps": 64, "blocks": 32, "smem": 228 * 1024},
}
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_RESERVED_PER_BLOCK = 1024  # the driver reserves 1 KiB of shared memory per block


def of_compiled(compiled, target: str, num_warps: int) -> dict:
    """Resources of a ``triton.compile`` result for ``target`` ("sm_90", "gfx942", ...)."""
    if target.startswith("sm_"):
        found = cuda_resources(compiled.asm["cubin"])
        found["shared_dynamic"] = int(compiled.metadata.shared)
        smem = found["shared_static"] + found["shared_dynamic"]
        found.update(cuda_occupancy(found["registers"], smem, num_warps, int(target[3:])))
        found.update(loop_resources(cuda_sass(compiled.asm["cubin"])))
        return found
    return amd_resources(compiled.asm["amdgcn"])


def cuobjdump_path() -> str:
    """The cuobjdump shipped in Triton's wheel, else the one on PATH."""
    import triton.backends.nvidia as nvidia

    shipped = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    found = shipped if os.path.exists(shipped) else shutil.which("cuobjdump")
    if not found:
        raise FileNotFoundError("cuobjdump: not in Triton's wheel (backends/nvidia/bin) nor PATH")
    return found


def cuda_resources(cubin: bytes) -> dict:
    """registers, stack, local (bytes per thread) and shared_static (bytes per block)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [cuobjdump_path(), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return parse_cuobjdump(out)


def parse_cuobjdump(out: str) -> dict:
    """REG / STACK / LOCAL / SHARED from ``--dump-resource-usage`` (one kernel per cubin)."""
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    if not {"REG", "STACK", "SHARED", "LOCAL"} <= fields.keys():
        raise ValueError(f"unexpected cuobjdump output:\n{out}")
    return {
        "registers": int(fields["REG"]),
        "stack": int(fields["STACK"]),
        "local": int(fields["LOCAL"]),
        "shared_static": int(fields["SHARED"]),
    }


def spilled(resources: dict) -> int:
    """How much a compile spilled, 0 when nothing: CUDA bytes per thread (stack frame + local
    memory; Triton kernels have no local arrays or calls, so their stack frame is spill space,
    what ``ptxas -v`` calls spill stores, and cuobjdump's LOCAL stays 0), ROCm registers."""
    if "vgpr_spills" in resources:
        return resources["vgpr_spills"] + resources["sgpr_spills"]
    return resources["stack"] + resources["local"]


def cuda_occupancy(registers: int, shared: int, num_warps: int, arch: int) -> dict:
    """Resident blocks per SM and the occupancy they give, with the limiting resource.

    regs/warp = ceil(32 * regs / 256) * 256; blocks are limited by the register file, shared
    memory (plus 1 KiB reserved per block), resident warps and the block cap.
    """
    lim = SM_LIMITS[arch]
    regs_per_warp = -(-32 * max(registers, 1) // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = {
        "registers": (lim["regs"] // regs_per_warp) // num_warps,
        "warps": lim["warps"] // num_warps,
        "blocks": lim["blocks"],
    }
    if shared:
        limits["shared"] = lim["smem"] // (shared + SMEM_RESERVED_PER_BLOCK)
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "warps"))
    return {
        "blocks_per_sm": blocks,
        "occupancy": blocks * num_warps / lim["warps"],
        "occupancy_limiter": limiter,
    }


_AMD_FIELDS = {
    "vgprs": r"\.vgpr_count:\s+(\d+)",
    "sgprs": r"\.sgpr_count:\s+(\d+)",
    "vgpr_spills": r"\.vgpr_spill_count:\s+(\d+)",
    "sgpr_spills": r"\.sgpr_spill_count:\s+(\d+)",
    "scratch": r"\.private_segment_fixed_size:\s+(\d+)",
    "lds": r"\.group_segment_fixed_size:\s+(\d+)",
    "waves_per_simd": r";\s*Occupancy:\s+(\d+)",
}


def amd_resources(amdgcn: str) -> dict:
    """VGPRs, SGPRs, spills, scratch and LDS bytes and waves per SIMD from AMDGPU assembly."""
    found = {}
    for name, pattern in _AMD_FIELDS.items():
        match = re.search(pattern, amdgcn)
        if match is None:
            raise ValueError(f"{name} not found in the AMDGPU assembly metadata")
        found[name] = int(match.group(1))
    found["local"] = found["scratch"]
    return found


# One SASS instruction as cuobjdump prints it: "/*05e0*/  @!P0 LDG.E.128 R4, desc[..] ;".
_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_SASS_BRANCH = re.compile(r"(0x[0-9a-f]+)\s*$")  # "0x5e0", "!UP0, 0xd30" (sm_100's BRA.U)
_LDG_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def cuda_sass(cubin: bytes) -> str:
    """``cuobjdump --dump-sass`` of a cubin (one Triton kernel per cubin)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run(
            [cuobjdump_path(), "--dump-sass", f.name], capture_output=True, text=True, check=True
        ).stdout


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of each instruction of a one-kernel SASS dump."""
    found = []
    for line in sass.splitlines():
        match = _SASS_LINE.match(line)
        if match:
            found.append((int(match.group(1), 16), match.group(3), match.group(4).strip()))
    return found


def _ldg_bytes(opcode: str) -> int:
    """Bytes one thread reads with a global load ("LDG.E.128" -> 16, "LDG.E" -> 4)."""
    sizes = [_LDG_BYTES[part] for part in opcode.split(".")[1:] if part in _LDG_BYTES]
    return sizes[0] if sizes else 4


def sass_loops(sass: str) -> list[dict]:
    """The loops of a SASS dump, one per backward branch (``BRA`` to an earlier or the same
    address): start / end addresses, instructions, global load and store counts and the bytes
    one thread loads per iteration, and whether another loop lies inside (``innermost``)."""
    code = parse_sass(sass)
    loops = []
    for addr, op, args in code:
        target = _SASS_BRANCH.search(args) if op.startswith("BRA") else None
        if target is None or int(target.group(1), 16) > addr:
            continue
        start = int(target.group(1), 16)
        body = [(a, o) for a, o, _ in code if start <= a <= addr]
        loops.append(
            {
                "start": start,
                "end": addr,
                "instructions": len(body),
                "loads": sum(o.startswith("LDG") for _, o in body),
                "stores": sum(o.startswith("STG") for _, o in body),
                "load_bytes": sum(_ldg_bytes(o) for _, o in body if o.startswith("LDG")),
            }
        )
    for loop in loops:
        loop["innermost"] = not any(
            other is not loop and loop["start"] <= other["start"] and other["end"] <= loop["end"]
            for other in loops
        )
    return loops


def main_loop(sass: str) -> dict | None:
    """The hot loop: of the innermost loops that read global memory, the longest; None when
    no loop reads global memory (a kernel without a main loop)."""
    hot = [loop for loop in sass_loops(sass) if loop["innermost"] and loop["loads"]]
    return max(hot, key=lambda loop: loop["instructions"]) if hot else None


def loop_resources(sass: str) -> dict:
    """``loop_instructions`` and ``loop_load_bytes`` (per thread) of :func:`main_loop`, None
    without one."""
    loop = main_loop(sass)
    return {
        "loop_instructions": loop and loop["instructions"],
        "loop_load_bytes": loop and loop["load_bytes"],
    }
