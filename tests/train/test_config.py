"""Config loading: YAML + dotted overrides, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from aepo.train.config import ConfigError, dump_config, load_config, to_dict


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  k: 8\n  mode: arpo\nobjective:\n  objective: dapo\n")
    cfg = load_config(path, ["rollout.k=2", "optim.betas=[0.9, 0.95]", "task.options={seed: 3}"])
    assert cfg.rollout.k == 2 and cfg.rollout.mode == "arpo"
    assert cfg.objective.objective == "dapo" and cfg.optim.betas == (0.9, 0.95)
    assert cfg.task.options == {"seed": 3} and cfg.run.steps == 10
    assert isinstance(load_config(None, ["optim.lr=1"]).optim.lr, float)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["rollout.k=2", "run.steps=5"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and to_dict(again) == yaml.safe_load((tmp_path / "config.yaml").read_text())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["rollout.kk=3"], r"unknown key 'rollout.kk'; valid keys in rollout: engine, mode, k,"),
        (["trainer.lr=3"], r"unknown key 'trainer'; valid keys in the top level: model"),
        (["rollout.k=abc"], r"rollout.k: expected int, got 'abc' \(str\)"),
        (["optim.lr=fast"], r"optim.lr: expected float"),
        (["run.resume=1"], r"run.resume: expected bool"),
        (["optim.betas=[0.9]"], r"optim.betas: expected a list of 2 values"),
        (["model.path=/no/such/model"], r"model.path '/no/such/model' is not a model folder"),
        (["rollout.mode=tree"], r"rollout.mode='tree' is not one of: aepo, aepo-fixed, arpo, flat"),
        (["objective.objective=trpo"], r"objective='trpo' is not one of: aepo, grpo"),
        (["rollout.engine=sglang"], r"rollout.engine='sglang' is not one of: vllm, hf"),
        (["optim.micro_batch_size=3"], r"optim.micro_batch_size \(3\) must divide"),
        (["rollout.k=0"], r"rollout.k must be >= 1"),
        (["rollout.tool_timeout_s=0"], r"rollout.tool_timeout_s must be > 0, got 0.0"),
        (
            ["objective.temperature=0.5"],
            r"objective.temperature is not a trainer setting: .*"
            r"set rollout.temperature",
        ),
        (["objective.inplace_grad=true"], r"objective.inplace_grad is not a trainer setting"),
        (["model.dtype=bfloat16"], r"model.dtype=bfloat16 needs a CUDA GPU"),
        (["rollout"], r"must look like section.key=value"),
        (["rollout.k=1"], r"rollout.k=1: .* every advantage 0 \(objective.objective=aepo"),
        (["eval.temperature=0"], r"eval.k=4 samples need eval.temperature > 0"),
        (["task.name=nope"], r"task: unknown task 'nope'; registered: "),
        (["task.name=qa", "task.options.protocol.answer_tag=search"], r"task: .*tags collide"),
        (["task.name=qa", "task.options.tools.browser={}"], r"unknown tool 'browser'"),
        (["task.module=no_such_module"], r"task: No module named 'no_such_module'"),
    ],
    ids=[
        "unknown-key",
        "unknown-section",
        "int-type",
        "float-type",
        "bool-type",
        "tuple-len",
        "missing-model",
        "mode",
        "objective",
        "engine",
        "divisibility",
        "k0",
        "tool-timeout0",
        "temperature",
        "inplace-grad",
        "bf16-on-cpu",
        "no-equals",
        "k1-group-advantage",
        "eval-greedy-pass-at-k",
        "unknown-task",
        "qa-tags-collide",
        "qa-unknown-tool",
        "task-module",
    ],
)
def test_bad_config_names_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  k: four\n")
    proc = subprocess.run(
        [sys.executable, "-m", "aepo.cli", "train", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "config error: rollout.k: expected int" in proc.stderr and "Traceback" not in proc.stderr


def test_config_reference_is_current():
    """docs/config.md lists every key with its default; regenerate it with
    ``python -m aepo.train.config > docs/config.md`` after changing a config dataclass."""
    import dataclasses

    from aepo.train.config import REMOVED, TrainConfig, config_reference

    doc = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()
    assert doc == config_reference()
    defaults = TrainConfig()
    for section in dataclasses.fields(TrainConfig):
        for f in dataclasses.fields(getattr(defaults, section.name)):
            key = f"{section.name}.{f.name}"
            assert (f"`{key}`" in doc) != (key in REMOVED), key


def test_model_without_tokenizer_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"has no tokenizer \(none of tokenizer.json"):
        load_config(None, [f"model.path={tmp_path}"])


def test_vllm_context_length_reaches_the_engine(monkeypatch):
    """rollout.max_model_len: a model whose own context needs more KV cache than the share
    holds (Llama-3.1-8B: 131072) starts only with a shorter one (GPU_AUDIT 1.3)."""
    from aepo.rollout.engines import vllm as vllm_engine
    from aepo.train import rollout

    made = []
    monkeypatch.setattr(vllm_engine, "VLLMEngine", lambda path, vcfg: made.append(vcfg))
    for overrides, want in (([], None), (["rollout.max_model_len=8192"], 8192)):
        rollout.make_engine(load_config(None, overrides), "model", 1, None)
        assert made[-1].max_model_len == want


@pytest.mark.parametrize("offload", [False, True])
def test_gpu_optimizer_needs_no_jit_build(monkeypatch, offload):
    """On a GPU DeepSpeed's default FusedAdam is compiled at start-up with an nvcc matching
    torch's CUDA (GPU_AUDIT 1.7): torch's fused AdamW instead; offloaded states keep CPU Adam."""
    from aepo.train.engine import deepspeed_config

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    cfg = load_config(None, [f"deepspeed.offload_optimizer={str(offload).lower()}"])
    params = deepspeed_config(cfg, 1)["optimizer"]["params"]
    assert params["torch_adam"] is not offload and params["fused"] is not offload
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    params = deepspeed_config(cfg, 1)["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is False


def test_gpus_torch_cannot_use_are_named(tmp_path, monkeypatch):
    """GPUs present, a CUDA torch that sees none (driver older than its CUDA): a named error
    instead of training on the CPU; a CPU build, no GPU, or a working one: nothing."""
    from aepo.train.engine import unusable_gpus

    gpus = tmp_path / "gpus"
    for bus in ("0000:00:01.0", "0000:00:02.0"):
        (gpus / bus).mkdir(parents=True)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("torch.version.cuda", "13.0")
    problem = unusable_gpus(gpus)
    assert "2 NVIDIA GPU(s)" in problem and "CUDA 13.0" in problem and "driver" in problem
    assert unusable_gpus(tmp_path / "absent") is None
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert unusable_gpus(gpus) is None
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("torch.version.cuda", None)  # a CPU build: the user's choice
    assert unusable_gpus(gpus) is None


def test_hf_rollout_model_is_a_full_copy_under_zero3(tmp_path):
    """rollout.engine=hf is loaded after the trainer's HfDeepSpeedConfig: it must not be built
    partitioned under zero.Init (GPU_AUDIT 1.11), and the trainer's config stays in force."""
    pytest.importorskip("deepspeed")
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    from aepo.models import build_model, save, train_tokenizer
    from aepo.train.rollout import _hf_rollout_model

    tok = train_tokenizer(["the x of a is b", "the y of c is d"] * 8, vocab_size=120)
    path = save(build_model(tok, hidden=64, layers=1, heads=2), tok, tmp_path / "m")
    held = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_batch_size": 1})
    assert is_deepspeed_zero3_enabled()
    model = _hf_rollout_model(str(path), torch.float32)
    assert is_deepspeed_zero3_enabled() and held.is_zero3()
    assert all(p.numel() > 0 and p.dtype == torch.float32 for p in model.parameters())
    assert not any(hasattr(p, "ds_id") for p in model.parameters())  # not a ZeRO-3 parameter
    assert not model.training


