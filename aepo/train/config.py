"""Training configuration: frozen dataclasses with defaults, loaded from YAML plus dotted
``key=value`` overrides, validated with errors that name the key and the allowed values."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from aepo.loss import PolicyLossConfig
from aepo.rollout.branching import MODES, BranchConfig
from aepo.rollout.engines.base import SamplingConfig
from aepo.rollout.engines.vllm import VLLMConfig
from aepo.rollout.tree import RolloutConfig


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key."""


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # HF model folder; None: the task builds its default model
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), float32, bfloat16
    attn_implementation: str = "sdpa"  # sdpa, eager, or flash_attention_2 (GPU, flash-attn)


@dataclass(frozen=True)
class TaskConfig:
    name: str = "toy"  # registered task (aepo.tasks.registry)
    prompts_per_step: int = 4  # prompts per rank per step (each gets k trajectories)
    options: dict = field(default_factory=dict)  # task-specific settings
    module: str | None = None  # a module imported first: it may register your own tasks


# The rollout section sets the fields of the rollout's own dataclasses by name (see
# aepo.train.rollout: rollout_config, make_engine); their defaults are defined there, once.
_B, _S, _R, _V = BranchConfig, SamplingConfig, RolloutConfig, VLLMConfig


@dataclass(frozen=True)
class RolloutSection:
    engine: str = "vllm"  # vllm or hf
    mode: str = _B.mode  # aepo, aepo-fixed, arpo, flat
    k: int = _B.k  # trajectories per prompt
    m_fixed: int | None = _B.m_fixed  # global samples in fixed modes (None: k // 2)
    beta: float = _B.beta  # pre-monitoring sharpness
    tau: float = _B.tau  # branch threshold
    gamma: float = _B.gamma  # entropy-difference weight
    lam: float = _B.lam  # consecutive-branch penalty
    z: int = _B.z  # continuations per fork
    temperature: float = _S.temperature  # sampling temperature (the loss uses the same)
    top_p: float = _S.top_p  # nucleus sampling
    logprobs_k: int = _S.logprobs_k  # top-k log-probs for the entropy estimate
    max_response_tokens: int = _R.max_response_tokens  # response budget per trajectory
    max_tool_calls: int = _R.max_tool_calls  # tool calls per trajectory
    max_result_tokens: int = _R.max_result_tokens  # tool result budget in tokens
    window: int = _R.window  # W tokens for the segment entropy
    tool_timeout_s: float = _R.tool_timeout_s  # seconds per tool call, then error="timeout"
    cpu_kv_cache_gib: int = _V.cpu_kv_cache_gib  # vLLM KV cache on CPU
    gpu_memory_utilization: float = _V.gpu_memory_utilization  # vLLM share of GPU memory
    max_model_len: int | None = _V.max_model_len  # vLLM context length; null: the model's own


@dataclass(frozen=True)
class TrainSection:
    packing: str = "tree"  # tree: shared prefixes forwarded once; flat: every path padded
    gradient_checkpointing: bool = False  # recompute activations in backward (long rows, 7B+)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    grad_clip: float = 1.0  # global grad-norm clip (0 disables)
    ppo_epochs: int = 1  # passes over each step's rollouts
    mini_batch_size: int | None = None  # trajectories per rank per optimizer step (None: all)
    micro_batch_size: int = 4  # trajectories per forward/backward
    max_skipped_steps: int = 3  # consecutive non-finite (skipped) optimizer steps before a stop


@dataclass(frozen=True)
class DeepSpeedSection:
    zero_stage: int = 3  # ZeRO stage (3 shards parameters, gradients, optimizer state)
    offload_optimizer: bool = False  # keep optimizer state on the CPU (GPU runs)
    sync_bucket_mb: int = 64  # weight-sync bucket size when gathering from ZeRO-3 shards


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True  # write run_dir/tb
    progress: bool = True  # progress bar on rank 0
    sync_check_tokens: int = 16  # tokens sampled after each sync to compare log-probs
    # bf16/fp16 kernels differ by ~0.1 nat on a token; a skipped sync is caught in any dtype
    # (aepo/train/sync_check.py).
    sync_tolerance: float | None = None  # max |vLLM - trainer| log-prob; null: fp32 1e-4, 16-bit 1


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"  # run directory (config, metrics, checkpoints, plots)
    steps: int = 10  # training steps
    seed: int = 0  # run seed: data order, rollouts, branch draws
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_last: int = 2  # checkpoints kept
    resume: bool = False  # continue from the latest complete checkpoint in dir


