"""Tree rollout vs flat sampling at equal k on the toy agent, with real vLLM and real search.

Reports, per branching mode: generated tokens/s, the share of prefill (context) tokens served
from vLLM's prefix cache, tool calls per trajectory, distinct trajectories per group, branches
per group: the median over ``--steps`` rollouts after one warm-up rollout. Results go to
benchmarks/results/ with device, versions and date.

    python benchmarks/bench_rollout.py --k 8 --prompts 16 --steps 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from aepo.rollout.branching import BranchConfig
from aepo.rollout.engines.base import SamplingConfig
from aepo.rollout.metrics import rollout_metrics
from aepo.rollout.tools.search import Document, SearchTool
from aepo.rollout.tree import RolloutConfig, TreeRollout
from aepo.tasks import toy

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("flat", "arpo", "aepo")


def run_mode(engine, tokenizer, search, mode: str, args) -> dict:
    cfg = RolloutConfig(
        branch=BranchConfig(mode=mode, k=args.k),
        sampling=SamplingConfig(temperature=1.0),
        max_response_tokens=160,
        max_tool_calls=4,
        seed=args.seed,
    )
    rollout = TreeRollout(engine, tokenizer, {"search": search}, cfg)
    names = toy.NAMES[: args.prompts]
    prompts = [tokenizer.encode(toy.prompt(n)) for n in names]
    rollout.run(prompts, step=10_000)  # warm-up, not counted: first requests run slower
    agg: dict[str, list[float]] = {}
    for step in range(args.steps):
        out = rollout.run(prompts, step=step)
        row = rollout_metrics(out) | {"seconds": out.stats["seconds"]}
        for key, value in row.items():
            agg.setdefault(key, []).append(value)
    return {key: statistics.median(values) for key, values in agg.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from aepo.rollout.engines.vllm import VLLMEngine

    with tempfile.TemporaryDirectory() as tmp:
        path = toy.build(Path(tmp) / "model", steps=150)
        tokenizer = AutoTokenizer.from_pretrained(path)
        engine = VLLMEngine(str(path))
        docs = toy.corpus()
        search = SearchTool([Document(n, n, t) for n, t in docs.items()], top_k=2)
        results = {mode: run_mode(engine, tokenizer, search, mode, args) for mode in MODES}
    report = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
        "env": environment(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"rollout_cpu_k{args.k}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    text = _render(report)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return report


def environment() -> dict:
    import vllm

    cpu = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else (cpu[0].split(":", 1)[1].strip() if cpu else "cpu"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
    }


def _render(report: dict) -> str:
    c = report["config"]
    lines = [
        f"# Tree vs flat rollout: k={c['k']}, {c['prompts']} prompts, {c['steps']} steps, "
        f"toy agent on {report['env']['device']}",
        "",
        "| mode | gen tok/s | prefill from cache | tool calls / traj | distinct / group | "
        "branches / group | s / step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, r in report["results"].items():
        lines.append(
            f"| {mode} | {r['gen_tokens_per_s']:.0f} | {100 * r['prefix_cache_reuse']:.1f}% "
            f"| {r['tool_calls_per_traj']:.2f} | {r['distinct_per_group']:.2f} "
            f"| {r['branches_per_group']:.2f} | {r['seconds']:.2f} |"
        )
    lines += ["", "```", json.dumps(report["env"], indent=1), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
