"""Validate aepo on a CUDA GPU in one command: ``make gpu-check [PYTHON=...] [OUT=...]``.

Offline, with the Python that is already there: installs nothing, imports the project from the
checkout (PYTHONPATH), and skips peers that are not importable (saying so). Stages, each in its
own subprocess under a share of the time budget, each written to the report before the next:

  tests   the CUDA-only tests (pytest -m cuda)
  bench   the kernel benchmark suites (pytest-benchmark) at N=16384, bf16: the logits kernels
          (bench_kernels.py, V=151936 and 32000: fwd / bwd / fused loss against naive eager,
          torch.compile and Liger-Kernel, with the bandwidth floor) and the hidden-state path
          (bench_linear.py, H=5120, V=151936: TFLOP/s and memory against matmul + logits and
          Liger's chunked loss)
  sweep   launch configurations, best against the shipped default: (BLOCK_V, num_warps) of the
          logits kernels, tiles / warps / stages of the hidden-state kernels (N=4096)
  memory  peak extra memory of every benchmarked variant (from the bench stage)

Results: OUT/gpu_<device>_<date>.{md,json} (device, driver, torch, Triton), plus each stage's
raw output beside them. ``--dry-run`` lists the stages and their commands without a GPU.

    python benchmarks/gpu_check.py [--out DIR] [--stages tests bench] [--budget 330] [--dry-run]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tests", "bench", "sweep", "memory")
# Relative share of the time left that each stage may use (time a stage leaves unused passes to
# the next ones); memory only reads the bench stage's output.
SHARES = {"tests": 0.2, "bench": 0.64, "sweep": 0.16, "memory": 0.0}
PEERS = ("liger_kernel", "vllm", "deepspeed", "flash_attn", "transformers")


@dataclass
class Context:
    out: Path
    stem: str  # gpu_<device>_<date>
    python: str
    budget: float  # seconds for all stages
    n: int
    vocabs: tuple[int, ...]
    dtype: str
    hidden: int = 5120  # H of the hidden-state benchmark
    peers: Path | None = None
    start: float = field(default_factory=time.monotonic)

    def path(self, suffix: str) -> Path:
        return self.out / f"{self.stem}{suffix}"

    def env(self) -> dict:
        paths = [str(ROOT)] + ([str(self.peers)] if self.peers else [])
        old = os.environ.get("PYTHONPATH")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
        return env

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)


def stage_commands(name: str, ctx: Context) -> list[list[str]]:
    """The subprocess commands of a stage (empty for stages computed in this process)."""
    pytest = [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    shape = ["--n", str(ctx.n), "--dtype", ctx.dtype]
    if name == "tests":
        return [[*pytest, "-m", "cuda", "tests", f"--junitxml={ctx.path('_tests.xml')}"]]
    if name == "bench":  # one run per vocabulary: each JSON lands before the next run starts
        bench = [*pytest, "benchmarks/bench_kernels.py", "--device", "cuda", *shape]
        cmds = [
            [*bench, "--vocab", str(v), f"--benchmark-json={ctx.path(f'_bench_V{v}.json')}"]
            for v in ctx.vocabs
        ]
        linear = [*pytest, "benchmarks/bench_linear.py", "--device", "cuda", *shape]
        linear += ["--hidden", str(ctx.hidden), "--vocab", str(ctx.vocabs[0])]
        return [*cmds, [*linear, f"--benchmark-json={ctx.path('_bench_linear.json')}"]]
    if name == "sweep":
        sweep = [ctx.python, "benchmarks/sweep_kernels.py", "--dtype", ctx.dtype]
        logits = [*sweep, "--kernel", "logits", "--n", str(ctx.n), "--vocab", str(ctx.vocabs[0])]
        linear = [*sweep, "--kernel", "linear", "--n", str(min(ctx.n, 4096))]
        linear += ["--hidden", str(ctx.hidden), "--vocab", str(ctx.vocabs[0])]
        return [
            [*logits, "--json", str(ctx.path("_sweep.json"))],
            [*linear, "--json", str(ctx.path("_sweep_linear.json"))],
        ]
    return []


def stage_limit(name: str, ctx: Context, pending: list[str]) -> float:
    """Seconds for stage ``name``: its share of the time left among the ``pending`` stages."""
    total = sum(SHARES[p] for p in pending)
    return max(0.0, ctx.left() * SHARES[name] / total) if total else 0.0


def run_stage(name: str, ctx: Context, limit: float) -> dict:
    """Run a stage's commands within ``limit`` seconds; never raises."""
    start, result = time.monotonic(), {"status": "ok", "runs": []}
    for cmd in stage_commands(name, ctx):
        remaining = limit - (time.monotonic() - start)
        if remaining <= 5:
            result["status"] = "out of time"
            break
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=ctx.env(), capture_output=True, text=True, timeout=remaining
            )
            run = {"cmd": " ".join(cmd), "rc": proc.returncode, "tail": proc.stdout[-3000:]}
            run["stderr_tail"] = proc.stderr[-2000:]
        except subprocess.TimeoutExpired as exc:
            run = {"cmd": " ".join(cmd), "rc": None, "tail": str(exc.stdout or "")[-3000:]}
            result["status"] = "timeout"
        result["runs"].append(run)
        if run["rc"] not in (0, None) and result["status"] == "ok":
            result["status"] = f"failed (rc {run['rc']})"
    result["seconds"] = round(time.monotonic() - start, 1)
    result.update(SUMMARIES[name](ctx))
    return result


