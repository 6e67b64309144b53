"""The hidden-state path on a CUDA GPU: the tensor-core GEMMs with fp32 results (the branch the
CPU tests replace by an upcast), the 6NHV single pass and the recompute path against float64
under the tolerance rule, the regressions other kernels shipped, rows past 65,535, and the
single pass's memory bound. Skipped cleanly without a GPU."""

from __future__ import annotations

import pytest
import torch

from aepo.kernels import (
    _gemm,
    fused_linear_policy_loss,
    linear_gemm,
    linear_logprobs_and_entropy,
    linear_single_pass,
    naive_linear_logprobs_and_entropy,
)
from aepo.objectives import policy_loss
from tests.helpers import assert_within_rule

pytestmark = pytest.mark.cuda

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
KW = {"objective": "aepo", "entropy_coef": 0.5, "entropy_stats": (2.5, 0.8)}


def _case(n, h, v, dtype, device, seed=0, scale=1.0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(1, n, h, generator=g, device=device).to(dtype)
    weight = (torch.randn(v, h, generator=g, device=device) * scale / h**0.5).to(dtype)
    labels = torch.randint(0, v, (1, n), generator=g, device=device)
    mask = (torch.rand(1, n, generator=g, device=device) > 0.2).float()
    old = -4.0 + 0.3 * torch.randn(1, n, generator=g, device=device)
    return [hidden, weight, labels, old, torch.randn(1, n, generator=g, device=device), mask]


def _stats(device):
    return tuple(torch.tensor(s, device=device) for s in KW["entropy_stats"])


def _loss_grads(case, cast, fused, temperature):
    hidden, weight, labels, old, adv, mask = case
    x = hidden.detach().to(cast).requires_grad_()
    w = weight.detach().to(cast).requires_grad_()
    kw = KW | {"entropy_stats": _stats(x.device)}
    if fused:
        loss, _ = fused_linear_policy_loss(
            x, w, labels, old, adv, mask, temperature=temperature, **kw
        )
    else:
        logp, ent = naive_linear_logprobs_and_entropy(x, w, labels, temperature)
        loss, _ = policy_loss(logp, old, adv, mask, entropy=ent, **kw)
    return (loss, *torch.autograd.grad(loss, (x, w)))


def _check(case, temperature):
    dtype = case[1].dtype
    ours = _loss_grads(case, dtype, True, temperature)
    plain = _loss_grads(case, dtype, False, temperature)
    ref = _loss_grads(case, torch.float64, False, temperature)
    for name, o, p, r, od in zip(
        ("loss", "dx", "dw"), ours, plain, ref, (torch.float32, dtype, dtype), strict=True
    ):
        assert_within_rule(name, o, p, r, od)


def _spy_blocks(monkeypatch) -> list:
    seen, real = [], linear_gemm.loss_block
    monkeypatch.setattr(
        linear_gemm, "loss_block", lambda z, *a: seen.append(z.shape) or real(z, *a)
    )
    return seen


@pytest.mark.parametrize("dtype", LOW.values(), ids=LOW.keys())
def test_tensor_core_gemms(cuda, dtype):
    g = torch.Generator(device=cuda).manual_seed(0)
    a = torch.randn(300, 512, generator=g, device=cuda).to(dtype)
    b = torch.randn(512, 700, generator=g, device=cuda).to(dtype)
    exact = a.double() @ b.double()
    assert _gemm.tensor_cores(a, b)
    z = _gemm.mm_acc(a, b)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.double(), exact, rtol=0, atol=1e-4 * exact.abs().max().item())
    padded = torch.full((300, 716), float("nan"), device=cuda)
    _gemm.mm_acc(a, b, out=padded[:, :700])  # a padded row stride, as the backward slices use
    torch.testing.assert_close(padded[:, :700], z, rtol=0, atol=0)
    assert padded[:, 700:].isnan().all()
    ptr = z.data_ptr()
    _gemm.addmm_acc_(z, a, b)  # fp32 accumulator, in place
    assert z.data_ptr() == ptr
    torch.testing.assert_close(z.double(), 2 * exact, rtol=0, atol=2e-4 * exact.abs().max().item())


@pytest.mark.parametrize("dtype", LOW.values(), ids=LOW.keys())
def test_accumulating_gemm_before_torch_2_10(cuda, dtype, monkeypatch):
    """torch 2.8 / 2.9 refuse addmm with an fp32 self and 16-bit operands: the fallback adds
    an fp32 product instead, the same sums (GPU_AUDIT 1.9)."""
    g = torch.Generator(device=cuda).manual_seed(1)
    a = torch.randn(64, 256, generator=g, device=cuda).to(dtype)
    b = torch.randn(256, 96, generator=g, device=cuda).to(dtype)
    fused, fallback = _gemm.mm_acc(a, b), _gemm.mm_acc(a, b)
    _gemm.addmm_acc_(fused, a, b)
    monkeypatch.setattr(_gemm, "_has_fp32_accumulator_addmm", lambda: False)
    _gemm.addmm_acc_(fallback, a, b)
    exact = 2 * (a.double() @ b.double())
    for z in (fused, fallback):
        torch.testing.assert_close(z.double(), exact, rtol=0, atol=2e-4 * exact.abs().max().item())


