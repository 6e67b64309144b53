"""Validate aepo on a CUDA GPU in one command, inside a short lease.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT     # no make needed
    make gpu-check [PYTHON=...] [OUT=...]                             # the same through make

Offline, with the Python that is already there: installs nothing, imports the project from the
checkout (PYTHONPATH), and skips peers that are not importable (saying so). Stages, each under
a share of the time budget (time a stage or command leaves unused passes on):

  tests   the CUDA-only tests (pytest -m cuda)
  bench   the kernel benchmark suites at N=16384, bf16, one command each with its own share,
          so that a slow V=151936 run cannot starve the others: the logits kernels
          (bench_kernels.py, V=151936 and 32000: fwd / bwd / fused loss, ours first, then
          naive eager, TRL's and Liger-Kernel's Triton kernels, ``torch.compile`` last, with the
          bandwidth floor) and the hidden-state path (bench_linear.py, H=5120, V=151936,
          against matmul + logits, TRL's ChunkedLogProbFunction and Liger's chunked loss)
  sweep   launch configurations that compile without spills, best against the shipped
          default: (BLOCK_V, num_warps) of the logits kernels, tiles / warps / stages of the
          hidden-state kernels (N=4096)
  memory  peak extra memory of every benchmarked variant (read from the bench rows)

Nothing is lost when the run is killed: every command's output streams, unbuffered, to the
terminal and to OUT/<stem>_log.txt; every benchmark row and sweep configuration is appended to
OUT/<stem>_rows.jsonl / _sweep.jsonl the moment it is measured; OUT/<stem>.{md,json} (device,
driver, torch, Triton, every finished command) is rewritten after each command. At most six
files: <stem> = gpu_<device>_<date>. The default budget (360 s) keeps the run under 7 minutes.

``--dry-run`` lists the stages and their commands; ``--rehearse`` runs the same machinery on the
CPU at a tiny size (no sweep: it times compiled kernels), to see what a killed run leaves.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import rows as rows_io  # noqa: E402

STAGES = ("tests", "bench", "sweep", "memory")
# Relative share of the time left that each stage may use; memory only reads the bench rows.
SHARES = {"tests": 0.2, "bench": 0.62, "sweep": 0.18, "memory": 0.0}
PEERS = ("trl-triton", "trl-chunked", "liger")
# The cuda-marked tests, riskiest first, so that a stage stopped at its share has run them:
# the cuBLAS out_dtype / addmm GEMMs (never run before), the compiled kernels, the trainer's and
# the peers' GPU tests; the Inductor compile cases (slow, a compile each) last. pytest runs
# its arguments in order; tests/bench/test_gpu_check.py checks that they cover `-m cuda tests`.
GPU_TESTS = "tests/kernels/test_gpu.py::"
CUDA_TEST_ORDER = (
    "tests/kernels/test_gpu_linear.py",
    GPU_TESTS + "test_compiled_kernel_matches_fp64",
    GPU_TESTS + "test_inplace_grad_on_gpu",
    GPU_TESTS + "test_more_than_2_to_31_elements",
    "tests/train",
    "tests/bench",
    GPU_TESTS + "test_torch_compile_fullgraph",
    GPU_TESTS + "test_torch_compile_cases",
)
FILES = ("_log.txt", "_tests.xml", "_rows.jsonl", "_sweep.jsonl", ".md", ".json")
KILL_GRACE_S = 5.0


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
    device: str = "cuda"  # "cpu" only to rehearse
    rounds: int | None = None
    start: float = field(default_factory=time.monotonic)

    def path(self, suffix: str) -> Path:
        return self.out / f"{self.stem}{suffix}"

    def env(self) -> dict:
        paths = [str(ROOT)] + ([str(self.peers)] if self.peers else [])
        old = os.environ.get("PYTHONPATH")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
        env["PYTHONUNBUFFERED"] = "1"
        env["AEPO_CUDA_TESTS"] = "1"  # tests/conftest.py: compiled kernels, no interpreter
        return env

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)


def stage_commands(name: str, ctx: Context) -> list[tuple[list[str], float]]:
    """The stage's subprocess commands, each with its weight in the stage's time."""
    pytest = [ctx.python, "-m", "pytest", "-p", "no:cacheprovider"]
    shape = ["--device", ctx.device, "--n", str(ctx.n), "--dtype", ctx.dtype]
    shape += ["--rounds", str(ctx.rounds)] if ctx.rounds else []
    if name == "tests":
        junit = f"--junitxml={ctx.path('_tests.xml')}"
        return [([*pytest, "-v", "-m", "cuda", *CUDA_TEST_ORDER, junit], 1)]  # -v: line a test
    if name == "bench":  # ours first in every suite; the first vocabulary is the largest
        bench = [*pytest, "-v", "-s", *shape, f"--rows={ctx.path('_rows.jsonl')}"]
        cmds = [([*bench, "benchmarks/bench_kernels.py", "--vocab", str(v)], 1) for v in ctx.vocabs]
        linear = [*bench, "benchmarks/bench_linear.py", "--hidden", str(ctx.hidden)]
        return [*cmds, ([*linear, "--vocab", str(ctx.vocabs[0])], len(ctx.vocabs) / 2)]
    if name == "sweep" and ctx.device == "cuda":
        sweep = [ctx.python, "benchmarks/sweep_kernels.py", "--dtype", ctx.dtype]
        sweep += ["--rows", str(ctx.path("_sweep.jsonl"))]
        logits = [*sweep, "--kernel", "logits", "--n", str(ctx.n), "--vocab", str(ctx.vocabs[0])]
        return [(logits, 1)]
    return []


def share(left: float, weight: float, pending: list[float]) -> float:
    """Seconds for one item: its weight's share of the time ``left`` among the ``pending``
    weights (its own included)."""
    total = sum(pending)
    return max(0.0, left * weight / total) if total else 0.0


def stage_limit(name: str, ctx: Context, pending: list[str]) -> float:
    """Seconds for stage ``name``: its share of the time left among the ``pending`` stages."""
    return share(ctx.left(), SHARES[name], [SHARES[p] for p in pending])


def _pump(stream, log, tail: collections.deque) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        sys.stdout.write(line)
        sys.stdout.flush()
        tail.append(line)


def run_command(cmd: list[str], ctx: Context, limit: float) -> dict:
    """Run ``cmd`` for at most ``limit`` s, its output streamed to the log and the terminal;
    on time-out its whole process group is stopped (SIGTERM, then SIGKILL)."""
    start, tail = time.monotonic(), collections.deque(maxlen=60)
    with ctx.path("_log.txt").open("a") as log:
        log.write(f"\n$ {' '.join(cmd)}   (limit {limit:.0f} s)\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=ctx.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, start_new_session=True,
        )  # fmt: skip
        pump = threading.Thread(target=_pump, args=(proc.stdout, log, tail), daemon=True)
        pump.start()
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            rc = None
            _stop(proc)
        pump.join(timeout=KILL_GRACE_S)
        if rc is None:  # on a line of its own, even when the child was cut off mid-line
            note = f"\n[gpu-check: stopped after its {limit:.0f} s share]\n"
            log.write(note)
            sys.stdout.write(note)
    run = {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.monotonic() - start, 1)}
    return run | {"timed_out": rc is None, "tail": "".join(tail)[-3000:]}


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(name: str, ctx: Context, limit: float, report) -> dict:
    """Run a stage's commands, each within its share of ``limit``; ``report(result)`` after
    every command. Never raises."""
    start, result = time.monotonic(), {"status": "ok", "runs": []}
    cmds = stage_commands(name, ctx)
    if name == "sweep" and not cmds:
        result["status"] = "skipped (times compiled kernels: CUDA only)"
    for i, (cmd, weight) in enumerate(cmds):
        left = limit - (time.monotonic() - start)
        seconds = share(left, weight, [w for _, w in cmds[i:]])
        if seconds <= 5:
            result["status"] = "out of time"
            result["runs"].append({"cmd": " ".join(cmd), "rc": None, "skipped": True})
            continue
        run = run_command(cmd, ctx, seconds)
        result["runs"].append(run)
        ok = run["rc"] == 0 or (name == "tests" and run["rc"] == 5)  # 5: no test collected
        if not ok and result["status"] == "ok":
            result["status"] = "timeout" if run["timed_out"] else f"failed (rc {run['rc']})"
        result["seconds"] = round(time.monotonic() - start, 1)
        report(result | SUMMARIES[name](ctx))
    result["seconds"] = round(time.monotonic() - start, 1)
    return result | SUMMARIES[name](ctx)


_TEST_LINE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def summarize_tests(ctx: Context) -> dict:
    """Counts and failures from pytest's JUnit XML, or, when the run was stopped before
    pytest wrote it, from the per-test lines it streamed into the log."""
    path = ctx.path("_tests.xml")
    if not path.exists():
        return _tests_from_log(ctx.path("_log.txt"))
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {"counts": counts, "failed": failed}


def _tests_from_log(log: Path) -> dict:
    if not log.exists():
        return {}
    outcome = {}
    for line in log.read_text().splitlines():
        found = _TEST_LINE.match(line)
        if found:
            outcome[found.group(1)] = found.group(2)
    if not outcome:
        return {}
    bad = [t for t, o in outcome.items() if o in ("FAILED", "ERROR")]
    counts = {"tests": len(outcome), "failures": sum(o == "FAILED" for o in outcome.values())}
    counts |= {"errors": sum(o == "ERROR" for o in outcome.values())}
    counts["skipped"] = sum(o == "SKIPPED" for o in outcome.values())
    return {"counts": counts, "failed": bad, "from_log": True}


def summarize_bench(ctx: Context) -> dict:
    return {"rows": len(rows_io.read(ctx.path("_rows.jsonl")))}


def summarize_sweep(ctx: Context) -> dict:
    import sweep_kernels

    return {"sweep": sweep_kernels.results_from_rows(rows_io.read(ctx.path("_sweep.jsonl")))}


def summarize_memory(ctx: Context) -> dict:
    keys = ("suite", "vocab", "impl", "op", "peak_extra_bytes")
    return {"memory": [{k: r[k] for k in keys} for r in rows_io.read(ctx.path("_rows.jsonl"))]}


SUMMARIES = {
    "tests": summarize_tests,
    "bench": summarize_bench,
    "sweep": summarize_sweep,
    "memory": summarize_memory,
}

_PROBE = """
import json, sys, torch, triton
sys.path.insert(0, "benchmarks")
import peers
device, cpu_name, names = sys.argv[1], sys.argv[2], sys.argv[3:]
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    dev = {"device": p.name, "sms": p.multi_processor_count,
           "memory_GiB": round(p.total_memory / 2**30, 1),
           "capability": f"{p.major}.{p.minor}"}