@dataclass(frozen=True)
class EvalSection:
    k: int = 4  # sampled rollouts per question for pass@k (1: greedy only)
    temperature: float = 1.0  # sampling temperature of the pass@k rollouts
    max_questions: int | None = None  # evaluate the first N eval questions (None: all)
    batch_size: int = 256  # questions per rollout batch


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    objective: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalSection = field(default_factory=EvalSection)


# Keys of the shared section dataclasses that the trainer does not take: setting one is an
# error that says where the setting lives (the config reference leaves them out).
REMOVED = {
    "objective.temperature": "the loss divides by the sampling temperature: set "
    "rollout.temperature",
    "objective.inplace_grad": "the trainer always writes dL/dlogits into the logits' storage "
    "(the logits path keeps no [N, V] gradient buffer)",
}

CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "rollout.engine": ("vllm", "hf"),
    "rollout.mode": MODES,
    "train.packing": ("tree", "flat"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
}


def load_config(
    path: str | Path | None = None, overrides: typing.Sequence[str] = ()
) -> TrainConfig:
    """YAML file (optional) + ``a.b=value`` overrides (values parsed as YAML) -> TrainConfig."""
    raw = {} if path is None else _read_yaml(Path(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from exc
    cfg = _build(TrainConfig, raw, "")
    _validate(cfg)
    return cfg


def _read_yaml(path: Path) -> dict:
    """The config file's mapping; a missing file, a folder or a YAML syntax error is a
    ConfigError naming the file (and the line and column)."""
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is a folder: give the YAML file inside it")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in raw:
        if f"{prefix}{name}" in REMOVED:
            raise ConfigError(f"{prefix}{name} is not a trainer setting: {REMOVED[prefix + name]}")
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(
            f"unknown key {prefix + unknown[0]!r}; valid keys in {where}: {', '.join(fields)}"
        )
    values = {}
    for name, value in raw.items():
        key, hint = f"{prefix}{name}", hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, key + ".")
        else:
            values[name] = _coerce(key, value, hint)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from exc


def _coerce(key: str, value, hint):
    """Check ``value`` against the annotation; ints are accepted for floats, lists for tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(
            _coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    expected = origin or hint
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
        with contextlib.suppress(ValueError):
            return float(value)
    if not ok:
        raise ConfigError(
            f"{key}: expected {getattr(expected, '__name__', expected)}, got {value!r} "
            f"({type(value).__name__})"
        )
    return value


def _validate(cfg: TrainConfig) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, allowed))}")
    if cfg.model.dtype == "bfloat16" and not _has_cuda():
        raise ConfigError(
            "model.dtype=bfloat16 needs a CUDA GPU: on CPU the trainer and vLLM run in float32 "
            "(model.dtype=auto picks bfloat16 on a GPU)"
        )
    if cfg.model.path is not None and not (Path(cfg.model.path) / "config.json").is_file():
        raise ConfigError(f"model.path {cfg.model.path!r} is not a model folder (no config.json)")
    positive = {
        "run.steps": cfg.run.steps,
        "rollout.k": cfg.rollout.k,
        "task.prompts_per_step": cfg.task.prompts_per_step,
        "optim.micro_batch_size": cfg.optim.micro_batch_size,
        "eval.k": cfg.eval.k,
        "eval.batch_size": cfg.eval.batch_size,
        "optim.max_skipped_steps": cfg.optim.max_skipped_steps,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if not (math.isfinite(cfg.rollout.temperature) and cfg.rollout.temperature > 0):
        raise ConfigError(f"rollout.temperature must be > 0, got {cfg.rollout.temperature}")
    if not cfg.rollout.tool_timeout_s > 0:
        raise ConfigError(f"rollout.tool_timeout_s must be > 0, got {cfg.rollout.tool_timeout_s}")
    packed = cfg.model.attn_implementation == "flash_attention_2" and cfg.train.packing == "flat"
    if packed and (
        cfg.objective.agg not in ("token-mean", "constant")
        or cfg.objective.entropy_adv_norm == "group"
    ):
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 with train.packing=flat packs sequences "
            "without padding: it needs objective.agg token-mean or constant and "
            "entropy_adv_norm batch or micro (train.packing=tree has no such limit)"
        )
    _validate_cross(cfg)
    per_rank = cfg.task.prompts_per_step * cfg.rollout.k
    mini = cfg.optim.mini_batch_size or per_rank
    if per_rank % mini or mini % cfg.optim.micro_batch_size:
        raise ConfigError(
            f"optim.mini_batch_size ({mini}) must divide the {per_rank} trajectories per rank "
            f"(task.prompts_per_step x rollout.k), and optim.micro_batch_size "
            f"({cfg.optim.micro_batch_size}) must divide it"
        )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _validate_cross(cfg: TrainConfig) -> None:
    """Cross-field checks that would otherwise fail minutes into a run."""
    if cfg.rollout.k < 2:
        raise ConfigError(
            f"rollout.k={cfg.rollout.k}: advantages are relative to the other trajectories of "
            f"the same prompt, so one per prompt gives every advantage 0 "
            f"(objective.objective={cfg.objective.objective} would learn nothing); use k >= 2"
        )
    path = cfg.model.path
    if path is not None and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(
            f"model.path {path!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer with the model (tokenizer.save_pretrained)"
        )
    if cfg.eval.k > 1 and cfg.eval.temperature <= 0:
        raise ConfigError(
            f"eval.k={cfg.eval.k} samples need eval.temperature > 0 (got {cfg.eval.temperature})"
        )
    from aepo.tasks.base import task_class

    try:
        task_class(cfg.task.name, cfg.task.module).check_options(cfg.task.options)
    except (ValueError, TypeError, ImportError) as exc:
        raise ConfigError(f"task: {exc}") from exc


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) for YAML, without the :data:`REMOVED` keys."""
    out = dataclasses.asdict(cfg)
    for key in REMOVED:
        section, name = key.split(".")
        out.get(section, {}).pop(name, None)

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return list(x) if isinstance(x, tuple) else x

    return plain(out)


def dump_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config (every field, defaults included)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _field_comments(cls) -> dict[str, str]:
    """``name -> the trailing # comment`` of each field line in ``cls``'s source."""
    import inspect
    import re

    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _shown(default) -> str:
    """A default as one line of YAML flow style (null, {}, [0.9, 0.999], 'text')."""
    text = yaml.safe_dump(default, default_flow_style=True, width=math.inf)
    return text.strip().removesuffix("...").strip()


def config_reference() -> str:
    """Markdown table of every config key, its default and what it does (docs/config.md)."""
    lines = [
        "# Config reference",
        "",
        "Generated by `python -m aepo.train.config`; every key, "
        "its default and its meaning. Set them in the YAML file or as `section.key=value`.",
        "",
    ]
    defaults = TrainConfig()
    for section in dataclasses.fields(TrainConfig):
        value = getattr(defaults, section.name)
        lines += [f"## `{section.name}`", "", "| key | default | |", "|---|---|---|"]
        notes = _field_comments(type(value))
        for f in dataclasses.fields(value):
            if f"{section.name}.{f.name}" in REMOVED:
                continue
            shown = _shown(getattr(value, f.name))
            lines.append(f"| `{section.name}.{f.name}` | `{shown}` | {notes.get(f.name, '')} |")
        lines.append("")
    from aepo.tasks.qa import OPTION_HELP

    lines += ["## `task.options` of `task.name: qa`", "", "| key | default | |", "|---|---|---|"]
    for key, (default, note) in OPTION_HELP.items():
        lines.append(f"| `task.options.{key}` | `{_shown(default)}` | {note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")