@pytest.mark.parametrize("dtype", LOW.values(), ids=LOW.keys())
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_single_pass_within_rule(cuda, monkeypatch, dtype, temperature):
    """Several row blocks (fp32 dW accumulator), the auto backend, V=32000."""
    monkeypatch.setattr(linear_gemm, "LOSS_BUFFER_BYTES", 64 << 20)  # ~350 rows a block
    blocks = _spy_blocks(monkeypatch)
    _check(_case(1500, 512, 32000, dtype, cuda, scale=4.0), temperature)
    assert len(blocks) >= 3


def test_single_pass_peaked_weight_large_vocab(cuda, monkeypatch):
    monkeypatch.setattr(linear_gemm, "LOSS_BUFFER_BYTES", 64 << 20)
    v, h = 152064, 64
    case = _case(200, h, v, torch.bfloat16, cuda, seed=4)
    weight = torch.zeros(v, h, device=cuda)
    weight[:, 0], weight[0, 0] = -15.0, 3.0
    hidden = 0.05 * torch.randn(1, 200, h, device=cuda)
    hidden[..., 0] = 1.0
    case[0], case[1] = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
    case[2][0, :4] = torch.tensor([0, 1, 151000, 152063], device=cuda)
    _check(case, 1.0)


@pytest.mark.parametrize("dtype", LOW.values(), ids=LOW.keys())
def test_single_pass_all_negative_logits_low_temperature(cuda, dtype):
    case = _case(300, 64, 4000, torch.float32, cuda, seed=3)
    case[0] = (case[0].abs() + 0.5).to(dtype)
    case[1] = -(case[1].abs() + 40.0 / 64).to(dtype)
    _check(case, 0.3)


@pytest.mark.parametrize("dtype", LOW.values(), ids=LOW.keys())
def test_recompute_path_within_rule(cuda, monkeypatch, dtype):
    """linear_logprobs_and_entropy's own backward: vocabulary slices, fp32 dX accumulator."""
    monkeypatch.setattr(linear_gemm, "WORKSPACE_BYTES", 32 << 20)  # several slices and blocks
    hidden, weight, labels, *_ = _case(1000, 256, 50000, dtype, cuda, scale=4.0)
    labels = labels.view(-1)
    hidden = hidden.view(-1, 256)
    g = torch.Generator(device=cuda).manual_seed(1)
    g_lp, g_h = (torch.randn(1000, generator=g, device=cuda) for _ in range(2))

    def run(fn, cast):
        x = hidden.to(cast).requires_grad_()
        w = weight.to(cast).requires_grad_()
        logp, ent = fn(x, w, labels, temperature=0.8)
        loss = (logp * g_lp.to(logp.dtype) + ent * g_h.to(ent.dtype)).sum()
        return (logp, ent, *torch.autograd.grad(loss, (x, w)))

    ours = run(linear_logprobs_and_entropy, dtype)
    plain = run(naive_linear_logprobs_and_entropy, dtype)
    ref = run(naive_linear_logprobs_and_entropy, torch.float64)
    outs = (torch.float32, torch.float32, dtype, dtype)
    for name, o, p, r, od in zip(
        ("logp", "entropy", "dx", "dw"), ours, plain, ref, outs, strict=True
    ):
        assert_within_rule(name, o, p, r, od)


def test_more_than_65535_rows(cuda):
    n, h, v = 70_000, 64, 512
    g = torch.Generator(device=cuda).manual_seed(0)
    hidden = torch.randn(n, h, generator=g, device=cuda).to(torch.bfloat16)
    weight = torch.randn(v, h, generator=g, device=cuda).to(torch.bfloat16) / 8
    labels = torch.randint(0, v, (n,), generator=g, device=cuda)
    logp, ent = linear_logprobs_and_entropy(hidden, weight, labels)
    tail = slice(n - 50, n)
    ref_lp, ref_h = naive_linear_logprobs_and_entropy(
        hidden[tail].double(), weight.double(), labels[tail]
    )
    torch.testing.assert_close(logp[tail].double(), ref_lp, rtol=0, atol=1e-4)
    torch.testing.assert_close(ent[tail].double(), ref_h, rtol=0, atol=1e-4)


def test_single_pass_memory_bound(cuda, monkeypatch):
    """Peak extra memory of loss + backward: the block's buffers, the fp32 dW accumulator and
    its cast, the outputs; nothing of size N x V."""
    budget = 256 << 20
    monkeypatch.setattr(linear_gemm, "LOSS_BUFFER_BYTES", budget)
    n, h, v = 16384, 1024, 32000
    case = _case(n, h, v, torch.bfloat16, cuda)
    case[5] = torch.ones_like(case[5])
    x, w = case[0].detach().requires_grad_(), case[1].detach().requires_grad_()
    stats = _stats(cuda)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, _ = fused_linear_policy_loss(x, w, *case[2:], **KW | {"entropy_stats": stats})
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    blocks = -(-n // linear_single_pass.loss_rows(n, v, torch.bfloat16, linear_gemm))
    assert blocks > 1
    outputs = 2 * (x.numel() + w.numel())  # d hidden, d weight (bf16)
    bound = budget + 4 * v * h + 2 * v * h + outputs + (32 << 20)  # + [N] vectors, cuBLAS
    assert peak <= bound, (peak / 2**20, bound / 2**20)
    assert peak < 2 * n * v  # less than the bf16 logits alone
