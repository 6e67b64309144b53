"""``make demo``: train a small tool-using agent on SynthHop end to end, on a CPU.

generate the task -> cold-start SFT -> held-out eval -> RL with ``aepo train`` (vLLM rollouts,
DeepSpeed, the fused loss) -> held-out eval -> plots and a summary table. The last line reads
``demo: 2-hop EM sft=<x> rl=<y> (<+/-d>) target met|missed`` (target: +10 points).

    python -m aepo.demo [--seed 0] [--run-dir runs/demo] [--compare] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

TARGET_GAIN = 0.10
MODES = ("flat", "arpo", "aepo")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "synthhop.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="aepo.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="task, model and RL seed")
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--config", type=Path, default=EXAMPLE, help="RL config (aepo train)")
    p.add_argument("--eval-per-hop", type=int, default=300, help="held-out questions per hop")
    p.add_argument("--compare", action="store_true", help="RL with flat, arpo and aepo")
    p.add_argument("--quick", action="store_true", help="tiny budgets (CI smoke test)")
    p.add_argument("overrides", nargs="*", help="extra aepo train overrides (key=value)")
    return p.parse_args(argv)


def eval_samples(task, per_hop: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for hops in (1, 2, 3):
        pool = task.kb.questions("eval", hops=hops)
        out += rng.sample(pool, min(per_hop, len(pool)))
    return out


def rl_config(args):
    """The RL stage's config (``--config`` with the demo's seed and overrides): the demo's
    evaluations roll out with its settings (budgets, tags, tool deadline, vLLM memory, seed)
    and state none of them themselves."""
    from aepo.train.config import load_config

    return load_config(args.config, [f"run.seed={args.seed}", *args.overrides])


def run_eval(engine, tokenizer, task, samples, rollout) -> dict[str, float]:
    from aepo.evaluate import evaluate

    encode = lambda sample: task.encode_prompt(sample, tokenizer)
    return evaluate(engine, tokenizer, task.tools(), samples, task.reward, rollout=rollout,
                    encode=encode)  # fmt: skip


def rl(args, model_path: Path, run_dir: Path, mode: str) -> Path:
    """One ``aepo train`` run in a subprocess (its own vLLM and DeepSpeed)."""
    overrides = [f"model.path={model_path}", f"run.dir={run_dir}", f"run.seed={args.seed}",
                 f"task.options.seed={args.seed}", f"rollout.mode={mode}"]  # fmt: skip
    if mode != "aepo":  # the baselines: flat GRPO and ARPO train with the clipped GRPO loss
        overrides.append("objective.objective=grpo")
    if args.quick:
        overrides += ["run.steps=1", "task.prompts_per_step=4", "optim.mini_batch_size=32"]
    cmd = [sys.executable, "-m", "aepo.cli", "train", str(args.config), *overrides,
           *args.overrides]  # fmt: skip
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    subprocess.run(cmd, check=True, env=env)
    return run_dir / "final_model"


def load_weights(path: Path):
    from safetensors.torch import load_file

    return list(load_file(Path(path) / "model.safetensors").items())


def table(results: dict[str, dict[str, float]]) -> str:
    cols = list(results)
    lines = ["| hops | " + " | ".join(f"EM {c}" for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]  # fmt: skip
    for hops in (1, 2, 3):
        key = f"em_{hops}hop"
        n = int(next(iter(results.values())).get(f"n_{hops}hop", 0))
        vals = " | ".join(f"{100 * r.get(key, float('nan')):.1f}" for r in results.values())
        lines.append(f"| {hops} (n={n}) | {vals} |")
    return "\n".join(lines)


def compare_table(run_dir: Path, modes, results) -> str:
    """Held-out EM plus training-time entropy, tool use and group diversity per mode."""
    from aepo.train.metrics import read_metrics

    lines = ["| mode | EM 1-hop | EM 2-hop | entropy first -> last | tool calls / traj | "
             "distinct / group |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for mode in modes:
        rows = read_metrics(run_dir / f"rl_{mode}")
        tail = rows[-max(1, len(rows) // 5) :]

        def mean(key, rs=tail):
            vals = [r[key] for r in rs if r.get(key) is not None]
            return sum(vals) / max(len(vals), 1)

        r = results[mode]
        lines.append(
            f"| {mode} | {100 * r['em_1hop']:.1f} | {100 * r['em_2hop']:.1f} | "
            f"{mean('entropy', rows[:1]):.3f} -> {mean('entropy'):.3f} | "
            f"{mean('tool_calls_per_traj'):.2f} | {mean('distinct_per_group'):.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoTokenizer

    from aepo.tasks.synthhop.task import SynthHopTask
    from aepo.train.plot import plot_compare, plot_run
    from aepo.train.rollout import make_engine, rollout_config

    t0 = time.perf_counter()
    sft = {"steps": 20, "batch_size": 16} if args.quick else None
    task = SynthHopTask(seed=args.seed, sft=sft)
    sft_dir = args.run_dir / "sft_model"
    if not (sft_dir / "config.json").is_file():
        print(f"demo: SFT on {len(task.sft_examples())} gold trajectories ...", flush=True)
        task.build_model(sft_dir, seed=args.seed)
    t_sft = time.perf_counter() - t0
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    samples = eval_samples(task, 16 if args.quick else args.eval_per_hop, args.seed)
    cfg = rl_config(args)
    rollout = rollout_config(cfg, task.protocol(tokenizer))
    engine = make_engine(cfg, str(sft_dir), 1, tokenizer)
    results = {"sft": run_eval(engine, tokenizer, task, samples, rollout)}
    print("demo: after SFT\n" + table(results), flush=True)
    modes = MODES if args.compare else ("aepo",)
    t1 = time.perf_counter()
    for mode in modes:
        final = rl(args, sft_dir, args.run_dir / f"rl_{mode}", mode)
        engine.update_weights(load_weights(final))
        results[mode] = run_eval(engine, tokenizer, task, samples, rollout)
        plot_run(args.run_dir / f"rl_{mode}")
    t_rl = time.perf_counter() - t1
    if args.compare:
        plot_compare({m: args.run_dir / f"rl_{m}" for m in modes}, args.run_dir / "compare.png")
        print("\n" + compare_table(args.run_dir, modes, results))
    return summarise(args, results, {"sft_s": t_sft, "rl_s": t_rl,
                                     "total_s": time.perf_counter() - t0})  # fmt: skip


def summarise(args, results: dict, times: dict) -> dict:
    summary = {"seed": args.seed, "results": results, "times": times}
    (args.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n" + table(results))
    print(f"\ntimes: SFT {times['sft_s']:.0f} s, RL {times['rl_s']:.0f} s, "
          f"total {times['total_s']:.0f} s; run dir {args.run_dir}")  # fmt: skip
    sft, rl_em = results["sft"]["em_2hop"], results["aepo"]["em_2hop"]
    gain = rl_em - sft
    verdict = "target met" if gain >= TARGET_GAIN else "target missed"
    print(f"demo: 2-hop EM sft={100 * sft:.1f} rl={100 * rl_em:.1f} ({100 * gain:+.1f}) {verdict}")
    return summary


if __name__ == "__main__":
    main()
