"""Compiled-kernel checks that only a CUDA GPU can run; skipped cleanly elsewhere."""

from __future__ import annotations

import pytest
import torch

from aepo.kernels import logprobs_and_entropy, naive_logprobs_and_entropy
from tests.helpers import assert_within_rule, make_labels
from tests.kernels import compile_cases

pytestmark = pytest.mark.cuda


def _case(n, vocab, dtype, device, scale=4.0, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen, device=device) * scale).to(dtype)
    labels = make_labels((n,), vocab, torch.Generator().manual_seed(seed)).to(device)
    g_lp = torch.randn(n, generator=gen, device=device)
    g_h = torch.randn(n, generator=gen, device=device)
    return logits, labels, g_lp, g_h


def _run(fn, logits, labels, g_lp, g_h, **kw):
    x = logits.detach().clone().requires_grad_()
    logp, ent = fn(x, labels, **kw)
    (g,) = torch.autograd.grad((logp * g_lp.to(logp.dtype) + ent * g_h.to(ent.dtype)).sum(), x)
    return logp, ent, g


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("vocab", [32000, 50257, 151936])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_compiled_kernel_matches_fp64(cuda, dtype, vocab, temperature):
    logits, labels, g_lp, g_h = _case(64, vocab, dtype, cuda, scale=8.0)
    kw = {"temperature": temperature}
    ours = _run(logprobs_and_entropy, logits, labels, g_lp, g_h, backend="triton", **kw)
    plain = _run(naive_logprobs_and_entropy, logits, labels, g_lp, g_h, **kw)
    ref = _run(naive_logprobs_and_entropy, logits.double(), labels, g_lp, g_h, **kw)
    for name, o, p, r, od in zip(
        ("logp", "entropy", "grad"), ours, plain, ref, (torch.float32,) * 2 + (dtype,), strict=True
    ):
        assert_within_rule(name, o, p, r, od)


def test_inplace_grad_on_gpu(cuda):
    logits, labels, g_lp, g_h = _case(256, 151936, torch.bfloat16, cuda)
    expected = _run(logprobs_and_entropy, logits, labels, g_lp, g_h, backend="triton")[2]
    leaf = logits.clone().requires_grad_()
    x = leaf * 1
    before = torch.cuda.memory_allocated()
    logp, ent = logprobs_and_entropy(x, labels, backend="triton", inplace_grad=True)
    (g,) = torch.autograd.grad((logp * g_lp + ent * g_h).sum(), leaf)
    torch.testing.assert_close(x.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(g, expected, rtol=0, atol=0)
    assert torch.cuda.memory_allocated() - before < x.numel() * x.element_size()


def test_torch_compile_fullgraph(cuda):
    logits, labels, g_lp, g_h = _case(128, 32000, torch.bfloat16, cuda)

    def loss_fn(x, y):
        logp, ent = logprobs_and_entropy(x, y, temperature=0.9, backend="triton")
        return (logp * g_lp + ent * g_h).sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    eager, comp = loss_fn(x1, labels), compiled(x2, labels)
    eager.backward()
    comp.backward()
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(x2.grad, x1.grad)


@pytest.mark.parametrize("case", compile_cases.CASES, ids=lambda c: c.name)
def test_torch_compile_cases(cuda, case):
    """The CPU compile cases (tests/kernels/test_torch_compile.py) through Inductor, whose
    fusions of the surrounding ops may move the last fp32 bits."""
    torch._dynamo.reset()
    compiled = torch.compile(case.fn, fullgraph=True)
    eager_out, eager_grads = compile_cases.run(case, case.fn, cuda)
    out, grads = compile_cases.run(case, compiled, cuda)
    compile_cases.assert_same(eager_out + eager_grads, out + grads, exact=False)


def test_more_than_2_to_31_elements(cuda):
    """int64 offsets: rows past element 2^31 are addressed correctly."""
    vocab = 151936
    n = (2**31) // vocab + 64
    gen = torch.Generator(device=cuda).manual_seed(0)
    logits = torch.randn(n, vocab, generator=gen, device=cuda, dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (n,), device=cuda)
    x = logits.clone().requires_grad_()
    logp, ent = logprobs_and_entropy(x, labels, backend="triton")
    (g,) = torch.autograd.grad((logp + ent).sum(), x)
    tail = slice(n - 64, n)  # rows past element 2^31, checked against the rule on their own
    ones = torch.ones(64, device=cuda)
    plain = _run(naive_logprobs_and_entropy, logits[tail], labels[tail], ones, ones)
    ref = _run(naive_logprobs_and_entropy, logits[tail].double(), labels[tail], ones, ones)
    ours = (logp[tail], ent[tail], g[tail])
    for name, o, p, r, od in zip(
        ("logp", "entropy", "grad"),
        ours,
        plain,
        ref,
        (torch.float32,) * 2 + (torch.bfloat16,),
        strict=True,
    ):
        assert_within_rule(name, o, p, r, od)