def summarize_tests(ctx: Context) -> dict:
    path = ctx.path("_tests.xml")
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {"counts": counts, "failed": failed}


def summarize_bench(ctx: Context) -> dict:
    found = [ctx.path(f"_bench_V{v}.json") for v in ctx.vocabs] + [ctx.path("_bench_linear.json")]
    return {"json": [str(p) for p in found if p.exists()]}


def summarize_sweep(ctx: Context) -> dict:
    paths = [ctx.path("_sweep.json"), ctx.path("_sweep_linear.json")]
    return {"sweep": [json.loads(p.read_text()) for p in paths if p.exists()]}


def summarize_memory(ctx: Context) -> dict:
    rows = []
    for path in summarize_bench(ctx)["json"]:
        for bench in json.loads(Path(path).read_text())["benchmarks"]:
            info = bench["extra_info"]
            keys = ("vocab", "impl", "op", "peak_extra_bytes")
            rows.append({k: info[k] for k in keys})
    return {"memory": rows}


SUMMARIES = {
    "tests": summarize_tests,
    "bench": summarize_bench,
    "sweep": summarize_sweep,
    "memory": summarize_memory,
}


def environment(python: str) -> dict:
    """Device, driver and versions, read by the Python under test."""
    probe = (
        "import json, torch, triton; p = torch.cuda.get_device_properties(0); "
        "print(json.dumps({'device': p.name, 'sms': p.multi_processor_count, "
        "'memory_GiB': round(p.total_memory / 2**30, 1), 'capability': '%d.%d' % "
        "(p.major, p.minor), 'torch': torch.__version__, 'cuda': torch.version.cuda, "
        "'triton': triton.__version__}))"
    )
    env = json.loads(
        subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout
    )
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        env["driver"] = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        env["driver"] = "unknown (no nvidia-smi)"
    env["python"] = platform.python_version()
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env["peers"] = {p: importlib.util.find_spec(p) is not None for p in PEERS}
    return env


def slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def render_report(env: dict, stages: dict) -> str:
    """The markdown report of whatever stages have finished."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    import render_bench
    import sweep_kernels

    missing = [p for p, ok in env["peers"].items() if not ok]
    lines = [
        f"# GPU check: {env['device']}",
        "",
        f"{env['date']}; driver {env['driver']}, CUDA {env.get('cuda')}, torch {env['torch']}, "
        f"Triton {env['triton']}, Python {env['python']}; {env.get('sms')} SMs, "
        f"{env.get('memory_GiB')} GiB. Not importable here (skipped): "
        f"{', '.join(missing) or 'none'}.",
        "",
    ]
    for name, res in stages.items():
        lines += [f"## {name}: {res['status']} ({res['seconds']} s)", ""]
        if name == "tests" and "counts" in res:
            c = res["counts"]
            lines.append(
                f"{c['tests']} tests: {c['failures']} failed, {c['errors']} errors, "
                f"{c['skipped']} skipped"
            )
            lines += [f"- FAILED {f}" for f in res["failed"]]
        if name == "bench":
            for path in res["json"]:
                report = json.loads(Path(path).read_text())
                for vocab, rows in render_bench.collect(report).items():
                    lines += render_bench.render_vocab(vocab, rows)
        for result in res.get("sweep", []) if name == "sweep" else []:
            lines += [*sweep_kernels.render(result), ""]
        if name == "memory":
            lines += ["| V | impl | op | peak extra MiB |", "|---:|---|---|---:|"]
            lines += [
                f"| {r['vocab']} | {r['impl']} | {r['op']} | {r['peak_extra_bytes'] / 2**20:.0f} |"
                for r in res.get("memory", [])
            ]
        for run in res["runs"]:
            if run["rc"] != 0:
                lines += ["", f"`{run['cmd']}` (rc {run['rc']}):", "```", run["tail"][-1500:]]
                lines += [run.get("stderr_tail", "")[-1500:], "```"]
        lines.append("")
    return "\n".join(lines) + "\n"


def write_report(ctx: Context, env: dict, stages: dict) -> None:
    ctx.out.mkdir(parents=True, exist_ok=True)
    ctx.path(".json").write_text(json.dumps({"env": env, "stages": stages}, indent=1))
    ctx.path(".md").write_text(render_report(env, stages))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--budget", type=float, default=345.0, help="seconds for all stages")
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--vocab", type=int, nargs="+", default=[151936, 32000])
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--hidden", type=int, default=5120, help="H of the hidden-state benchmark")
    p.add_argument("--peers", type=Path, help="folder of unpacked pure-Python peer wheels")
    p.add_argument("--python", default=sys.executable, help="interpreter for the stages")
    p.add_argument("--dry-run", action="store_true", help="list the stages and exit")
    args = p.parse_args(argv)
    if args.budget <= 0 or args.n <= 0 or min(args.vocab) <= 0:
        p.error("--budget, --n and --vocab must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    date = datetime.date.today().isoformat()
    ctx = Context(
        args.out,
        f"gpu_<device>_{date}",
        args.python,
        args.budget,
        args.n,
        tuple(args.vocab),
        args.dtype,
        args.hidden,
        args.peers,
    )
    if args.dry_run:
        for name in args.stages:
            cmds = stage_commands(name, ctx) or [["(reads the bench stage's JSON)"]]
            share = args.budget * SHARES[name] / sum(SHARES[s] for s in args.stages)
            print(f"{name}: about {share:.0f} s, plus what earlier stages leave unused")
            for cmd in cmds:
                print("   ", " ".join(cmd))
        print(f"report: {ctx.path('.md')} and .json")
        return 0
    try:
        env = environment(args.python)
    except subprocess.CalledProcessError as exc:
        print(f"gpu-check: no usable CUDA GPU from {args.python}:\n{exc.stderr}", file=sys.stderr)
        return 3
    ctx.stem = f"gpu_{slug(env['device'])}_{date}"
    stages: dict = {}
    for i, name in enumerate(args.stages):
        print(f"gpu-check: {name} ...", flush=True)
        stages[name] = run_stage(name, ctx, stage_limit(name, ctx, args.stages[i:]))
        write_report(ctx, env, stages)
        print(f"gpu-check: {name}: {stages[name]['status']} ({stages[name]['seconds']} s)")
    print(ctx.path(".md").read_text())
    return 0 if all(s["status"] == "ok" for s in stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