@pytest.mark.parametrize("on", [False, True])
def test_gradient_checkpointing_reaches_the_model(tmp_path, monkeypatch, on):
    """train.gradient_checkpointing: activations recomputed in backward (GPU_AUDIT 1.8), set
    before DeepSpeed wraps the model."""
    deepspeed = pytest.importorskip("deepspeed")
    from aepo.models import build_model, save, train_tokenizer
    from aepo.train.engine import PolicyEngine

    class Wrapped(Exception):
        pass

    def initialize(model, **kw):
        raise Wrapped(model)

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    tok = train_tokenizer(["the x of a is b", "the y of c is d"] * 8, vocab_size=120)
    path = save(build_model(tok, hidden=64, layers=1, heads=2), tok, tmp_path / "m")
    flag = f"train.gradient_checkpointing={str(on).lower()}"
    cfg = load_config(None, [flag, "deepspeed.zero_stage=0"])
    with pytest.raises(Wrapped) as got:
        PolicyEngine(cfg, str(path), grad_accum=1)
    assert got.value.args[0].is_gradient_checkpointing is on


def test_config_file_mistakes_name_the_file_and_line(tmp_path):
    """A missing file, a folder and a YAML syntax error: one ConfigError naming the file (and
    line:column), not a traceback from deep inside yaml (issue 29 point 2, part)."""
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"is a folder: give the YAML file inside it"):
        load_config(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1e-4\n  betas: [0.9, 0.99\nrun:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+: not valid YAML"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("optim:\n  lr: 1e-4\n")  # YAML 1.1 reads 1e-4 as a string
    assert load_config(good).optim.lr == 1e-4
