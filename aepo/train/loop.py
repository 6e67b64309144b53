"""The AEPO training loop. Per step, top to bottom:

rollout (colocated vLLM, tree) -> rewards -> group advantages -> old log-probs and entropy
recomputed by the trainer -> mini-batch updates with the fused policy loss -> weight sync to
vLLM (+ log-prob check) -> metrics -> checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from aepo.distributed import all_reduce, mean_over_ranks
from aepo.lm_head import fused_head_blocker
from aepo.objectives import entropy_statistics, group_advantages
from aepo.rollout.engines.base import GenRequest, SamplingConfig
from aepo.rollout.metrics import rollout_metrics
from aepo.rollout.trajectory import flatten
from aepo.rollout.tree import TreeRollout
from aepo.tasks.base import get_task, group_label
from aepo.train import checkpoint
from aepo.train.config import ConfigError, TrainConfig, dump_config
from aepo.train.engine import PolicyEngine, init_distributed
from aepo.train.metrics import MetricsLogger
from aepo.train.preempt import Preemption
from aepo.train.rollout import make_engine, rollout_config
from aepo.train.sync_check import Probe, sync_tolerance, sync_verdict

TIMING_KEYS = ("time_rollout", "time_train", "time_sync", "gen_tokens_per_s")


class Trainer:
    """Holds the pieces of one run; :meth:`fit` runs the steps."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world = init_distributed()
        self.run_dir = Path(cfg.run.dir)
        self.task = get_task(
            cfg.task.name, cfg.task.options, self.run_dir / "cache", cfg.task.module
        )
        self.skipped_steps, self.skip_streak, self.current_step = 0, 0, 0
        self.preempted = False
        self.samples = list(self.task.samples("train"))
        self.group_key = self.task.metric_group
        self.groups = sorted({s[self.group_key] for s in self.samples}) if self.group_key else []
        model_path = self._model_path()
        self._init_update(model_path)
        self.engine = make_engine(cfg, model_path, self.world, self.tokenizer)
        self.rollout = TreeRollout(
            self.engine,
            self.tokenizer,
            self.task.tools(),
            rollout_config(cfg, self.task.protocol(self.tokenizer)),
        )
        self.encode_prompt = lambda sample: self.task.encode_prompt(sample, self.tokenizer)

    @classmethod
    def update_only(cls, cfg: TrainConfig, model_path: str) -> Trainer:
        """A Trainer with the update path alone (:meth:`update` on given trajectories, or
        ``_recompute`` / ``_mini_batch`` on a batch): no task, rollout engine or run folder.
        For tests and benchmarks that bring their own rollouts."""
        self = cls.__new__(cls)
        self.cfg, self.run_dir = cfg, Path(cfg.run.dir)
        self.rank, self.world = init_distributed()
        self.skipped_steps, self.skip_streak, self.current_step = 0, 0, 0
        self._init_update(model_path)
        return self

    def _init_update(self, model_path: str) -> None:
        """The policy under DeepSpeed, its tokenizer and the loss settings."""
        from transformers import AutoTokenizer

        cfg = self.cfg
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.mini = cfg.optim.mini_batch_size or cfg.task.prompts_per_step * cfg.rollout.k
        self.policy = PolicyEngine(cfg, model_path, self.mini // cfg.optim.micro_batch_size)
        self.loss_kwargs = cfg.objective.policy_loss_kwargs()
        self.loss_kwargs.pop("entropy_adv_norm")
        self.fused_head = choose_lm_head(cfg.objective.lm_head, self.policy, self.rank)

    def _model_path(self) -> str:
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.run_dir / "config.yaml")
        if self.cfg.model.path is not None:
            return self.cfg.model.path
        path = self.run_dir / "base_model"
        if self.rank == 0 and not (path / "config.json").is_file():
            self.task.build_model(path, seed=self.cfg.run.seed)
        dist.barrier()
        return str(path)

    def fit(self) -> Path:
        cfg = self.cfg
        start = self._resume() if cfg.run.resume else 0
        if start:
            self.sync_weights()
        logger = MetricsLogger(
            self.run_dir,
            rank=self.rank,
            tensorboard=cfg.logging.tensorboard,
            progress=cfg.logging.progress,
            total_steps=cfg.run.steps,
            start_step=start,
        )
        with logger, Preemption() as preemption:
            for step in range(start, cfg.run.steps):
                self.current_step = step
                logger.log(step, self.step(step))
                stop = preemption.requested()  # collective: every rank stops at this step
                last = step + 1 == cfg.run.steps
                if stop or last or (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0):
                    self.save(step + 1)  # after a skipped step: the unchanged (finite) state
                if stop:
                    return self._preempted(stop, step + 1)
        self.policy.save_pretrained(str(self.run_dir / "final_model"), self.tokenizer)
        return self.run_dir

    def _preempted(self, signum, steps_done: int) -> Path:
        """After a SIGTERM / SIGINT: say where the checkpoint is and how to resume."""
        self.preempted = True
        if self.rank == 0:
            where = self.run_dir / "checkpoints" / f"step-{steps_done}"
            print(
                f"aepo: stopped by {signum.name} after step {steps_done}; checkpoint {where}; "
                "resume: run the same command with run.resume=true",
                flush=True,
            )
        return self.run_dir

    def _resume(self) -> int:
        done = checkpoint.complete_checkpoints(self.run_dir / "checkpoints")
        if not done:
            return 0
        state = checkpoint.load_checkpoint(self.policy, done[-1])
        return int(state["step"])

    def save(self, step: int) -> None:
        state = {"cursor": step * self.cfg.task.prompts_per_step * self.world}
        checkpoint.save_checkpoint(
            self.policy, self.run_dir / "checkpoints", step, state, keep_last=self.cfg.run.keep_last
        )

    def prompts_for(self, step: int) -> list[dict]:
        """This rank's samples for ``step``: a seeded permutation per epoch, read in order."""
        n = self.cfg.task.prompts_per_step
        start = (step * self.world + self.rank) * n
        out = []
        for i in range(start, start + n):
            epoch, pos = divmod(i, len(self.samples))
            order = np.random.default_rng([self.cfg.run.seed, epoch]).permutation(len(self.samples))
            out.append(self.samples[order[pos]])
        return out

    def step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        samples = self.prompts_for(step)
        prompts = [self.encode_prompt(s) for s in samples]
        group0 = (step * self.world + self.rank) * len(samples)
        out = self.rollout.run(prompts, step=step, group_offset=group0)
        rewards = self._score(out.trajectories, samples)
        t1 = time.perf_counter()
        before = self.probe_sync(prompts[0], step)  # the policy vLLM serves until the sync
        train_metrics = self.update(out.trajectories)
        t2 = time.perf_counter()
        self.sync_weights()
        sync_diff = self.check_sync(prompts[0], step, before)
        t3 = time.perf_counter()
        rollout = rollout_metrics(out)
        speed = rollout.pop("gen_tokens_per_s")  # a timing: this rank's, like the three below
        metrics = {**rewards, **train_metrics, **rollout, "sync_logprob_diff": sync_diff}
        metrics = finish_group_means(mean_over_ranks(metrics))
        metrics |= {
            "time_rollout": t1 - t0,
            "time_train": t2 - t1,
            "time_sync": t3 - t2,
            "gen_tokens_per_s": speed,
        }
        return metrics

    def _score(self, trajectories, samples) -> dict[str, float]:
        results = []
        for t in trajectories:
            res = self.task.reward(self.rollout.response_text(t), samples[t.prompt])
            t.reward = res.reward
            results.append(res)
        out = {
            "reward_mean": float(np.mean([r.reward for r in results])),
            "reward_std": float(np.std([r.reward for r in results])),
            "em": float(np.mean([r.em for r in results])),
            "f1": float(np.mean([r.f1 for r in results])),
            "format_ok": float(np.mean([r.format_ok for r in results])),
        }
        if self.group_key:
            values = [samples[t.prompt][self.group_key] for t in trajectories]
            em = [r.em for r in results]
            out |= group_sums(em, values, self.groups, self.group_key)
        return out

    def update(self, trajectories) -> dict[str, float]:
        """Advantages, old log-probs, then ppo_epochs x mini-batches of fused-loss updates."""
        self.policy.take_token_counts()  # count this update's forwards only
        batch = _shifted(flatten(trajectories, self.tokenizer.pad_token_id))
        adv = group_advantages(batch["rewards"], batch["group_ids"])
        batch["advantages"] = adv[:, None].expand_as(batch["mask"]).contiguous()
        batch["old_logp"], batch["entropy"] = self._recompute(batch)
        logged: dict[str, list[float]] = {}
        for _ in range(self.cfg.optim.ppo_epochs):
            for lo in range(0, len(trajectories), self.mini):
                for key, value in self._mini_batch(batch, slice(lo, lo + self.mini)).items():
                    logged.setdefault(key, []).append(value)
        out = {k: float(np.mean(v)) for k, v in logged.items()}
        out["rollout_logp_diff"] = _masked_mean_abs(
            batch["old_logp"] - batch["rollout_logp"], batch["mask"]
        )
        forwarded, flat = self.policy.take_token_counts()
        if flat:  # train.packing=tree: tokens forwarded over the flat batch's real tokens
            out["tree_token_ratio"] = forwarded / flat
        out["grad_norm"] = self.policy.grad_norm()
        out["skipped"] = float(sum(logged.get("skipped", [0.0])))
        out["skipped_steps"] = float(self.skipped_steps)
        return out

    @torch.no_grad()
    def _recompute(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The current policy's log-probs and entropy of every position (before updates)."""
        logp, ent = [], []
        micro = self.cfg.optim.micro_batch_size
        for lo in range(0, batch["input_ids"].shape[0], micro):
            rows = slice(lo, lo + micro)
            labels = torch.where(batch["mask"][rows].bool(), batch["labels"][rows], -100)
            lp, h = self._logprobs(batch, rows, labels)
            logp.append(lp.cpu())
            ent.append(h.cpu())
        return torch.cat(logp), torch.cat(ent)

    def _logprobs(self, batch, rows: slice, labels: torch.Tensor):
        """[B, L] (logp, entropy) of micro-batch rows: from hidden states x lm_head on the fused
        path, from the logits otherwise."""
        ids, attn = batch["input_ids"][rows], batch["attention_mask"][rows]
        kw = {"temperature": self.cfg.rollout.temperature, "backend": self.cfg.objective.backend}
        return self.policy.logprobs(ids, attn, labels, fused=self.fused_head, **kw)

    def _micro_loss(self, batch, r: slice, **kwargs):
        """The policy loss of micro-batch rows ``r``, from hidden states or from logits (rows
        with mask 0 are dropped before the fused head's matmuls)."""
        kwargs |= self.loss_kwargs
        kwargs |= {
            "temperature": self.cfg.rollout.temperature,
            "backend": self.cfg.objective.backend,
        }
        rows = (batch["input_ids"][r], batch["attention_mask"][r])
        tokens = tuple(batch[k][r] for k in ("labels", "old_logp", "advantages", "mask"))
        return self.policy.policy_loss(*rows, tokens, fused=self.fused_head, **kwargs)

    def _mini_batch(self, batch, rows: slice) -> dict[str, float]:
        cfg, group = self.cfg, dist.group.WORLD if self.world > 1 else None
        mask = batch["mask"][rows]
        norm = cfg.objective.entropy_adv_norm
        stats = None
        if norm == "batch":
            stats = entropy_statistics(
                batch["entropy"][rows], mask, norm="batch", process_group=group
            )
        normalizer = self._normalizer(mask)
        logged: dict[str, list[torch.Tensor]] = {}
        nonfinite, stepped = None, None  # on the loss's device: no host sync per micro-batch
        micro = cfg.optim.micro_batch_size
        for lo in range(rows.start, rows.start + mask.shape[0], micro):
            r = slice(lo, lo + micro)
            groups = batch["group_ids"][r] if norm == "group" else None
            loss, metrics = self._micro_loss(
                batch,
                r,
                normalizer=normalizer,
                entropy_stats=stats,
                entropy_adv_norm=norm,
                group_ids=groups,
            )
            bad = ~torch.isfinite(loss.detach())
            nonfinite = bad if nonfinite is None else nonfinite | bad
            self.policy.backward(loss * self.world)  # DeepSpeed averages gradients over ranks
            stepped = self.policy.step(nonfinite)
            for key, value in {"loss": loss, **metrics}.items():
                logged.setdefault(key, []).append(value.detach())
        # one host sync per mini-batch, not one per metric per micro-batch
        out = {k: float(torch.stack(v).float().mean()) for k, v in logged.items()}
        self._after_optimizer_step(stepped, self.policy.skip_reason)
        return out | {"skipped": float(stepped is False)}

    def _after_optimizer_step(self, stepped: bool | None, what: str) -> None:
        """Count skipped (non-finite) optimizer steps; stop after optim.max_skipped_steps in a
        row. A skipped step changes nothing, so every checkpoint holds a finite state."""
        if stepped is not False:
            self.skip_streak = 0
            return
        self.skip_streak += 1
        self.skipped_steps += 1
        if self.rank == 0:
            print(
                f"aepo: warning: step {self.current_step}: non-finite {what}; optimizer step "
                f"skipped on every rank ({self.skip_streak} in a row)",
                flush=True,
            )
        limit = self.cfg.optim.max_skipped_steps
        if self.skip_streak >= limit:
            done = checkpoint.complete_checkpoints(self.run_dir / "checkpoints")
            newest = done[-1] if done else "none yet"
            raise RuntimeError(
                f"{self.skip_streak} consecutive optimizer steps had a non-finite {what} "
                f"(optim.max_skipped_steps={limit}); stopping. The newest checkpoint, {newest}, "
                "holds the last good state (skipped steps change nothing)"
            )

    def _normalizer(self, mask: torch.Tensor) -> float:
        """Global divisor of one mini-batch (all micro-batches and ranks), per aggregation."""
        agg = self.cfg.objective.agg
        if agg == "token-mean":
            local = mask.sum()
        elif agg == "constant":
            local = torch.tensor(float(mask.shape[0] * self.cfg.rollout.max_response_tokens))
        else:
            local = (mask.sum(-1) > 0).sum().float()
        return max(float(all_reduce(local.double().clone())), 1.0)

    def sync_weights(self) -> None:
        """Trainer -> vLLM, streamed: each bucket of ZeRO-3 shards is gathered as vLLM's loader
        reaches it and freed when it moves on (one bucket of extra memory, in the model's
        dtype); then the tied head's refresh and the prefix-cache reset. Collective."""
        self.engine.update_weights(self.policy.gathered_parameters())

    @torch.no_grad()
    def probe_sync(self, prompt_ids: list[int], step: int) -> Probe:
        """A few tokens sampled by vLLM for a fixed (prompt, seed), with vLLM's log-probs of
        them and the trainer's (:mod:`aepo.train.sync_check`)."""
        cfg = self.cfg
        n = cfg.logging.sync_check_tokens
        seed = cfg.run.seed * 1_000_003 + step
        sampling = SamplingConfig(temperature=cfg.rollout.temperature, logprobs_k=1)
        res = self.engine.generate([GenRequest(prompt_ids, n, seed)], sampling, [])[0]
        ids = torch.tensor([prompt_ids + res.token_ids])
        logits, _ = self.policy.logits(ids, torch.ones_like(ids))
        logits = logits.float() / cfg.rollout.temperature
        lp = torch.log_softmax(logits[0, len(prompt_ids) - 1 : -1], -1)
        ref = lp.gather(-1, torch.tensor(res.token_ids, device=lp.device)[:, None])[:, 0].cpu()
        return Probe(list(res.token_ids), torch.tensor(res.logprobs, dtype=torch.float32), ref)

    def check_sync(self, prompt_ids: list[int], step: int, before: Probe | None = None) -> float:
        """After a sync: raise if vLLM still serves the previous policy (``before``: the same
        probe taken before the update) or its log-probs differ from the trainer's by more than
        ``logging.sync_tolerance`` (auto: by the weights' dtype); else that largest gap."""
        after = self.probe_sync(prompt_ids, step)
        dtype = next(self.policy.engine.module.parameters()).dtype
        tolerance = sync_tolerance(self.cfg.logging.sync_tolerance, dtype)
        why = sync_verdict(before, after, tolerance)
        if why:
            raise RuntimeError(f"weight sync check failed at step {step}: {why}")
        return after.gap()


def choose_lm_head(mode: str, policy: PolicyEngine, rank: int) -> bool:
    """True for the fused hidden-state loss. ``auto`` takes it when the model's output layer
    allows (:func:`~aepo.lm_head.fused_head_blocker`); the choice is printed once."""
    blocker = fused_head_blocker(policy.engine.module)
    if mode == "fused" and blocker:
        raise ConfigError(f"objective.lm_head=fused is not possible for this model: {blocker}")
    fused = mode == "fused" or (mode == "auto" and blocker is None)
    if rank == 0:
        why = f" ({blocker})" if blocker and mode == "auto" else ""
        path = "hidden states x lm_head (fused, no logits)" if fused else "logits"
        print(f"aepo: objective.lm_head={mode}: policy loss from {path}{why}", flush=True)
    return fused


def _shifted(tb) -> dict[str, torch.Tensor]:
    """Align everything with the position that predicts it: position t scores token t + 1."""
    ids = tb.input_ids
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    mask = torch.zeros_like(tb.loss_mask)
    mask[:, :-1] = tb.loss_mask[:, 1:]
    rollout_logp = torch.zeros_like(tb.rollout_logprobs)
    rollout_logp[:, :-1] = tb.rollout_logprobs[:, 1:]
    return {
        "input_ids": ids,
        "attention_mask": tb.attention_mask,
        "labels": labels.clamp(min=0),
        "mask": mask,
        "rollout_logp": rollout_logp,
        "rewards": tb.rewards,
        "group_ids": tb.group_ids,
    }


def group_sums(em: list[float], values: list, groups: list, group_key: str) -> dict[str, float]:
    """Per-group exact-match sums and counts, as ``_sum/em_<g>`` / ``_count/em_<g>`` entries.

    Every rank reports every group of the task (count 0 where its batch has none), so the keys
    agree across ranks; :func:`finish_group_means` divides after the cross-rank mean.
    """
    out = {}
    for g in groups:
        hits = [e for e, v in zip(em, values, strict=True) if v == g]
        key = "em_" + group_label(group_key, g)
        out[f"_sum/{key}"], out[f"_count/{key}"] = float(sum(hits)), float(len(hits))
    return out


def finish_group_means(metrics: dict[str, float]) -> dict[str, float]:
    """Replace each ``_sum/K`` + ``_count/K`` pair by ``K`` = sum / count (nan when empty)."""
    out = {k: v for k, v in metrics.items() if not k.startswith(("_sum/", "_count/"))}
    for key, total in metrics.items():
        if key.startswith("_sum/"):
            name = key[len("_sum/") :]
            count = metrics[f"_count/{name}"]
            out[name] = total / count if count > 0 else float("nan")
    return out


def _masked_mean_abs(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x.abs() * mask).sum() / mask.sum().clamp(min=1))


def train(cfg: TrainConfig) -> Path | None:
    """Run a whole training job (one process, or one rank under torchrun / deepspeed).
    Returns the run directory, or None when a signal stopped it after a checkpoint."""
    trainer = Trainer(cfg)
    run_dir = trainer.fit()
    return None if trainer.preempted else run_dir
