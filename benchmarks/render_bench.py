"""Markdown tables from a pytest-benchmark JSON of ``bench_kernels.py`` (median times).

    python benchmarks/render_bench.py results.json [--out results.md]

One table per vocabulary: for each implementation the median of fwd / bwd / loss in ms, the
loss time relative to naive eager, the ratio to the bandwidth floor where measured (CUDA), and
the peak extra memory of the loss round.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def collect(report: dict) -> dict:
    """{vocab: {impl: {op: extra_info + median_ms}}} from a pytest-benchmark report."""
    table: dict = {}
    for bench in report["benchmarks"]:
        info = dict(bench["extra_info"])
        info["median_ms"] = 1e3 * bench["stats"]["median"]
        table.setdefault(info["vocab"], {}).setdefault(info["impl"], {})[info["op"]] = info
    return table


def _cell(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def render_vocab(vocab: int, rows: dict) -> list[str]:
    any_info = next(iter(next(iter(rows.values())).values()))
    naive_loss = rows.get("naive", {}).get("loss", {}).get("median_ms")
    lines = [
        f"## N={any_info['n']} V={vocab} {any_info['dtype']} on {any_info.get('device_name', '?')}",
        "",
        "| impl | fwd ms | bwd ms | loss ms | loss x naive | fwd x floor | bwd x floor | "
        "loss x floor | peak extra MiB (loss) | computes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for impl, ops in rows.items():
        get = lambda op, key, ops=ops: ops.get(op, {}).get(key)
        loss_ms = get("loss", "median_ms")
        rel = loss_ms / naive_loss if loss_ms and naive_loss else None
        peak = get("loss", "peak_extra_bytes")
        computes = next(iter(ops.values()))["computes"]
        lines.append(
            f"| {impl} | {_cell(get('fwd', 'median_ms'), '.2f')} | "
            f"{_cell(get('bwd', 'median_ms'), '.2f')} | {_cell(loss_ms, '.2f')} | "
            f"{_cell(rel, '.2f')} | {_cell(get('fwd', 'x_floor'), '.2f')} | "
            f"{_cell(get('bwd', 'x_floor'), '.2f')} | {_cell(get('loss', 'x_floor'), '.2f')} | "
            f"{_cell(None if peak is None else peak / 2**20, '.0f')} | {computes} |"
        )
    bw = any_info.get("copy_bandwidth_GBps")
    if bw:
        lines += ["", f"Floors from a measured device copy bandwidth of {bw:.0f} GB/s."]
    return [*lines, ""]


def render_linear(vocab: int, rows: dict) -> list[str]:
    """Table of the hidden-state suite (bench_linear.py): loss fwd+bwd only."""
    info = next(iter(next(iter(rows.values())).values()))
    naive = rows.get("naive", {}).get("loss", {}).get("median_ms")
    lines = [
        f"## N={info['n']} H={info['hidden']} V={vocab} {info['dtype']} on "
        f"{info.get('device_name', '?')}: policy loss fwd+bwd",
        "",
        "| impl | ms | x naive | TFLOP/s (8NHV) | peak extra MiB (w/o dX, dW) | computes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for impl, ops in rows.items():
        r = ops["loss"]
        rel = r["median_ms"] / naive if naive else None
        lines.append(
            f"| {impl} | {r['median_ms']:.0f} | {_cell(rel, '.2f')} | {r['tflops']:.3f} | "
            f"{r['peak_extra_bytes'] / 2**20:.0f} | {r['computes']} |"
        )
    return [*lines, ""]


def render(report: dict) -> str:
    machine = report.get("machine_info", {})
    lines = [
        "# Kernel benchmark (pytest-benchmark, medians)",
        "",
        f"{report.get('datetime', '')}; host {machine.get('cpu', {}).get('brand_raw', '?')}, "
        f"Python {machine.get('python_version', '?')}; commit "
        f"{report.get('commit_info', {}).get('id', '?')[:10]}. Compare two runs with "
        "`pytest-benchmark compare A.json B.json`.",
        "",
    ]
    for vocab, rows in collect(report).items():
        first = next(iter(next(iter(rows.values())).values()))
        lines += render_linear(vocab, rows) if "hidden" in first else render_vocab(vocab, rows)
    return "\n".join(lines)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path)
    p.add_argument("--out", type=Path, help="default: the JSON path with .md")
    args = p.parse_args(argv)
    out = args.out or args.json.with_suffix(".md")
    out.write_text(render(json.loads(args.json.read_text())))
    return out


if __name__ == "__main__":
    print(main())
