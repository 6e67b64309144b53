"""The 6NHV single pass of fused_linear_policy_loss for bf16 weights on both backends
(triton: the CUDA code path with the GEMMs' out_dtype branch replaced by an exact upcast, the
row kernels through the interpreter) against float64 under the tolerance rule, with the
regressions other fused-linear kernels shipped; the blocks it chooses and its dW accumulator;
backend="auto"; the GEMM helpers on CPU; the FLOP / byte models."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from aepo.kernels import (
    _cost,
    _gemm,
    _launch,
    fused_linear_policy_loss,
    linear,
    linear_gemm,
    linear_single_pass,
    linear_torch,
    naive_linear_logprobs_and_entropy,
    resolve_backend,
)
from aepo.objectives import policy_loss
from tests.helpers import assert_within_rule

BACKENDS = ("torch", "triton")
# fp16 takes the recompute path (test_fp16_takes_the_recompute_path_for_loss_scaling)
LOW = {"bf16": torch.bfloat16}
STATS = (torch.tensor(2.5), torch.tensor(0.8))
KW = {"objective": "aepo", "entropy_coef": 0.5, "entropy_stats": STATS}  # H matters
MODULES = {"torch": linear_torch, "triton": linear_gemm}


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    """Blocks of at most 16 rows on both backends at test sizes (several per test)."""
    monkeypatch.setattr(linear_torch, "LOSS_BUFFER_BYTES", 4096)
    monkeypatch.setattr(linear_gemm, "LOSS_BUFFER_BYTES", 4096)


def _case(n, h, v, dtype, seed=0, scale=0.5):
    """(hidden [1, n, H], weight [V, H], labels, old_logp, advantages, mask) with masked rows."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * scale).to(dtype)
    labels = torch.randint(0, v, (1, n), generator=g)
    mask = (torch.rand(1, n, generator=g) > 0.2).float()
    old_logp = -4.0 + 0.3 * torch.randn(1, n, generator=g)
    return hidden, weight, labels, old_logp, torch.randn(1, n, generator=g), mask


class _Spy:
    """Records the single pass's calls, its blocks (z, dz) and its dW accumulator."""

    def __init__(self, monkeypatch, impl):
        self.passes, self.blocks, self.totals = [], [], []
        real_pass, real_block = linear_single_pass.linear_loss_single_pass, impl.loss_block
        real_result = linear_single_pass._DwSum.result

        def run_pass(*a):
            out = real_pass(*a)
            self.passes.append(out)
            return out

        def block(z, *a):
            shape, dtype = tuple(z.shape), z.dtype
            out = real_block(z, *a)
            self.blocks.append((shape, dtype, out[2].dtype))
            return out

        def result(acc):
            self.totals.append((tuple(acc.total.shape), acc.total.dtype))
            return real_result(acc)

        monkeypatch.setattr(linear_single_pass, "linear_loss_single_pass", run_pass)
        monkeypatch.setattr(impl, "loss_block", block)
        monkeypatch.setattr(linear_single_pass._DwSum, "result", result)


def _loss_and_grads(case, cast, loss_fn):
    """(loss, d hidden, d weight) of ``loss_fn(x, w, labels, old, adv, mask)`` on the case's
    hidden and weight cast to ``cast``."""
    hidden, weight, *rest = case
    x = hidden.detach().to(cast).requires_grad_()
    w = weight.detach().to(cast).requires_grad_()
    loss = loss_fn(x, w, *rest)
    return (loss, *torch.autograd.grad(loss, (x, w)))


def _plain(temperature):
    def loss_fn(x, w, labels, old, adv, mask):
        logp, ent = naive_linear_logprobs_and_entropy(x, w, labels, temperature)
        return policy_loss(logp, old, adv, mask, entropy=ent, **KW)[0]

    return loss_fn


def _ours(backend, temperature):
    def loss_fn(x, w, *rest):
        out = fused_linear_policy_loss(x, w, *rest, temperature=temperature, backend=backend, **KW)
        return out[0]

    return loss_fn