elif device == "cpu":
    dev = {"device": f"cpu rehearsal ({cpu_name})"}
else:
    raise SystemExit("torch sees no CUDA GPU")
dev |= {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__}
dev["peers"] = {name: peers.missing(name) for name in names}
print(json.dumps(dev))
"""


def environment(ctx: Context) -> dict:
    """Device, driver, versions and peers (None: importable, else why not), read by the
    Python under test with the stages' environment."""
    cmd = [ctx.python, "-c", _PROBE, ctx.device, platform.machine(), *PEERS]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=ctx.env(), capture_output=True, text=True, check=True, timeout=180
    )
    env = json.loads(proc.stdout.strip().splitlines()[-1])
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        env["driver"] = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        env["driver"] = "unknown (no nvidia-smi)"
    env["python"] = platform.python_version()
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return env


def slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def _render_stage(name: str, res: dict, ctx: Context) -> list[str]:
    import render_bench
    import sweep_kernels

    lines = [f"## {name}: {res['status']} ({res.get('seconds', 0)} s)", ""]
    if name == "tests" and "counts" in res:
        c = res["counts"]
        lines.append(
            f"{c['tests']} tests: {c['failures']} failed, {c['errors']} errors, "
            f"{c['skipped']} skipped"
            + (
                " (the tests that finished before the stop, read from the log)"
                * res.get("from_log", False)
            )
        )
        lines += [f"- FAILED {f}" for f in res["failed"]]
    if name == "bench":
        lines += render_bench.render_tables(rows_io.read(ctx.path("_rows.jsonl")))
    for result in res.get("sweep", []):
        lines += [*sweep_kernels.render(result), ""]
    if name == "memory":
        lines += ["| suite | V | impl | op | peak extra MiB |", "|---|---:|---|---|---:|"]
        lines += [
            f"| {r['suite']} | {r['vocab']} | {r['impl']} | {r['op']} | "
            f"{r['peak_extra_bytes'] / 2**20:.0f} |"
            for r in res.get("memory", [])
        ]
    for run in res["runs"]:
        if run.get("skipped"):
            lines += ["", f"`{run['cmd']}`: not started (no time left)"]
        elif run["rc"] != 0:
            why = "timed out" if run["timed_out"] else f"rc {run['rc']}"
            lines += ["", f"`{run['cmd']}` ({why} after {run['seconds']} s):", "```"]
            lines += [run["tail"][-1500:], "```"]
    return [*lines, ""]


