"""Held-out evaluation through the rollout engine and the task's tools: greedy (or sampled)
multi-turn rollouts per question, scored by the task's reward, grouped by a sample field (e.g.
hop count), with pass@k over k sampled rollouts. ``aepo eval`` (:func:`run`) and the demo both
use :func:`evaluate`."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tqdm import tqdm

from aepo.rollout.branching import BranchConfig
from aepo.rollout.engines.base import SamplingConfig
from aepo.rollout.tree import RolloutConfig, TreeRollout
from aepo.tasks.base import group_label
from aepo.train.config import EvalSection

SCORES = ("em", "f1", "format_ok", "tool_calls")


def evaluate(engine, tokenizer, tools: Mapping, samples: Sequence[Mapping], reward, *,
             rollout: RolloutConfig | None = None, group_by: str | None = "hops",
             temperature: float = 0.0, k: int = 1, batch_size: int = EvalSection.batch_size,
             encode: Callable[[Mapping], list[int]] | None = None,
             records: list | None = None, progress: bool = False) -> dict[str, float]:  # fmt: skip
    """Exact match, F1, format rate and tool calls, overall and per ``sample[group_by]``.

    Args:
        rollout: the rollout settings (budgets, tags, tool deadline, seed; the defaults of
            :class:`~aepo.rollout.tree.RolloutConfig` when None); its branching and sampling
            are replaced by ``k`` flat rollouts per question at ``temperature``.
        k: rollouts per question (``temperature`` > 0 for k > 1); adds ``pass@k`` (share of
            questions with at least one exact match) when k > 1.
        encode: sample -> prompt token ids (a task's ``encode_prompt``); default
            ``tokenizer.encode(sample["prompt"])``.
        records: if given, one dict per rollout is appended (question index, response text,
            extracted answer, reward, em, f1, format, tool calls).
    Returns:
        keys like ``em``, ``em_2hop`` (for group_by="hops"), ``n_2hop``, ``tool_calls``,
        ``format_error``, ``pass@4``.
    """
    cfg = dataclasses.replace(
        rollout or RolloutConfig(),
        branch=BranchConfig(mode="flat", k=k),
        sampling=SamplingConfig(temperature=temperature, logprobs_k=1),
    )
    encode = encode or (lambda s: tokenizer.encode(s["prompt"]))
    rollout = TreeRollout(engine, tokenizer, tools, cfg)
    per_group: dict[str, list] = defaultdict(list)
    solved: dict[int, bool] = defaultdict(bool)
    bar = tqdm(total=len(samples), desc="eval", unit="q", disable=not progress, leave=False)
    for lo in range(0, len(samples), batch_size):
        chunk = samples[lo : lo + batch_size]
        out = rollout.run([encode(s) for s in chunk])
        for t in out.trajectories:
            sample = chunk[t.prompt]
            text = rollout.response_text(t)
            res = reward(text, sample)
            row = (res.em, res.f1, float(res.format_ok), float(len(t.tool_calls)))
            per_group["all"].append(row)
            if group_by is not None:
                per_group[group_label(group_by, sample.get(group_by))].append(row)
            solved[lo + t.prompt] |= res.em == 1.0
            if records is not None:
                records.append(_record(lo + t.prompt, t, text, res))
        bar.update(len(chunk))
    bar.close()
    out = _summarise(per_group)
    if k > 1:
        out[f"pass@{k}"] = sum(solved.values()) / max(len(samples), 1)
    return out


def _record(index: int, trajectory, text: str, res) -> dict:
    return {
        "index": index,
        "response": text,
        "answer": res.answer,
        "reward": res.reward,
        "em": res.em,
        "f1": res.f1,
        "format_ok": res.format_ok,
        "format_reason": res.reason,
        "tool_calls": [
            {"tool": c.tool, "query": c.query, "ok": c.ok} for c in trajectory.tool_calls
        ],
        "finish_reason": trajectory.finish_reason,
    }


def _summarise(per_group: dict[str, list]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, rows in sorted(per_group.items()):
        suffix = "" if name == "all" else f"_{name}"
        n = len(rows)
        for i, key in enumerate(SCORES):
            out[key + suffix] = sum(r[i] for r in rows) / n
        out["n" + suffix] = float(n)
    if "format_ok" in out:
        out["format_error"] = 1.0 - out["format_ok"]
    return out


def run(cfg, model: str | None = None, out_dir: str | Path | None = None) -> Path:
    """``aepo eval``: greedy and (``eval.k`` > 1) sampled evaluation of ``model`` (default: the
    run's ``final_model``, else ``model.path``) on the task's eval split. Writes ``eval.json``
    (metrics) and ``eval.jsonl`` (one row per question: id, question, answers, the greedy
    response and its scores, and the sampled rollouts' exact matches) to ``out_dir``
    (default ``run.dir``); returns the ``eval.json`` path."""
    from transformers import AutoTokenizer

    from aepo.tasks.base import get_task
    from aepo.train.rollout import make_engine, rollout_config

    run_dir = Path(cfg.run.dir)
    model = model or _default_model(cfg, run_dir)
    task = get_task(cfg.task.name, cfg.task.options, run_dir / "cache", cfg.task.module)
    samples = list(task.samples("eval"))[: cfg.eval.max_questions]
    tokenizer = AutoTokenizer.from_pretrained(model)
    engine = make_engine(cfg, model, 1, tokenizer)
    e = cfg.eval
    kw = {
        "rollout": rollout_config(cfg, task.protocol(tokenizer)),  # tool deadline included
        "group_by": task.metric_group,
        "batch_size": e.batch_size,
        "encode": lambda sample: task.encode_prompt(sample, tokenizer),
        "progress": True,
    }
    greedy: list[dict] = []
    metrics = evaluate(engine, tokenizer, task.tools(), samples, task.reward, records=greedy, **kw)
    sampled: list[dict] = []
    if e.k > 1:
        kw |= {"temperature": e.temperature, "k": e.k, "records": sampled}
        more = evaluate(engine, tokenizer, task.tools(), samples, task.reward, **kw)
        metrics |= {f"sampled_{key}": v for key, v in more.items() if not key.startswith("pass@")}
        metrics[f"pass@{e.k}"] = more[f"pass@{e.k}"]
    return _write(Path(out_dir or run_dir), model, samples, metrics, greedy, sampled)


def _default_model(cfg, run_dir: Path) -> str:
    final = run_dir / "final_model"
    if (final / "config.json").is_file():
        return str(final)
    if cfg.model.path is None:
        raise ValueError(f"no model to evaluate: {final} does not exist and model.path is unset")
    return cfg.model.path


def _write(out: Path, model, samples, metrics, greedy, sampled) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    by_question: dict[int, list[float]] = defaultdict(list)
    for row in sampled:
        by_question[row["index"]].append(row["em"])
    with open(out / "eval.jsonl", "w") as f:
        for row in greedy:
            sample = samples[row["index"]]
            line = {
                "id": sample.get("id", row["index"]),
                "question": sample.get("question"),
                "answers": sample.get("answers"),
                **row,
                "sampled_em": by_question.get(row["index"], []),
            }
            f.write(json.dumps(line) + "\n")
    path = out / "eval.json"
    path.write_text(json.dumps({"model": str(model), "n": len(samples), **metrics}, indent=2))
    return path