def _check_rule(case, backend, temperature):
    """Ours (single pass) vs plain torch in the weight's dtype vs float64; returns the spy."""
    dtype = case[1].dtype
    ours = _loss_and_grads(case, dtype, _ours(backend, temperature))
    plain = _loss_and_grads(case, dtype, _plain(temperature))
    ref = _loss_and_grads(case, torch.float64, _plain(temperature))
    outs = (torch.float32, dtype, dtype)
    for name, o, p, r, od in zip(("loss", "dx", "dw"), ours, plain, ref, outs, strict=True):
        assert o.dtype == od, name
        assert_within_rule(name, o, p, r, od)
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW.values(), ids=LOW.keys())
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_single_pass_16bit_within_rule(monkeypatch, backend, dtype, temperature):
    spy = _Spy(monkeypatch, MODULES[backend])
    case = _case(45, 24, 300, dtype, scale=0.6)
    _check_rule(case, backend, temperature)
    assert len(spy.passes) == 1 and len(spy.blocks) == 3  # ~36 kept rows, <= 16 a block
    assert all(z == torch.float32 and dz == dtype for _, z, dz in spy.blocks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_pass_peaked_weight_large_vocab(monkeypatch, backend):
    """verl's out-of-bounds vocabulary bug on the single pass: a peaked bf16 weight at
    V=152064 (not a multiple of any block), two row blocks."""
    spy = _Spy(monkeypatch, MODULES[backend])
    v, h = 152064, 16
    case = list(_case(24, h, v, torch.bfloat16, seed=4))
    weight = torch.zeros(v, h)
    weight[:, 0], weight[0, 0] = -15.0, 3.0
    hidden = torch.zeros(1, 24, h)
    hidden[..., 0] = 1.0
    hidden[..., 1:] = 0.1 * torch.randn(1, 24, h - 1, generator=torch.Generator().manual_seed(1))
    case[0], case[1] = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
    case[2][0, :4] = torch.tensor([0, 1, 151000, 152063])
    case[5][0, :4] = 1.0
    _check_rule(case, backend, 1.0)
    assert len(spy.blocks) == 2
    logp = spy.passes[0][0]
    keep = case[5].view(-1).nonzero().squeeze(1)
    ref, _ = naive_linear_logprobs_and_entropy(
        case[0].double().view(-1, h)[keep], case[1].double(), case[2].view(-1)[keep]
    )
    # one padded column adding e^0 would move logp by log(1 + e^-3 / s) ~ 0.05
    assert (logp.double() - ref).abs().max() < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW.values(), ids=LOW.keys())
