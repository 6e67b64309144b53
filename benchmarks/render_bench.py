"""Markdown tables from benchmark rows (JSON lines of ``bench_kernels.py`` / ``bench_linear.py``).

    python benchmarks/render_bench.py rows.jsonl [more.jsonl ...] [--out results.md]

Logits suite, one table per (device, N, V, dtype): for each implementation the median device
time of fwd / bwd / loss in ms, the host time to issue the loss, the loss time relative to
naive eager, the ratio to the bandwidth floor where measured (CUDA) and the peak extra memory
of the loss round. Hidden-state suite: device ms, host ms, TFLOP/s on 8NHV and peak memory.
A row that a killed run never wrote is simply absent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rows as rows_io


def collect(rows: list[dict]) -> dict:
    """{(suite, device_name, n, vocab, dtype, hidden): {impl: {op: row}}}, in row order."""
    table: dict = {}
    for row in rows:
        key = (row["suite"], row.get("device_name", "?"), row["n"], row["vocab"], row["dtype"])
        key += (row.get("hidden"),)
        table.setdefault(key, {}).setdefault(row["impl"], {})[row["op"]] = row
    return table


def _cell(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _model_cell(ops: dict) -> str:
    """Measured over modelled time (bench_kernels.model_ms), as "fwd / bwd"; "" without."""
    ratios = [ops.get(op, {}).get("x_model") for op in ("fwd", "bwd")]
    return "" if ratios == [None, None] else " / ".join(_cell(r, ".2f") or "-" for r in ratios)


def render_kernels(key: tuple, impls: dict) -> list[str]:
    _, device, n, vocab, dtype, _ = key
    naive_loss = impls.get("naive", {}).get("loss", {}).get("device_ms")
    lines = [
        f"## N={n} V={vocab} {dtype} on {device}",
        "",
        "| impl | fwd ms | bwd ms | loss ms | loss host ms | loss x naive | fwd x floor | "
        "bwd x floor | loss x floor | fwd / bwd x model | peak extra MiB (loss) | computes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for impl, ops in impls.items():
        get = lambda op, k, ops=ops: ops.get(op, {}).get(k)
        loss_ms = get("loss", "device_ms")
        rel = loss_ms / naive_loss if loss_ms and naive_loss else None
        peak = get("loss", "peak_extra_bytes")
        bound = any(r.get("host_bound") for r in ops.values())
        lines.append(
            f"| {impl}{' (host-bound)' if bound else ''} | "
            f"{_cell(get('fwd', 'device_ms'), '.3f')} | {_cell(get('bwd', 'device_ms'), '.3f')} | "
            f"{_cell(loss_ms, '.3f')} | {_cell(get('loss', 'host_ms'), '.3f')} | "
            f"{_cell(rel, '.2f')} | {_cell(get('fwd', 'x_floor'), '.2f')} | "
            f"{_cell(get('bwd', 'x_floor'), '.2f')} | {_cell(get('loss', 'x_floor'), '.2f')} | "
            f"{_model_cell(ops)} | {_cell(None if peak is None else peak / 2**20, '.0f')} | "
            f"{next(iter(ops.values()))['computes']} |"
        )
    bw = next(iter(next(iter(impls.values())).values())).get("copy_bandwidth_GBps")
    if bw:
        lines += ["", f"Floors from a measured device copy bandwidth of {bw:.0f} GB/s."]
    if any(r.get("x_model") for ops in impls.values() for r in ops.values()):
        lines += [
            "Model: `aepo.kernels.logprob_entropy.cost_model` at this GPU's ceilings (the "
            "measured copy bandwidth; issue and exp2 rates of a GH100 SXM scaled by its SM "
            "count; the largest of the bytes, FLOP, exp2 and SASS-instruction times)."
        ]
    return [*lines, ""]


def render_linear(key: tuple, impls: dict) -> list[str]:
    """Table of the hidden-state suite: policy loss fwd+bwd only."""
    _, device, n, vocab, dtype, hidden = key
    naive = impls.get("naive", {}).get("loss", {}).get("device_ms")
    lines = [
        f"## N={n} H={hidden} V={vocab} {dtype} on {device}: policy loss fwd+bwd",
        "",
        "| impl | ms | host ms | x naive | TFLOP/s (8NHV) | peak extra MiB (w/o dX, dW) | "
        "model ms (roofline, measured ceilings) | computes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for impl, ops in impls.items():
        r = ops["loss"]
        rel = r["device_ms"] / naive if naive else None
        lines.append(
            f"| {impl} | {r['device_ms']:.1f} | {r['host_ms']:.1f} | {_cell(rel, '.2f')} | "
            f"{r['tflops']:.3f} | {r['peak_extra_bytes'] / 2**20:.0f} | "
            f"{_cell(r.get('model_ms'), '.1f')} | {r['computes']} |"
        )
    return [*lines, ""]


def render_tables(rows: list[dict]) -> list[str]:
    lines: list[str] = []
    for key, impls in collect(rows).items():
        lines += render_linear(key, impls) if key[0] == "linear" else render_kernels(key, impls)
    return lines


def render(rows: list[dict], title: str = "Kernel benchmark") -> str:
    head = [
        f"# {title} (medians; device time from CUDA events on GPU, wall time on CPU)",
        "",
        "Host ms: the time Python takes to issue one call, apart from the device time.",
        "",
    ]
    return "\n".join(head + render_tables(rows))


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rows", type=Path, nargs="+")
    p.add_argument("--out", type=Path, help="default: the first file with .md")
    args = p.parse_args(argv)
    out = args.out or args.rows[0].with_suffix(".md")
    out.write_text(render([r for path in args.rows for r in rows_io.read(path)]))
    return out


if __name__ == "__main__":
    print(main())
