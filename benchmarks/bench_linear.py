"""Hidden-state benchmark suite (pytest runs it): the AEPO policy loss from hidden states x
lm_head weight, with peers.

One op, ``loss``: forward + backward of the policy loss to d hidden and d weight. Impls, in the
order they run (ours first): ``aepo-linear`` (``fused_linear_policy_loss``: logits never
materialised, gradients formed in the forward (6NHV); backend auto: torch on CPU, on CUDA
cuBLAS GEMMs + the Triton row kernels), ``aepo-linear-2pass`` (the same with the
entropy-aware advantage's statistics taken inside the loss, which forces the recompute path,
8NHV), ``matmul+fused`` (the matmul, then our
logits kernels with the gradient written into the logits), ``naive`` (matmul + log_softmax +
gather + softmax entropy + loss, autograd), ``trl-chunked`` (TRL 1.16's
``ChunkedLogProbFunction``: logp and entropy on chunked GEMMs of 4096 tokens x 32768 vocabulary
entries, as TRL's trainer calls it, recomputed in the backward; the AEPO loss in eager torch on
its outputs) and ``liger`` (Liger-Kernel's chunked ``LigerFusedLinearGRPOLoss``: the clipped
GRPO loss without the entropy bonus, the entropy-aware advantage or the dual clip, so it
computes less; chunks of one sequence). Every other AEPO variant gets precomputed mini-batch
entropy statistics, as ``aepo train`` passes them (their values do not change the cost).

Each row (``--rows``, JSON lines, written as measured): device and host time
(``timing.measure``), FLOPs counted as 8 N H V for every variant (forward matmul, and the
backward's recompute, dX and dW), the rate on that count, and the peak extra memory of one warm
round above its inputs **excluding** the d hidden and d weight outputs (measured in a fresh
process per variant on CPU). On CUDA our two rows also carry the FLOP / byte model of the path
they run (:func:`aepo.kernels.linear_single_pass.cost_model`; ``linear_gemm.cost_forward`` +
``cost_backward``) and the time it predicts at the ceilings measured on that GPU
(``device_ceilings`` in benchmarks/conftest.py: an 8192^3 bf16 GEMM, a device copy;
:func:`aepo.kernels._cost.roofline_ms`), with ``model_ratio`` = measured / predicted, and the
model's kernel list says where a gap comes from.

    pytest benchmarks/bench_linear.py --rows out.jsonl                       # CPU defaults
    pytest benchmarks/bench_linear.py --device cuda --n 16384 --hidden 5120 --vocab 151936
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from aepo.kernels import (
    _cost,
    fused_linear_policy_loss,
    fused_policy_loss,
    linear_gemm,
    linear_single_pass,
    naive_linear_logprobs_and_entropy,
)
from aepo.objectives import policy_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers
import timing
from bench_kernels import DTYPES, _rss_kib, device_name

IMPLS = ("aepo-linear", "aepo-linear-2pass", "matmul+fused", "naive", "trl-chunked", "liger")
TRL_CHUNK = 32768  # the vocabulary chunk TRL's trainer passes (_CHUNKED_LOGPROB_CHUNK_SIZE)
ENTROPY_STATS = (torch.tensor(3.0), torch.tensor(1.0))  # (mean, std) of the mini-batch
LOSS_KW = {"objective": "aepo", "entropy_coef": 0.01}
COMPUTES = {
    "naive": "AEPO loss with entropy bonus; autograd over the [N, V] logits and temporaries",
    "matmul+fused": "the same; [N, V] logits written, gradient written into them",
    "aepo-linear": "the same; logits never materialised, gradients in the forward (6NHV)",
    "aepo-linear-2pass": "the same, entropy statistics inside the loss: recomputed in the "
    "backward (8NHV)",
    "trl-chunked": "logp + entropy on chunked GEMMs, recomputed in the backward (8NHV); "
    "the AEPO loss in eager torch on its outputs",
    "liger": "clipped GRPO loss only (no entropy, no entropy-aware advantage, no dual clip)",
}


@dataclass
class Case:
    hidden: torch.Tensor  # [B, T, H]
    weight: torch.Tensor  # [V, H]
    labels: torch.Tensor  # [B, T]
    old_logp: torch.Tensor  # [B, T] fp32
    seq_adv: torch.Tensor  # [B]
    mask: torch.Tensor  # [B, T]

    @property
    def advantages(self) -> torch.Tensor:
        return self.seq_adv[:, None].expand_as(self.mask)


def make_case(n: int, h: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0) -> Case:
    t = min(n, 1024)
    b = n // t
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=gen, device=device).to(dtype)
    weight = (torch.randn(vocab, h, generator=gen, device=device) * 2 / h**0.5).to(dtype)
    labels = torch.randint(0, vocab, (b, t), generator=gen, device=device)
    old = -2 + 0.3 * torch.randn(b, t, generator=gen, device=device)
    adv = torch.randn(b, generator=gen, device=device)
    return Case(hidden, weight, labels, old, adv, torch.ones(b, t, device=device))


@functools.cache
def _liger():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    kw = {"epsilon_low": 0.2, "epsilon_high": 0.28, "chunk_size": 1}
    return LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo", **kw)


def loss(impl: str, x: torch.Tensor, w: torch.Tensor, case: Case) -> torch.Tensor:
    args = (case.labels, case.old_logp, case.advantages, case.mask)
    stats = tuple(t.to(x.device) for t in ENTROPY_STATS)
    kw = LOSS_KW | {"entropy_stats": None if impl == "aepo-linear-2pass" else stats}
    backend = "auto"  # torch on CPU; on CUDA cuBLAS GEMMs + the Triton row kernels
    if impl == "naive":
        logp, ent = naive_linear_logprobs_and_entropy(x, w, case.labels)
        return policy_loss(logp, *args[1:], entropy=ent, **kw)[0]
    if impl == "matmul+fused":
        return fused_policy_loss(x @ w.T, *args, backend=backend, inplace_grad=True, **kw)[0]
    if impl == "trl-chunked":
        fn = peers.trl_kernel("chunked_logprob").ChunkedLogProbFunction.apply
        h = x.reshape(-1, x.shape[-1])
        out = fn(h, w, None, case.labels.reshape(-1), 1.0, TRL_CHUNK, None, 1.0, ("entropy",))
        logp, ent = (t.view(case.labels.shape) for t in out[:2])
        return policy_loss(logp, *args[1:], entropy=ent, **kw)[0]
    if impl == "liger":
        old = case.old_logp
        out = _liger()(x, w, case.labels, case.mask, case.seq_adv, old_per_token_logps=old)
        return out[0] if isinstance(out, tuple) else out
    return fused_linear_policy_loss(x, w, *args, backend=backend, **kw)[0]


def rounds(impl: str, case: Case):
    """(setup, run) of one round, for ``timing.measure``."""

    def setup():
        return case.hidden.detach().requires_grad_(), case.weight.detach().requires_grad_()

    return setup, lambda x, w: torch.autograd.grad(loss(impl, x, w, case), (x, w))


def skip_reason(impl: str, device: str) -> str | None:
    if impl in ("trl-chunked", "liger"):
        return peers.missing(impl)
    return None


def _output_bytes(case: Case) -> int:
    return case.hidden.numel() * case.hidden.element_size() + case.weight.numel() * (
        case.weight.element_size()
    )


def peak_extra_bytes(impl: str, case: Case) -> int:
    """CUDA: peak of one (warm) round above its inputs, minus the d hidden and d weight
    outputs."""
    setup, run = rounds(impl, case)
    args = setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run(*args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base - _output_bytes(case)


def cpu_peak(impl: str, n: int, h: int, vocab: int, dtype: str) -> int:
    cmd = [sys.executable, __file__, "--peak", impl, str(n), str(h), str(vocab), dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_extra_bytes"]


def _cpu_peak_child(impl: str, n: int, h: int, vocab: int, dtype: str) -> None:
    small = make_case(4, 8, 64, DTYPES[dtype], "cpu")
    setup, run = rounds(impl, small)
    run(*setup())
    case = make_case(n, h, vocab, DTYPES[dtype], "cpu")
    setup, run = rounds(impl, case)
    args = setup()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    base = _rss_kib("VmRSS")
    run(*args)
    peak = (_rss_kib("VmHWM") - base) * 1024 - _output_bytes(case)
    print(json.dumps({"peak_extra_bytes": peak}))


def model_fields(impl: str, n: int, h: int, vocab: int, dtype: torch.dtype, device: dict) -> dict:
    """Our paths' FLOP / byte model and its predicted time at ``device``'s measured ceilings
    (``device_ceilings``: GEMM FLOP/s, copy bytes/s; CUDA paths: the triton backend); {} for
    the peers."""
    if impl == "aepo-linear":
        parts = [linear_single_pass.cost_model(n, h, vocab, dtype)]
    elif impl == "aepo-linear-2pass":
        parts = [
            f(n, h, vocab, dtype) for f in (linear_gemm.cost_forward, linear_gemm.cost_backward)
        ]
    else:
        return {}
    tflops, tbps = device["gemm_flops_per_s"] / 1e12, device["bytes_per_s"] / 1e12
    return {
        "model_flops": sum(p["flops"] for p in parts),
        "model_bytes": sum(p["bytes"] for p in parts),
        "model_ms": sum(_cost.roofline_ms(p, tflops, tbps) for p in parts),
        "model_tflops": tflops,
        "model_tbps": tbps,
        "model_kernels": [k for p in parts for k in p["kernels"]],
    }


@functools.lru_cache(maxsize=1)  # one case alive at a time
def _case(n: int, h: int, vocab: int, dtype: str, device: str) -> Case:
    return make_case(n, h, vocab, DTYPES[dtype], device)


@pytest.fixture(scope="session")
def hidden_size(request) -> int:
    opt = request.config.getoption
    return opt("--hidden") or (5120 if opt("--device") == "cuda" else 1024)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_loss(bench_cfg, hidden_size, device_ceilings, record_row, vocab, impl):
    reason = skip_reason(impl, bench_cfg.device)
    if reason:
        pytest.skip(reason)
    cfg, h = bench_cfg, hidden_size
    case = _case(cfg.n, h, vocab, cfg.dtype, cfg.device)
    t = timing.measure(*rounds(impl, case), cfg.device, cfg.rounds, warmup=1)
    if cfg.device == "cuda":  # after the warm-up
        peak = peak_extra_bytes(impl, case)
    else:
        peak = cpu_peak(impl, cfg.n, h, vocab, cfg.dtype)
    flops = 8 * cfg.n * h * vocab
    row = {"suite": "linear", "impl": impl, "op": "loss", "computes": COMPUTES[impl]}
    row |= {"n": cfg.n, "hidden": h, "vocab": vocab, "dtype": cfg.dtype, "device": cfg.device}
    row |= {"flops": flops, "peak_extra_bytes": peak, "device_name": device_name(cfg.device)}
    row |= {**t.as_dict(), "tflops": flops / t.device_ms / 1e9}
    if device_ceilings:  # the model at the ceilings measured on this GPU
        row |= model_fields(impl, cfg.n, h, vocab, DTYPES[cfg.dtype], device_ceilings)
    if "model_ms" in row:
        row["model_ratio"] = t.device_ms / row["model_ms"]
    record_row(row)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peak"]:
        impl, n, h, vocab, dtype = sys.argv[2:7]
        _cpu_peak_child(impl, int(n), int(h), int(vocab), dtype)