def render_report(env: dict, stages: dict, ctx: Context) -> str:
    """The markdown report of whatever has finished."""
    missing = [f"{p} ({why})" for p, why in env["peers"].items() if why]
    lines = [
        f"# GPU check: {env['device']}",
        "",
        f"{env['date']}; driver {env['driver']}, CUDA {env.get('cuda')}, torch {env['torch']}, "
        f"Triton {env['triton']}, Python {env['python']}; {env.get('sms')} SMs, "
        f"{env.get('memory_GiB')} GiB. Not importable here (skipped): "
        f"{'; '.join(missing) or 'none'}.",
        "",
    ]
    for name, res in stages.items():
        lines += _render_stage(name, res, ctx)
    return "\n".join(lines) + "\n"


def write_report(ctx: Context, env: dict, stages: dict) -> None:
    ctx.out.mkdir(parents=True, exist_ok=True)
    ctx.path(".json").write_text(json.dumps({"env": env, "stages": stages}, indent=1))
    ctx.path(".md").write_text(render_report(env, stages, ctx))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--budget", type=float, default=360.0, help="seconds for all stages")
    p.add_argument("--n", type=int, default=None, help="tokens (default 16384; rehearse 256)")
    p.add_argument("--vocab", type=int, nargs="+", default=None, help="default 151936 32000")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None)
    p.add_argument("--hidden", type=int, default=None, help="H of the hidden-state benchmark")
    p.add_argument("--peers", type=Path, help="folder of unpacked pure-Python peer wheels")
    p.add_argument("--python", default=sys.executable, help="interpreter for the stages")
    p.add_argument("--dry-run", action="store_true", help="list the stages and exit")
    p.add_argument("--rehearse", action="store_true", help="run on the CPU at a tiny size")
    args = p.parse_args(argv)
    small = args.rehearse
    args.n = args.n or (256 if small else 16384)
    args.vocab = args.vocab or ([4096, 2048] if small else [151936, 32000])
    args.dtype = args.dtype or ("fp32" if small else "bf16")
    args.hidden = args.hidden or (64 if small else 5120)
    if args.budget <= 0 or args.n <= 0 or min(args.vocab) <= 0 or args.hidden <= 0:
        p.error("--budget, --n, --vocab and --hidden must be positive")
    return args


