"""Sweep of the kernels' launch configurations on a CUDA GPU (a ``make gpu-check`` stage).

``--kernel logits``: (BLOCK_V, num_warps) of the logits kernels, set through
``logprob_entropy.GPU_CONFIGS``; ``--kernel linear``: the tiles, warps and stages of the
hidden-state kernels, set through ``linear_triton.GPU_CONFIG``. Forward and backward are timed
through the backends' own entry points with ``triton.testing.do_bench`` (CUDA events, median);
the best configuration is reported next to the shipped default. A configuration that fails to
compile or launch is recorded with its error.

    python benchmarks/sweep_kernels.py --kernel logits --n 16384 --vocab 151936 --json s.json
    python benchmarks/sweep_kernels.py --kernel linear --n 4096 --hidden 5120 --json l.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOGITS_GRID = [
    {"BLOCK_V": b, "num_warps": w}
    for b, w in itertools.product((2048, 4096, 8192, 16384), (4, 8, 16))
]
LINEAR_GRID = [
    {"BLOCK_N": n, "BLOCK_V": v, "BLOCK_H": h, "num_warps": w, "num_stages": s}
    for n, v, h, w, s in (
        (64, 128, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (64, 256, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 3),
        (256, 128, 64, 8, 3),
    )
]


def _median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, return_mode="median")


def _run_grid(grid: list[dict], timed) -> list[dict]:
    rows = []
    for config in grid:
        row = dict(config)
        try:
            row.update(timed(config))
        except Exception as exc:  # recorded, the sweep goes on
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _best(rows: list[dict]) -> dict:
    timed = [r for r in rows if "error" not in r]
    pick = lambda op: min(timed, key=lambda r: r[f"{op}_ms"], default=None)
    return {"fwd": pick("fwd"), "bwd": pick("bwd")}


def sweep_logits(n: int, vocab: int, dtype: str) -> dict:
    from aepo.kernels import logprob_entropy as le

    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(n, vocab, generator=gen, device="cuda") * 3).to(DTYPES[dtype])
    labels = torch.randint(0, vocab, (n,), generator=gen, device="cuda")
    g = torch.randn(n, generator=gen, device="cuda")
    size = logits.element_size()
    default = le.GPU_CONFIGS[size]

    def timed(config):
        le.GPU_CONFIGS[size] = (config["BLOCK_V"], config["num_warps"])
        try:
            _, ent, m, log_s = le.logprobs_entropy_fwd(logits, labels, 1.0, -100, False)
            grad = torch.empty_like(logits)
            fwd = lambda: le.logprobs_entropy_fwd(logits, labels, 1.0, -100, False)
            bwd = lambda: le.logprobs_entropy_bwd(
                logits, labels, m, log_s, ent, g, g, grad, 1.0, -100
            )
            return {"fwd_ms": _median_ms(fwd), "bwd_ms": _median_ms(bwd)}
        finally:
            le.GPU_CONFIGS[size] = default

    rows = _run_grid(LOGITS_GRID, timed)
    shipped = {"BLOCK_V": default[0], "num_warps": default[1]}
    head = {"kernel": "logits", "n": n, "vocab": vocab, "dtype": dtype, "default": shipped}
    return {**head, "best": _best(rows), "rows": rows}


def sweep_linear(n: int, hidden: int, vocab: int, dtype: str) -> dict:
    from aepo.kernels import linear_triton as lt
    from aepo.kernels.reference import finish_pieces

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, hidden, generator=gen, device="cuda").to(DTYPES[dtype])
    w = (torch.randn(vocab, hidden, generator=gen, device="cuda") / hidden**0.5).to(x.dtype)
    local = torch.randint(0, vocab, (n,), generator=gen, device="cuda")
    g = torch.randn(n, generator=gen, device="cuda")
    default = dict(lt.GPU_CONFIG)
    flops = 2 * n * hidden * vocab  # one logits matmul

    def timed(config):
        lt.GPU_CONFIG.update(config)
        try:
            valid = torch.ones(n, dtype=torch.bool, device="cuda")
            _, ent, m, log_s = finish_pieces(*lt.linear_forward(x, w, local, 1.0), valid)
            fwd_ms = _median_ms(lambda: lt.linear_forward(x, w, local, 1.0))
            bwd = lambda: lt.linear_backward(x, w, local, m, log_s, ent, g, g, 1.0)
            bwd_ms = _median_ms(bwd)
            tflops = {"fwd_tflops": flops / fwd_ms / 1e9, "bwd_tflops": 3 * flops / bwd_ms / 1e9}
            return {"fwd_ms": fwd_ms, "bwd_ms": bwd_ms, **tflops}
        finally:
            lt.GPU_CONFIG.clear()
            lt.GPU_CONFIG.update(default)

    rows = _run_grid(LINEAR_GRID, timed)
    head = {"kernel": "linear", "n": n, "hidden": hidden, "vocab": vocab, "dtype": dtype}
    return {**head, "default": default, "best": _best(rows), "rows": rows}


def render(result: dict) -> list[str]:
    """Markdown of one sweep result (either kernel family)."""
    keys = list(result["default"])
    shape = f"N={result['n']}" + (f" H={result['hidden']}" if "hidden" in result else "")
    default = ", ".join(f"{k}={v}" for k, v in result["default"].items())
    metrics = [
        k
        for k in ("fwd_ms", "bwd_ms", "fwd_tflops", "bwd_tflops")
        if any(k in r for r in result["rows"])
    ]
    lines = [
        f"{result.get('kernel', 'logits')} kernels, {shape} V={result['vocab']} "
        f"{result['dtype']}; shipped default {default}",
        "",
        "| " + " | ".join(keys + metrics) + " |",
        "|" + "---:|" * (len(keys) + len(metrics)),
    ]
    for r in result["rows"]:
        cells = [str(r[k]) for k in keys]
        if "error" in r:
            cells += [r["error"][:80]] + [""] * (len(metrics) - 1)
        else:
            cells += [f"{r[k]:.3f}" for k in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    for op, best in result["best"].items():
        if best:
            lines.append(f"\nbest {op}: " + ", ".join(f"{k}={best[k]}" for k in keys))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", choices=("logits", "linear"), default="logits")
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=5120, help="H (linear kernels)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    if args.kernel == "logits":
        result = sweep_logits(args.n, args.vocab, args.dtype)
    else:
        result = sweep_linear(args.n, args.hidden, args.vocab, args.dtype)
    args.json.write_text(json.dumps(result, indent=1))
    print("\n".join(render(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
