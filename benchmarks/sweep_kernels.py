"""Sweep of the kernels' launch configurations on a CUDA GPU (a ``make gpu-check`` stage).

``--kernel logits``: (BLOCK_V, num_warps) of the logits kernels, set through
``logprob_entropy.GPU_CONFIGS``. The hidden-state path has no kernel of its own to sweep: it
runs cuBLAS GEMMs and these kernels (``aepo.kernels.linear_gemm``). Forward and backward are timed
through the backends' own entry points with ``timing.measure`` (CUDA events with the queue
pre-filled, median of 10); the best configuration is reported next to the shipped default. Each
configuration's row is appended to ``--rows`` (JSON lines) as soon as it is timed, so a run
killed part-way keeps every finished configuration. A configuration that fails to compile or
launch is recorded with its error. The grids hold only configurations that compile without
spills on sm_90 (``tests/bench/test_sweep_resources.py``).

    python benchmarks/sweep_kernels.py --kernel logits --n 16384 --vocab 151936 --rows s.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rows as rows_io
import timing

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOGITS_GRID = [
    {"BLOCK_V": b, "num_warps": w}
    for b, w in itertools.product((2048, 4096, 8192, 16384), (4, 8, 16))
]


def _median_ms(fn) -> float:
    return timing.measure(lambda: (), fn, "cuda", rounds=10, warmup=2).device_ms


def _run_grid(grid: list[dict], timed, head: dict, default: dict, path: Path | None) -> list:
    """Time every configuration; each row goes to ``path`` the moment it is timed."""
    out = []
    for config in grid:
        row = dict(config)
        try:
            row.update(timed(config))
        except Exception as exc:  # recorded, the sweep goes on
            row["error"] = f"{type(exc).__name__}: {exc}"
        out.append(row)
        if path is not None:
            rows_io.append(path, {**head, "default": default, "row": row})
        print(json.dumps(row), flush=True)
    return out


def results_from_rows(rows: list[dict]) -> list[dict]:
    """Sweep results (one per kernel family and shape) rebuilt from the rows written so far."""
    results: dict = {}
    for r in rows:
        head = {k: v for k, v in r.items() if k not in ("default", "row")}
        key = json.dumps(head, sort_keys=True)
        results.setdefault(key, {**head, "default": r["default"], "rows": []})["rows"].append(
            r["row"]
        )
    return [{**res, "best": _best(res["rows"])} for res in results.values()]


def _best(rows: list[dict]) -> dict:
    timed = [r for r in rows if "error" not in r]
    pick = lambda op: min(timed, key=lambda r: r[f"{op}_ms"], default=None)
    return {"fwd": pick("fwd"), "bwd": pick("bwd")}


def sweep_logits(n: int, vocab: int, dtype: str, path: Path | None = None) -> dict:
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

    shipped = {"BLOCK_V": default[0], "num_warps": default[1]}
    head = {"kernel": "logits", "n": n, "vocab": vocab, "dtype": dtype}
    rows = _run_grid(LOGITS_GRID, timed, head, shipped, path)
    return {**head, "default": shipped, "best": _best(rows), "rows": rows}


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
    p.add_argument("--kernel", choices=("logits",), default="logits")
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--rows", type=Path, help="append each configuration's row (JSON lines)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("the sweep times compiled kernels: it needs a CUDA GPU")
    result = sweep_logits(args.n, args.vocab, args.dtype, args.rows)
    print("\n".join(render(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
