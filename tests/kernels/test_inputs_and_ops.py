"""Bad inputs raise named errors; gradcheck in float64; torch.library.opcheck on the ops."""

from __future__ import annotations

import pytest
import torch

from aepo.kernels import logprob_entropy, logprobs_and_entropy

LONG = torch.long


@pytest.mark.parametrize(
    ("logits", "labels", "kwargs", "error", "match"),
    [
        (torch.randn(4, 8), torch.zeros(3, dtype=LONG), {}, ValueError, r"labels shape \(3,\)"),
        (torch.randn(4, 8), torch.zeros(4, 8, dtype=LONG), {}, ValueError, "labels shape"),
        (torch.randn(4, 8), torch.zeros(4), {}, TypeError, "integer"),
        (torch.randn(4, 8), torch.zeros(4, dtype=torch.bool), {}, TypeError, "integer"),
        (torch.randn(4, 8), torch.tensor([0, 1, 8, 2]), {}, ValueError, r"\[0, 8\).*found 8"),
        (torch.randn(4, 8), torch.tensor([0, -1, 2, 3]), {}, ValueError, "found -1"),
        (torch.randn(4, 8).to("meta"), torch.zeros(4, dtype=LONG), {}, ValueError, "device"),
        (torch.zeros(4, 8, dtype=torch.int32), torch.zeros(4, dtype=LONG), {}, TypeError, "float"),
        (
            torch.zeros(4, 8, dtype=torch.complex64),
            torch.zeros(4, dtype=LONG),
            {},
            TypeError,
            "floating",
        ),
        (torch.randn(4, 0), torch.zeros(4, dtype=LONG), {}, ValueError, "vocabulary"),
        (torch.randn(4, 8), torch.zeros(4, dtype=LONG), {"temperature": 0.0}, ValueError, "> 0"),
        (torch.randn(4, 8), torch.zeros(4, dtype=LONG), {"temperature": -1}, ValueError, "> 0"),
        (
            torch.randn(4, 8),
            torch.zeros(4, dtype=LONG),
            {"temperature": float("nan")},
            ValueError,
            "finite",
        ),
        (torch.randn(4, 8), torch.zeros(4, dtype=LONG), {"backend": "cuda"}, ValueError, "backend"),
        (
            torch.randn(4, 8).double(),
            torch.zeros(4, dtype=LONG),
            {"backend": "triton"},
            TypeError,
            "float64",
        ),
        ([[0.0, 1.0]], torch.zeros(1, dtype=LONG), {}, TypeError, "torch.Tensor"),
    ],
    ids=[
        "short-labels",
        "labels-have-V",
        "float-labels",
        "bool-labels",
        "label-eq-V",
        "negative-label",
        "device-mismatch",
        "int-logits",
        "complex-logits",
        "V0",
        "temperature-0",
        "temperature-neg",
        "temperature-nan",
        "unknown-backend",
        "triton-float64",
        "list-logits",
    ],
)
def test_bad_input_raises_named_error(logits, labels, kwargs, error, match):
    with pytest.raises(error, match=match):
        logprobs_and_entropy(logits, labels, **kwargs)


def test_ignore_index_is_exempt_from_range_check():
    logp, _ = logprobs_and_entropy(torch.randn(3, 8), torch.tensor([7, -100, 0]))
    assert logp[1] == 0


def test_int32_labels_accepted():
    logits = torch.randn(3, 8)
    a = logprobs_and_entropy(logits, torch.tensor([1, 2, 3], dtype=torch.int32))
    b = logprobs_and_entropy(logits, torch.tensor([1, 2, 3]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradcheck_float64_torch_backend(temperature):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 3, 7, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    labels = torch.tensor([[0, 6, -100], [3, 3, 1]])
    fn = lambda x: logprobs_and_entropy(x, labels, temperature=temperature, backend="torch")
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)


def _op_inputs():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 33, generator=gen)
    labels = torch.tensor([1, -100, 32, 0, 7])
    return logits, labels


def test_opcheck_forward_op():
    logits, labels = _op_inputs()
    op = torch.ops.aepo.logprobs_entropy_fwd.default
    torch.library.opcheck(op, (logits, labels, 1.0 / 0.7, -100, False))
    torch.library.opcheck(op, (logits.requires_grad_(), labels, 1.0, -100, False))


@pytest.mark.parametrize("terms", ["both", "logp", "entropy"])
def test_opcheck_backward_op(terms):
    logits, labels = _op_inputs()
    _, entropy, m, log_s = torch.ops.aepo.logprobs_entropy_fwd(logits, labels, 1.0, -100, False)
    g_lp = torch.randn(5) if terms in ("both", "logp") else None
    g_h = torch.randn(5) if terms in ("both", "entropy") else None
    grad = torch.empty_like(logits)
    args = (logits, labels, m, log_s, entropy, g_lp, g_h, grad, 1.0, -100)
    torch.library.opcheck(torch.ops.aepo.logprobs_entropy_bwd.default, args)


def test_backward_op_rejects_unaddressable_grad_buffer():
    logits, labels = _op_inputs()
    _, entropy, m, log_s = torch.ops.aepo.logprobs_entropy_fwd(logits, labels, 1.0, -100, False)
    grad = torch.empty(33, 5).t()  # last dim not contiguous: a copy would lose the gradient
    with pytest.raises(ValueError, match="addressable"):
        logprob_entropy.logprobs_entropy_bwd(
            logits, labels, m, log_s, entropy, None, torch.ones(5), grad, 1.0, -100
        )
