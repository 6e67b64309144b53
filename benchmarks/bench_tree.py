"""Tree-packed vs flat training updates on the demo's real rollout trees (train.packing).

The demo's RL config (examples/synthhop.yaml: k=8, 16 prompts, micro-batches of 32, AEPO
branching) rolls out ``--steps`` batches with real vLLM and the real search tool from the
SynthHop cold-start SFT model; each packing then runs the trainer's own update (old log-probs,
then the fused-loss mini-batches and optimizer steps) on the same trees, in a process of its
own. Reported: r = unique tokens / flat real tokens (and over the flat padded grid), the
update time and the peak resident memory of each packing, against the targets time <= (r +
0.10) x flat and peak memory <= flat. Results go to benchmarks/results/tree_cpu.{md,json}.

    python benchmarks/bench_tree.py [--model runs/demo/sft_model] [--steps 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_rollout import environment

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLE = ROOT / "examples" / "synthhop.yaml"
HEADS = ("logits", "fused")  # the demo's lm_head (logits), then the hidden-state path
PACKINGS = ("flat", "tree")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "runs" / "demo" / "sft_model",
                   help="SFT model folder (built as the demo builds it when missing)")  # fmt: skip
    p.add_argument("--steps", type=int, default=3, help="rollout batches (update steps)")
    p.add_argument("--repeats", type=int, default=2, help="timed updates per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)  # PACKING HEAD TREES
    p.add_argument("--roll-out", type=Path, help=argparse.SUPPRESS)  # TREES
    return p.parse_args(argv)


def config(model: Path, seed: int, *overrides: str):
    from aepo.train.config import load_config

    base = [f"model.path={model}", f"run.seed={seed}", f"task.options.seed={seed}"]
    return load_config(EXAMPLE, [*base, *overrides])


def sft_model(path: Path, seed: int) -> Path:
    """The demo's cold-start SFT model at ``path`` (built there when missing, ~2 minutes)."""
    if not (path / "config.json").is_file():
        from aepo.tasks.synthhop.task import SynthHopTask

        print(f"bench_tree: building the demo's SFT model at {path}", flush=True)
        SynthHopTask(seed=seed).build_model(path, seed=seed)
    return path


def roll_out(model: Path, args, out: Path) -> None:
    """``args.steps`` scored rollout batches of the demo's config, pickled to ``out``."""
    from aepo.train.loop import Trainer

    cfg = config(model, args.seed, f"run.dir={out.parent / 'run'}")
    trainer = Trainer(cfg)
    batches = []
    for step in range(args.steps):
        samples = trainer.prompts_for(step)
        prompts = [trainer.encode_prompt(s) for s in samples]
        trajectories = trainer.rollout.run(prompts, step=step).trajectories
        trainer._score(trajectories, samples)
        batches.append(trajectories)
        print(f"bench_tree: rollout {step + 1}/{args.steps}: {len(trajectories)} paths", flush=True)
    out.write_bytes(pickle.dumps({"batches": batches, "pad_id": trainer.tokenizer.pad_token_id}))


def token_ratios(batches, pad_id: int, micro: int) -> dict[str, float]:
    """Over the micro-batches the trainer packs: r = unique / flat real tokens (and over the
    flat padded grid), and the loss head's (row, label) edges per unique trained row (> 1 by
    the extra labels of fork rows)."""
    from aepo.kernels import unique_edges
    from aepo.rollout.trajectory import flatten
    from aepo.train.loop import _shifted
    from aepo.train.tree_pack import pack_tree

    n = dict.fromkeys(("unique", "real", "padded", "edges", "rows"), 0)
    for trajectories in batches:
        batch = _shifted(flatten(trajectories, pad_id))
        for lo in range(0, batch["input_ids"].shape[0], micro):
            ids, attn = (
                batch["input_ids"][lo : lo + micro],
                batch["attention_mask"][lo : lo + micro],
            )
            pack = pack_tree(ids, attn)
            keep = batch["mask"][lo : lo + micro] > 0
            edges = unique_edges(pack.index, batch["labels"][lo : lo + micro], keep)
            n["unique"] += pack.num_tokens
            n["real"] += pack.flat_tokens
            n["padded"] += ids.numel()
            n["edges"] += edges.rows.numel()
            n["rows"] += edges.rows.unique().numel()
    return {
        "r": n["unique"] / n["real"],
        "r_padded": n["unique"] / n["padded"],
        "flat_tokens": n["real"] / len(batches),
        "edges_per_row": n["edges"] / n["rows"],
    }


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(packing: str, head: str, trees: Path, model: Path, seed: int, repeats: int) -> dict:
    """The trainer's update on every pickled batch (``repeats`` times each, after one warm-up
    update): seconds and peak RSS (the kernel's high-water mark, reset before each update)."""
    from aepo.train.loop import Trainer

    data = pickle.loads(trees.read_bytes())
    cfg = config(model, seed, f"train.packing={packing}", f"objective.lm_head={head}")
    trainer = Trainer.update_only(cfg, str(model))
    trainer.update(data["batches"][0])  # warm-up: allocator, thread pools, first-call paths
    seconds, peaks, above, ratios = [], [], [], []
    for _ in range(repeats):
        for trajectories in data["batches"]:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
            base = _rss_kib("VmRSS")
            t0 = time.perf_counter()
            metrics = trainer.update(trajectories)
            seconds.append(time.perf_counter() - t0)
            peaks.append(_rss_kib("VmHWM") / 1024)
            above.append(peaks[-1] - base / 1024)
            ratios.append(metrics.get("tree_token_ratio", 1.0))
    return {
        "seconds": statistics.median(seconds),
        "seconds_all": seconds,
        "peak_rss_mib": max(peaks),
        "peak_above_start_mib": max(above),
        "tree_token_ratio": statistics.mean(ratios),
    }