def _dry_run(args, ctx: Context) -> int:
    for name in args.stages:
        cmds = stage_commands(name, ctx) or [(["(reads the bench rows)"], 1)]
        seconds = args.budget * SHARES[name] / sum(SHARES[s] for s in args.stages)
        print(f"{name}: about {seconds:.0f} s, plus what earlier stages leave unused")
        for cmd, weight in cmds:
            print(f"    [{share(seconds, weight, [w for _, w in cmds]):.0f} s]", " ".join(cmd))
    print(f"files: {', '.join(ctx.path(s).name for s in FILES)} in {ctx.out}")
    return 0


def main(argv=None) -> int:
    sys.stdout.reconfigure(line_buffering=True)
    args = parse_args(argv)
    date = datetime.date.today().isoformat()
    ctx = Context(
        args.out, f"gpu_<device>_{date}", args.python, args.budget, args.n, tuple(args.vocab),
        args.dtype, args.hidden, args.peers, "cpu" if args.rehearse else "cuda",
        1 if args.rehearse else None,
    )  # fmt: skip
    if args.dry_run:
        return _dry_run(args, ctx)
    try:
        env = environment(ctx)
    except subprocess.CalledProcessError as exc:
        print(f"gpu-check: no usable CUDA GPU from {args.python}:\n{exc.stderr}", file=sys.stderr)
        return 3
    ctx.stem = f"gpu_{slug(env['device'])}_{date}"
    ctx.out.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check: {env['device']}, torch {env['torch']}, Triton {env['triton']}")
    stages: dict = {}
    for i, name in enumerate(args.stages):
        print(f"gpu-check: {name} ...")
        report = lambda partial, name=name: write_report(ctx, env, stages | {name: partial})
        stages[name] = run_stage(name, ctx, stage_limit(name, ctx, args.stages[i:]), report)
        write_report(ctx, env, stages)
        print(f"gpu-check: {name}: {stages[name]['status']} ({stages[name]['seconds']} s)")
    print(ctx.path(".md").read_text())
    return 0 if all(s["status"] == "ok" for s in stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
