"""Weight sync, trainer -> vLLM, streamed bucket by bucket.

- 2 torchrun ranks, ZeRO-3, a tied and an untied model: after an optimizer step with no sync
  the check reports vLLM serving the previous policy (from the probe taken before the update,
  whatever the tolerance: aepo/train/sync_check.py), ``Trainer.sync_weights`` leaves vLLM's
  sampled-token log-probs equal to the trainer's within 1e-4 (fp32; ``Trainer.check_sync``),
  and the trainer's own weights untouched (the streamed tensors are not copies).
- ``PolicyEngine.gathered_parameters`` yields the model's dtype, never holds more than one
  bucket gathered (2 spawned ranks, ZeRO-3 bf16), and yields the live parameters, uncopied,
  without ZeRO-3.
"""

from __future__ import annotations

import copy
import json
import os
import types
import weakref
from pathlib import Path

import pytest
import torch

from aepo.models import build_model, save, train_tokenizer
from tests.helpers import spawn_ranks, torchrun

pytest.importorskip("deepspeed")

WORKER = Path(__file__).with_name("sync_worker.py")
TEXTS = [
    f"the {a} of {b} is {c} {d}" for a in "uvwxyz" for b in "abcdef" for c in "pqr" for d in "st"
]


def _policy(module: torch.nn.Module, bucket_bytes: int):
    """A PolicyEngine around ``module`` with only what ``gathered_parameters`` reads."""
    from aepo.train.engine import PolicyEngine

    policy = PolicyEngine.__new__(PolicyEngine)
    policy.engine = types.SimpleNamespace(module=module)
    policy.bucket_bytes = bucket_bytes
    return policy


@pytest.mark.slow
def test_streaming_sync_matches_trainer(tmp_path):
    pytest.importorskip("vllm")
    tok = train_tokenizer(TEXTS, vocab_size=300)
    dirs = []
    for tied in (False, True):
        # ~9 MiB: nine buckets of deepspeed.sync_bucket_mb=1 (sync_worker.py)
        model = build_model(tok, hidden=256, layers=2, heads=4, tie_embeddings=tied)
        dirs.append(str(save(model, tok, tmp_path / f"tied{int(tied)}")))
    out = tmp_path / "out.json"
    proc = torchrun(WORKER, out, *dirs, VLLM_CPU_KVCACHE_SPACE="1")
    assert "were not loaded" not in proc.stdout + proc.stderr  # vLLM's missing-weights warning
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2
    for rows in ranks:
        assert [r["tied"] for r in rows] == [False, True]
        for r in rows:
            # a sync that did not happen: caught by the probe before the update, not by a gap
            assert "still serves the previous policy" in (r["skipped_sync"] or ""), r
            assert r["diff"] <= r["tolerance"] == 1e-4, r
            assert r["trainer_unchanged"], r
            assert r["buckets"] > 2 and r["partitioned"] > 0, r


def _bucket_worker(rank: int, port: int, out_dir: str) -> None:
    """ZeRO-3 (zero.Init, bf16) model on 2 gloo ranks; walks ``gathered_parameters``."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    deepspeed.init_distributed(dist_backend="gloo")
    tok = train_tokenizer(TEXTS, vocab_size=300)
    model = build_model(tok, hidden=64, layers=2, heads=2).to(torch.bfloat16)
    reference = copy.deepcopy(model)
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    deepspeed.zero.Init(module=model, config_dict_or_path=ds, dtype=torch.bfloat16)
    policy = _policy(model, bucket_bytes=40_000)
    buckets = [[n for n, _ in b] for b in policy._buckets()]
    bucket_of = {n: i for i, b in enumerate(buckets) for n in b}
    params, ref = dict(model.named_parameters()), dict(reference.named_parameters())
    yielded, report = [], {"buckets": len(buckets), "errors": []}
    for name, t in policy.gathered_parameters():
        gathered = {n for n, p in params.items() if p.ds_status == ZeroParamStatus.AVAILABLE}
        alive = {n for n, r in yielded if r() is not None}
        if t.dtype != torch.bfloat16 or not torch.equal(t, ref[name].detach()):
            report["errors"].append(f"{name}: {t.dtype}, or not the full parameter")
        if {bucket_of[n] for n in gathered | alive} != {bucket_of[name]}:
            report["errors"].append(f"at {name}: gathered {sorted(gathered)} alive {sorted(alive)}")
        yielded.append((name, weakref.ref(t)))
        del t
    report["names"] = [n for n, _ in yielded]
    report["expected"] = list(params)
    report["released"] = all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in params.values())
    torch.save(report, f"{out_dir}/rank{rank}.pt")
    dist.barrier()


@pytest.mark.slow
def test_gathered_parameters_hold_one_bucket(tmp_path):
    for report in spawn_ranks(_bucket_worker, 2, tmp_path):
        assert report["errors"] == []
        assert report["names"] == report["expected"] and report["buckets"] > 3
        assert report["released"]


def test_gathered_parameters_without_zero3_are_the_live_parameters():
    tok = train_tokenizer(TEXTS, vocab_size=300)
    model = build_model(tok, hidden=64, layers=2, heads=2).to(torch.bfloat16)
    got = list(_policy(model, bucket_bytes=40_000).gathered_parameters())
    params = list(model.named_parameters())
    assert [n for n, _ in got] == [n for n, _ in params]
    for (_, t), (_, p) in zip(got, params, strict=True):
        assert t.dtype == torch.bfloat16 and t.data_ptr() == p.data_ptr() and not t.requires_grad