def test_single_pass_all_negative_logits_low_temperature(backend, dtype):
    """Every logit <= -40 at T=0.3: a merged max starting at 0 underflows to NaN."""
    case = list(_case(30, 32, 300, torch.float32, seed=3))
    case[0] = (case[0].abs() + 0.5).to(dtype)
    case[1] = -(case[1].abs() + 40.0 / 32).to(dtype)
    _check_rule(case, backend, 0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("n", [12, 100])
def test_single_pass_blocks_and_dw_accumulator(monkeypatch, backend, dtype, n):
    """Blocks within the budget, of balanced size (the last short by less than the block
    count), z fp32 and dz in the weight's dtype; dW summed in fp32 [V, H] when there is more
    than one block, written once in the weight's dtype when one block holds every row (no
    V x H fp32 buffer)."""
    impl = MODULES[backend]
    spy = _Spy(monkeypatch, impl)
    v, h = 300, 8
    case = _case(n, h, v, dtype)
    _loss_and_grads(case, dtype, _ours(backend, 1.0))
    kept = int(case[5].sum())
    rows = [shape[0] for shape, _, _ in spy.blocks]
    per_row = impl.loss_block_bytes(torch.float32, dtype) * v
    cap = max(16, impl.LOSS_BUFFER_BYTES // per_row)
    assert sum(rows) == kept and len(rows) == -(-kept // cap)
    assert max(rows) <= cap and set(rows[:-1]) <= {rows[0]} and rows[-1] > rows[0] - len(rows)
    assert all(shape[1] == v and dz == dtype for shape, _, dz in spy.blocks)
    acc = torch.float32 if len(rows) > 1 or dtype == torch.float32 else dtype
    assert spy.totals == [((v, h), acc)]


def test_single_pass_budget_is_what_the_blocks_use(monkeypatch):
    """The row choice itself: buffers of one block within the budget, at least 16 rows."""
    monkeypatch.undo()  # the shipped budgets
    vocab = 152064
    for impl, dtype in ((linear_gemm, torch.bfloat16), (linear_torch, torch.float32)):
        rows = linear_single_pass.loss_rows(100_000, vocab, dtype, impl)
        per_row = impl.loss_block_bytes(torch.float32, dtype) * vocab
        assert rows >= 16 and rows * per_row <= impl.LOSS_BUFFER_BYTES + per_row
    assert linear_single_pass.loss_rows(5, vocab, torch.bfloat16, linear_gemm) == 5


def test_auto_backend(monkeypatch):
    """auto: the torch path on CPU (without the interpreter), the cuBLAS + row-kernel path
    (linear_gemm) on CUDA; the name "triton" is that path."""
    monkeypatch.setattr(_launch, "INTERPRET", False)
    cpu = torch.zeros(2, 8)
    assert resolve_backend("auto", cpu) == "torch"
    with FakeTensorMode():
        gpu = torch.zeros(2, 8, device="cuda", dtype=torch.bfloat16)
    assert linear._backend_module(resolve_backend("auto", gpu)) is linear_gemm
    assert linear._backend_module("triton") is linear_gemm
    spy = _Spy(monkeypatch, linear_torch)
    _loss_and_grads(_case(10, 8, 50, torch.bfloat16), torch.bfloat16, _ours("auto", 1.0))
    assert spy.blocks


def test_triton_backend_launches_the_row_kernels_on_fp32_logits():
    """What the CUDA path launches: the logits kernels on fp32 [rows, V] blocks, dz written in
    the weight's dtype (the variants the compile gate compiles through the linear exercise)."""
    case = _case(10, 16, 64, torch.bfloat16)
    with _launch.record_launches() as log:
        _loss_and_grads(case, torch.bfloat16, _ours("triton", 1.0))
    by_name = {}
    for launch in log:
        tensors = {t.dtype for t in launch.args if isinstance(t, torch.Tensor) and t.dim() == 2}
        by_name.setdefault(launch.kernel.fn.__name__, set()).update(tensors)
    assert by_name == {
        "_logp_entropy_fwd_kernel": {torch.float32},
        "_logp_entropy_bwd_kernel": {torch.float32, torch.bfloat16},
    }


def test_gemm_helpers_on_cpu():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(s, generator=g).to(torch.bfloat16) for s in ((5, 64), (64, 7)))
    exact, plain = a.double() @ b.double(), a.float() @ b.float()
    assert not _gemm.tensor_cores(a, b)
    out = _gemm.mm_acc(a, b)
    assert out.dtype == torch.float32
    assert_within_rule("mm_acc", out, plain, exact, torch.float32)
    acc = out.clone()
    ptr = acc.data_ptr()
    _gemm.addmm_acc_(acc, a, b)
    assert acc.data_ptr() == ptr
    assert_within_rule("addmm_acc_", acc, 2 * plain, 2 * exact, torch.float32)
    rounded = torch.empty(5, 7, dtype=torch.bfloat16)
    _gemm.mm_into(rounded, a, b)
    torch.testing.assert_close(rounded, exact.to(torch.bfloat16), rtol=2**-8, atol=0)
    assert _gemm.operand(b).dtype == torch.float32  # upcast once off the tensor-core path


def test_cost_models(monkeypatch):
    """6NHV for the single pass, 8NHV for the recompute path; at the H200 ceilings the single
    pass is predicted faster and no faster than its GEMMs; the fp32 dW accumulator's traffic
    appears with more than one block."""
    monkeypatch.undo()  # the shipped budgets
    n, h, v, dt = 16384, 5120, 152064, torch.bfloat16
    single = linear_single_pass.cost_model(n, h, v, dt)
    recompute = [linear_gemm.cost_forward(n, h, v, dt), linear_gemm.cost_backward(n, h, v, dt)]
    assert single["flops"] == 6 * n * h * v
    assert sum(c["flops"] for c in recompute) == 8 * n * h * v
    gemm_ms = 1e3 * 6 * n * h * v / (_cost.H200_TFLOPS * 1e12)
    single_ms = _cost.roofline_ms(single)
    assert gemm_ms <= single_ms < 1.3 * gemm_ms
    assert single_ms < sum(_cost.roofline_ms(c) for c in recompute)
    assert single["blocks"] == -(-n // linear_single_pass.loss_rows(n, v, dt, linear_gemm)) > 1
    names = [k["name"] for k in single["kernels"]]
    assert "dW fp32 -> weight dtype" in names
    one = linear_single_pass.cost_model(512, h, v, dt)
    assert one["blocks"] == 1 and "dW fp32 -> weight dtype" not in [
        k["name"] for k in one["kernels"]
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_takes_the_recompute_path_for_loss_scaling(monkeypatch, backend):
    """fp16 weights: the single pass would form dz in fp16 before the loss scale arrives, so
    a small per-token gradient (token-mean over many tokens, times a small p_j) underflows
    that GradScaler keeps. The recompute path's backward gets the scaled dL first: a loss
    scaled by 2^16 gives 2^16 times the unscaled fp32 gradient (GPU_AUDIT 2.4)."""
    spy = _Spy(monkeypatch, MODULES[backend])
    case = _case(20, 16, 300, torch.float16, scale=0.6)
    hidden, weight, labels, old_logp, adv, mask = case
    x = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    kw = {"backend": backend, "objective": "grpo"}  # per-token gradients: single-pass-able
    loss, _ = fused_linear_policy_loss(x, w, labels, old_logp, adv, mask, **kw)
    (loss * 2.0**16).backward()
    assert spy.passes == []  # not the single pass
    xf, wf = hidden.float().requires_grad_(), weight.float().requires_grad_()
    ref, _ = fused_linear_policy_loss(xf, wf, labels, old_logp, adv, mask, **kw)
    ref.backward()
    small = wf.grad.abs() < 2**-24  # fp16's smallest subnormal: lost unscaled in fp16
    assert small.any() and (w.grad[small] != 0).any()
    assert_within_rule(
        "dW / 2^16", w.grad.float() / 2**16, wf.grad, wf.grad.double(), torch.float16
    )
