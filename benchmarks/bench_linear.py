"""pytest-benchmark suite: the AEPO policy loss from hidden states x lm_head weight, with peers.

One op, ``loss``: forward + backward of the policy loss to d hidden and d weight. Impls:
``naive`` (matmul + log_softmax + gather + softmax entropy + loss, autograd), ``matmul+fused``
(the matmul, then our logits kernels with the gradient written into the logits), ``aepo-linear``
(``fused_linear_policy_loss``: logits never materialised; torch backend on CPU, triton on CUDA),
``aepo-linear-2pass`` (the same with the entropy-aware advantage's statistics taken inside the
loss, which forces the recompute path; CPU only: on CUDA it is the path ``aepo-linear`` takes)
and ``liger`` (Liger-Kernel's chunked ``LigerFusedLinearGRPOLoss``: the clipped GRPO loss
without the entropy bonus, the entropy-aware advantage or the dual clip, so it computes less;
chunks of one sequence). Every other AEPO variant gets precomputed mini-batch entropy
statistics, as ``aepo train`` passes them (their values do not change the cost).
``extra_info``: FLOPs counted as 8 N H V (forward matmul, and the backward's recompute, dX and
dW), the achieved rate, and the peak extra memory of the timed round above its inputs
**excluding** the d hidden and d weight outputs (measured in a fresh process per variant on CPU).

    pytest benchmarks/bench_linear.py --benchmark-json out.json             # CPU defaults
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
    fused_linear_policy_loss,
    fused_policy_loss,
    naive_linear_logprobs_and_entropy,
)
from aepo.objectives import policy_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import DTYPES, _rss_kib, device_name

IMPLS = ("naive", "matmul+fused", "aepo-linear", "aepo-linear-2pass", "liger")
ENTROPY_STATS = (torch.tensor(3.0), torch.tensor(1.0))  # (mean, std) of the mini-batch
LOSS_KW = {"objective": "aepo", "entropy_coef": 0.01}
COMPUTES = {
    "naive": "AEPO loss with entropy bonus; autograd over the [N, V] logits and temporaries",
    "matmul+fused": "the same; [N, V] logits written, gradient written into them",
    "aepo-linear": "the same; logits never materialised (CPU: gradients in the forward, "
    "6NHV; CUDA: recomputed in the backward)",
    "aepo-linear-2pass": "the same, entropy statistics inside the loss: recomputed in the "
    "backward (8NHV)",
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
    backend = "triton" if x.is_cuda else "torch"
    if impl == "naive":
        logp, ent = naive_linear_logprobs_and_entropy(x, w, case.labels)
        return policy_loss(logp, *args[1:], entropy=ent, **kw)[0]
    if impl == "matmul+fused":
        return fused_policy_loss(x @ w.T, *args, backend=backend, inplace_grad=True, **kw)[0]
    if impl == "liger":
        old = case.old_logp
        out = _liger()(x, w, case.labels, case.mask, case.seq_adv, old_per_token_logps=old)
        return out[0] if isinstance(out, tuple) else out
    return fused_linear_policy_loss(x, w, *args, backend=backend, **kw)[0]


def rounds(impl: str, case: Case, sync):
    def setup():
        x = case.hidden.detach().requires_grad_()
        w = case.weight.detach().requires_grad_()
        return (x, w), {}

    def run(x, w):
        grads = torch.autograd.grad(loss(impl, x, w, case), (x, w))
        sync()
        return grads

    return setup, run


def skip_reason(impl: str, device: str) -> str | None:
    if impl == "aepo-linear-2pass" and device == "cuda":
        return "on CUDA aepo-linear already runs the recompute path"
    if impl == "liger":
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except ImportError:
            return "Liger-Kernel is not importable here"
    return None


def _output_bytes(case: Case) -> int:
    return case.hidden.numel() * case.hidden.element_size() + case.weight.numel() * (
        case.weight.element_size()
    )


def peak_extra_bytes(impl: str, case: Case) -> int:
    """CUDA: peak of one round above its inputs, minus the d hidden and d weight outputs."""
    setup, run = rounds(impl, case, torch.cuda.synchronize)
    args, _ = setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run(*args)
    return torch.cuda.max_memory_allocated() - base - _output_bytes(case)


def cpu_peak(impl: str, n: int, h: int, vocab: int, dtype: str) -> int:
    cmd = [sys.executable, __file__, "--peak", impl, str(n), str(h), str(vocab), dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_extra_bytes"]


def _cpu_peak_child(impl: str, n: int, h: int, vocab: int, dtype: str) -> None:
    small = make_case(4, 8, 64, DTYPES[dtype], "cpu")
    setup, run = rounds(impl, small, lambda: None)
    run(*setup()[0])
    case = make_case(n, h, vocab, DTYPES[dtype], "cpu")
    setup, run = rounds(impl, case, lambda: None)
    args, _ = setup()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    base = _rss_kib("VmRSS")
    run(*args)
    peak = (_rss_kib("VmHWM") - base) * 1024 - _output_bytes(case)
    print(json.dumps({"peak_extra_bytes": peak}))


@pytest.fixture(scope="session")
def hidden_size(request) -> int:
    opt = request.config.getoption
    return opt("--hidden") or (5120 if opt("--device") == "cuda" else 1024)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_loss(benchmark, bench_cfg, hidden_size, vocab, impl):
    reason = skip_reason(impl, bench_cfg.device)
    if reason:
        pytest.skip(reason)
    cfg, h = bench_cfg, hidden_size
    case = make_case(cfg.n, h, vocab, DTYPES[cfg.dtype], cfg.device)
    cuda = cfg.device == "cuda"
    peak = peak_extra_bytes(impl, case) if cuda else cpu_peak(impl, cfg.n, h, vocab, cfg.dtype)
    setup, run = rounds(impl, case, torch.cuda.synchronize if cuda else (lambda: None))
    benchmark.pedantic(run, setup=setup, rounds=cfg.rounds, warmup_rounds=1)
    flops = 8 * cfg.n * h * vocab
    info = {"impl": impl, "op": "loss", "computes": COMPUTES[impl], "n": cfg.n, "hidden": h}
    info |= {"vocab": vocab, "dtype": cfg.dtype, "device": cfg.device, "flops": flops}
    info |= {"peak_extra_bytes": peak, "device_name": device_name(cfg.device)}
    info["tflops"] = flops / benchmark.stats.stats.median / 1e12
    benchmark.extra_info.update(info)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peak"]:
        impl, n, h, vocab, dtype = sys.argv[2:7]
        _cpu_peak_child(impl, int(n), int(h), int(vocab), dtype)