def _child(extra: list[str], args) -> str:
    """This script with ``extra`` arguments in a fresh process (its own allocator and peak
    memory); returns its stdout."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors go back to the OS: honest peaks
    env.pop("TRITON_INTERPRET", None)
    common = ["--model", str(args.model), "--seed", str(args.seed), "--steps", str(args.steps),
              "--repeats", str(args.repeats)]  # fmt: skip
    cmd = [sys.executable, __file__, *extra, *common]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_tree {' '.join(extra)} failed (exit {proc.returncode})")
    return proc.stdout


def run_measure(packing: str, head: str, trees: Path, args) -> dict:
    out = _child(["--measure", packing, head, str(trees)], args)
    return json.loads(out.strip().splitlines()[-1])


def render(report: dict) -> str:
    c, r = report["config"], report["ratios"]
    lines = [
        f"# Tree-packed vs flat updates on the demo's trees ({report['env']['device']})",
        "",
        f"examples/synthhop.yaml (k={c['k']}, {c['prompts']} prompts, micro-batch {c['micro']}), "
        f"{c['steps']} rollout batches from the SFT model, each update timed {c['repeats']}x "
        f"(median). r = unique / flat real tokens = **{r['r']:.3f}** (over the padded grid "
        f"{r['r_padded']:.3f}); {r['flat_tokens']:.0f} real tokens per update. The loss head "
        "computes each unique trained row once; a trained row predicts "
        f"{r['edges_per_row']:.3f} distinct labels on average (forks). The flat path computes "
        "its padded [B, L] grid, as the trainer's flat path does with sdpa.",
        "",
        "| lm_head | packing | update s | tree / flat | target r + 0.10 | peak RSS MiB | "
        "peak above start MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for head, rows in report["results"].items():
        flat = rows["flat"]
        for packing, m in rows.items():
            rel = m["seconds"] / flat["seconds"]
            target = f"{r['r'] + 0.10:.3f}" if packing == "tree" else ""
            lines.append(
                f"| {head} | {packing} | {m['seconds']:.2f} | {rel:.3f} | {target} | "
                f"{m['peak_rss_mib']:.0f} | {m['peak_above_start_mib']:.0f} |"
            )
    lines += ["", "```", json.dumps(report["env"], indent=1), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.measure:
        packing, head, trees = args.measure
        print(json.dumps(measure(packing, head, Path(trees), args.model, args.seed, args.repeats)))
        return None
    if args.roll_out:
        roll_out(args.model, args, args.roll_out)
        return None
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    model = sft_model(args.model, args.seed)
    cfg = config(model, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        trees = Path(tmp) / "trees.pkl"
        _child(["--roll-out", str(trees)], args)  # vLLM and its memory gone before timing
        data = pickle.loads(trees.read_bytes())
        ratios = token_ratios(data["batches"], data["pad_id"], cfg.optim.micro_batch_size)
        results = {h: {p: run_measure(p, h, trees, args) for p in PACKINGS} for h in HEADS}
    report = {
        "config": {
            "k": cfg.rollout.k,
            "prompts": cfg.task.prompts_per_step,
            "micro": cfg.optim.micro_batch_size,
            "steps": args.steps,
            "repeats": args.repeats,
            "model": str(model),
        },
        "ratios": ratios,
        "results": results,
        "env": environment(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tree_cpu.json").write_text(json.dumps(report, indent=1) + "\n")
    text = render(report)
    (args.out / "tree_cpu.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
