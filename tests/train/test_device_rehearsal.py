"""The trainer's update path with the model on a "GPU" and the batch on the host, rehearsed on
the CPU (tests/nominal_device.py, tests/train/rehearsal_worker.py): old log-prob / entropy
recompute, a mini-batch's loss, backward and step, and a skipped non-finite mini-batch, on both
lm heads, both packings and both entropy normalisations. Each must run where CUDA would (no host
tensor meeting a GPU one) and give the all-CPU run's numbers.

Not rehearsed: DeepSpeed's and vLLM's own internals on CUDA (ZeRO-3 partitioning, nccl, the
fused optimizer, vLLM's GPU kernels), and code that branches on ``is_cuda`` (the nominal device
is not ``cuda``: a CPU-only torch has no CUDA device guard, see tests/nominal_device.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aepo.models import build_model, save, train_tokenizer
from tests.helpers import EPS32, assert_close_scaled, scale_of, torchrun

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("rehearsal_worker.py")
TEXTS = [f"the {a} of {b} is {c}" for a in "xyz" for b in "abc" for c in ("p", "q", "r s")]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    tok = train_tokenizer(TEXTS * 4, vocab_size=300)
    model = build_model(tok, hidden=64, layers=2, heads=2, tie_embeddings=False)
    with torch.no_grad():  # entropies spread like a trained model's (see test_fused_head)
        model.model.norm.weight.mul_(10.0)
    root = tmp_path_factory.mktemp("rehearsal")
    path = save(model, tok, root / "tiny")
    torchrun(WORKER, path, root / "out.pt", ranks=1, timeout=900)
    return torch.load(root / "out.pt", weights_only=False)


def test_update_path_runs_on_the_gpu_as_on_the_cpu(results):
    assert len(results) == 8
    errors = {case: r["error"] for case, r in results.items() if "error" in r}
    assert not errors, errors
    for case, r in results.items():
        cpu, gpu = r["cpu"], r["gpu"]
        assert gpu["devices"] == {"gpu:0"}, case
        # The same CPU arithmetic, but a subclass sees composite ops (linear, attention)
        # decomposed, so sums may run in another order: a few ulps of what they sum.
        scale = scale_of(cpu["old_logp"])  # the logits' size
        for key in ("old_logp", "entropy"):
            assert_close_scaled(gpu[key], cpu[key], 8 * EPS32, scale=scale, msg=f"{case} {key}")
        for key, want in cpu["metrics"].items():  # the loss terms and fractions are <= ~1
            assert abs(gpu["metrics"][key] - want) <= 1e-5 * max(1.0, abs(want)), (case, key)
        assert cpu["skipped"] == gpu["skipped"] == 1, case  # the NaN mini-batch only
        assert gpu["nan_metrics"]["skipped"] == 1.0, case
        assert set(gpu["grads"]) == set(cpu["grads"]) and len(cpu["grads"]) > 10
        for name, want in cpu["grads"].items():  # as test_fused_head: 1e-5 of the largest
            assert want.abs().max() > 0, (case, name)
            assert_close_scaled(gpu["grads"][name], want, 1e-5, msg=f"{case} grad {name}")
