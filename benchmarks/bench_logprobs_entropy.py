"""Benchmark per-token log-prob + entropy, forward and backward: naive torch vs our backends.

Reports median wall time (forward, backward, both) and peak extra memory for:
naive torch (log_softmax + gather + softmax entropy, autograd), our torch backend (chunked),
and on CUDA our triton backend, each also with ``inplace_grad``. On CUDA it also measures copy
bandwidth and reports the bytes-moved floor: forward reads the logits once, backward reads
them once and writes the gradient once.

Peak memory on CPU is the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) above what it held after building the inputs, measured in a fresh
subprocess per variant so that one variant's allocator cache cannot hide another's. On CUDA it
is torch.cuda.max_memory_allocated above the inputs.

    python benchmarks/bench_logprobs_entropy.py                 # CPU, N=8192, V=32000, fp32
    python benchmarks/bench_logprobs_entropy.py --device cuda --n 16384 --v 151936 --dtype bf16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from aepo.kernels import logprobs_and_entropy, naive_logprobs_and_entropy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RESULTS = Path(__file__).resolve().parent / "results"


def variants(device: str) -> dict[str, dict]:
    """name -> keyword arguments; the naive baseline is the entry with ``naive``."""
    out = {
        "naive torch": {"naive": True},
        "aepo torch": {"backend": "torch"},
        "aepo torch inplace": {"backend": "torch", "inplace_grad": True},
    }
    if device == "cuda":
        out["aepo triton"] = {"backend": "triton"}
        out["aepo triton inplace"] = {"backend": "triton", "inplace_grad": True}
    return out


def make_inputs(n: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen, device=device) * 3).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen, device=device)
    g_lp = torch.randn(n, generator=gen, device=device)
    g_h = torch.randn(n, generator=gen, device=device)
    return logits, labels, g_lp, g_h


def run_once(spec: dict, logits, labels, g_lp, g_h, sync) -> tuple[float, float]:
    """One forward and backward; returns (forward s, backward s). ``logits`` is consumed
    when the variant writes its gradient in place."""
    x = logits.requires_grad_().view(logits.shape)  # a non-leaf view, like an lm_head output
    kwargs = {k: v for k, v in spec.items() if k != "naive"}
    fn = naive_logprobs_and_entropy if spec.get("naive") else logprobs_and_entropy
    sync()
    t0 = time.perf_counter()
    logp, ent = fn(x, labels, **kwargs)
    sync()
    t1 = time.perf_counter()
    (grad,) = torch.autograd.grad((logp * g_lp + ent * g_h).sum(), x)
    sync()
    t2 = time.perf_counter()
    del grad
    logits.requires_grad_(False)
    return t1 - t0, t2 - t1


def time_variant(spec: dict, args, inputs) -> dict:
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    logits, labels, g_lp, g_h = inputs
    fwd, bwd = [], []
    for i in range(args.warmup + args.reps):
        x = logits.clone() if spec.get("inplace_grad") else logits
        f, b = run_once(spec, x, labels, g_lp, g_h, sync)
        if i >= args.warmup:
            fwd.append(f)
            bwd.append(b)
    return {
        "fwd_ms": 1e3 * statistics.median(fwd),
        "bwd_ms": 1e3 * statistics.median(bwd),
        "total_ms": 1e3 * statistics.median(f + b for f, b in zip(fwd, bwd, strict=True)),
    }


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_memory_child(name: str, args) -> None:
    """Subprocess body: build inputs, warm up on a tiny case, then one measured fwd+bwd."""
    spec = variants(args.device)[name]
    small = make_inputs(4, 64, DTYPES[args.dtype], args.device)
    run_once(spec, *small, sync=lambda: None)
    inputs = make_inputs(args.n, args.v, DTYPES[args.dtype], args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(spec, *inputs, sync=torch.cuda.synchronize)
        extra = torch.cuda.max_memory_allocated() - base
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        base = _rss_kib("VmRSS")
        run_once(spec, *inputs, sync=lambda: None)
        extra = (_rss_kib("VmHWM") - base) * 1024
    print(json.dumps({"peak_extra_bytes": extra}))


def peak_memory(name: str, args) -> int:
    cmd = [sys.executable, __file__, "--child", name, "--device", args.device]
    cmd += ["--n", str(args.n), "--v", str(args.v), "--dtype", args.dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_extra_bytes"]


def copy_bandwidth(nbytes: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def environment(device: str) -> dict:
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if device == "cuda":
        env["device"] = torch.cuda.get_device_name()
    else:
        cpu = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
        env["device"] = f"{cpu[0].split(':', 1)[1].strip()} x{os.cpu_count()}" if cpu else "cpu"
    return env


def floors(args) -> dict:
    """Bytes-moved floor on CUDA: forward reads N*V once, backward reads and writes it once."""
    nbytes = args.n * args.v * DTYPES[args.dtype].itemsize
    bw = copy_bandwidth(max(nbytes, 1 << 28))
    return {
        "copy_bandwidth_GBps": bw / 1e9,
        "fwd_floor_ms": 1e3 * nbytes / bw,
        "bwd_floor_ms": 1e3 * 2 * nbytes / bw,
    }


def render(report: dict) -> str:
    cfg, rows = report["config"], report["results"]
    naive = rows["naive torch"]
    lines = [
        f"# logprobs_and_entropy fwd+bwd: N={cfg['n']} V={cfg['v']} {cfg['dtype']} "
        f"on {report['env']['device']}",
        "",
        "| variant | fwd ms | bwd ms | total ms | x naive time | peak extra MiB | x naive mem |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['fwd_ms']:.1f} | {r['bwd_ms']:.1f} | {r['total_ms']:.1f} | "
            f"{r['total_ms'] / naive['total_ms']:.2f} | {r['peak_extra_bytes'] / 2**20:.0f} | "
            f"{r['peak_extra_bytes'] / naive['peak_extra_bytes']:.3f} |"
        )
    if "floors" in report:
        fl = report["floors"]
        lines += [
            "",
            f"copy bandwidth {fl['copy_bandwidth_GBps']:.0f} GB/s; floors: fwd "
            f"{fl['fwd_floor_ms']:.3f} ms, bwd {fl['bwd_floor_ms']:.3f} ms",
        ]
        for name in ("aepo triton", "aepo triton inplace"):
            r = rows[name]
            lines.append(
                f"{name}: fwd {r['fwd_ms'] / fl['fwd_floor_ms']:.2f}x floor, "
                f"bwd {r['bwd_ms'] / fl['bwd_floor_ms']:.2f}x floor"
            )
    lines += ["", "```", json.dumps(report["env"], indent=1), "```"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8192, help="rows (tokens)")
    p.add_argument("--v", type=int, default=32000, help="vocabulary size")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for .json and .md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        peak_memory_child(args.child, args)
        return {}
    inputs = make_inputs(args.n, args.v, DTYPES[args.dtype], args.device)
    results = {}
    for name, spec in variants(args.device).items():
        print(f"{name}: timing {args.reps} reps ...", file=sys.stderr, flush=True)
        results[name] = time_variant(spec, args, inputs)
        results[name]["peak_extra_bytes"] = peak_memory(name, args)
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "child")},
        "env": environment(args.device),
        "results": results,
    }
    if args.device == "cuda":
        report["floors"] = floors(args)
    stem = f"logprobs_entropy_{args.device}_N{args.n}_V{args.v}_{args.dtype}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    text = render(report)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
