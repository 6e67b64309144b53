"""Sweep of the logits kernels' launch configuration (BLOCK_V, num_warps) on a CUDA GPU.

Times the forward and the backward (gradient on logp and entropy) through the public API with
``logprob_entropy.GPU_CONFIGS`` set to each candidate, with ``triton.testing.do_bench``
(CUDA events, median), and reports the best configuration next to the shipped default.

    python benchmarks/sweep_kernels.py --n 16384 --vocab 151936 --dtype bf16 --json sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

BLOCKS = (2048, 4096, 8192, 16384)
WARPS = (4, 8, 16)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def time_config(logits, labels, g, block: int, warps: int) -> dict:
    """Median fwd and bwd ms of the kernels launched with (block, warps)."""
    import triton.testing

    from aepo.kernels import logprob_entropy
    from aepo.kernels.logprob_entropy import logprobs_entropy_bwd, logprobs_entropy_fwd

    size = logits.element_size()
    saved = logprob_entropy.GPU_CONFIGS[size]
    logprob_entropy.GPU_CONFIGS[size] = (block, warps)
    try:
        stats = logprobs_entropy_fwd(logits, labels, 1.0, -100, False)
        _, ent, m, log_s = stats
        grad = torch.empty_like(logits)
        fwd = lambda: logprobs_entropy_fwd(logits, labels, 1.0, -100, False)
        bwd = lambda: logprobs_entropy_bwd(logits, labels, m, log_s, ent, g, g, grad, 1.0, -100)
        return {
            "fwd_ms": triton.testing.do_bench(fwd, return_mode="median"),
            "bwd_ms": triton.testing.do_bench(bwd, return_mode="median"),
        }
    finally:
        logprob_entropy.GPU_CONFIGS[size] = saved


def sweep(n: int, vocab: int, dtype: str, blocks=BLOCKS, warps=WARPS) -> dict:
    from aepo.kernels import logprob_entropy

    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(n, vocab, generator=gen, device="cuda") * 3).to(DTYPES[dtype])
    labels = torch.randint(0, vocab, (n,), generator=gen, device="cuda")
    g = torch.randn(n, generator=gen, device="cuda")
    rows = []
    for block, w in itertools.product(blocks, warps):
        try:
            rows.append(
                {"BLOCK_V": block, "num_warps": w, **time_config(logits, labels, g, block, w)}
            )
        except Exception as exc:  # a config that fails to compile or launch is recorded
            rows.append({"BLOCK_V": block, "num_warps": w, "error": f"{type(exc).__name__}: {exc}"})
        print(json.dumps(rows[-1]), flush=True)
    default = logprob_entropy.GPU_CONFIGS[logits.element_size()]
    timed = [r for r in rows if "error" not in r]
    best = {
        op: min(timed, key=lambda r, op=op: r[f"{op}_ms"], default=None) for op in ("fwd", "bwd")
    }
    return {
        "n": n,
        "vocab": vocab,
        "dtype": dtype,
        "default": {"BLOCK_V": default[0], "num_warps": default[1]},
        "best": best,
        "rows": rows,
    }


def render(result: dict) -> list[str]:
    d = result["default"]
    lines = [
        f"N={result['n']} V={result['vocab']} {result['dtype']}; shipped default "
        f"BLOCK_V={d['BLOCK_V']}, num_warps={d['num_warps']}",
        "",
        "| BLOCK_V | num_warps | fwd ms | bwd ms |",
        "|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['BLOCK_V']} | {r['num_warps']} | {r['error'][:80]} | |")
        else:
            lines.append(
                f"| {r['BLOCK_V']} | {r['num_warps']} | {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} |"
            )
    for op, best in result["best"].items():
        if best:
            lines.append(f"\nbest {op}: BLOCK_V={best['BLOCK_V']}, num_warps={best['num_warps']}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    result = sweep(args.n, args.vocab, args.dtype)
    args.json.write_text(json.dumps(result, indent=1))
    print("\n".join(render(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
