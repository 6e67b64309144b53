"""Forward and backward of both backends against the float64 autograd reference."""

from __future__ import annotations

import pytest
import torch

from aepo.kernels import (
    _launch,
    logprob_entropy,
    logprobs_and_entropy,
    naive_logprobs_and_entropy,
)
from tests.helpers import assert_within_rule, make_labels

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (name, leading shape, V, slice the time dim, interpreter block cap)
SHAPES = [
    ("N1-V1", (1,), 1, False, None),
    ("N1-V17", (1,), 17, False, None),
    ("N37-V1000", (37,), 1000, False, None),
    ("N9-V3000-blocks", (9,), 3000, False, 1024),  # 3 blocks, ragged last block
    ("B3-T6-V515-sliced", (3, 6), 515, True, 128),  # logits[:, :-1]: strided rows, 5 blocks
]


def _inputs(lead, vocab, sliced, dtype, scale, seed=0):
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(*lead, vocab, generator=gen) * scale
    logits = full[:, :-1] if sliced else full
    labels = make_labels(logits.shape[:-1], vocab, gen)
    return logits.to(dtype), labels, gen


def _fwd_bwd(fn, logits, labels, g_lp, g_h, **kw):
    x = logits.detach().clone().requires_grad_()
    if x.dim() == 3:  # keep the strided [B, T-1, V] layout of a sliced input
        x = logits.detach().clone()
        x = torch.cat([x, x[:, :1]], dim=1)[:, :-1].detach().requires_grad_()
    logp, ent = fn(x, labels, **kw)
    (grad,) = torch.autograd.grad((logp * g_lp.to(logp.dtype) + ent * g_h.to(ent.dtype)).sum(), x)
    return logp, ent, grad


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("scale", [1.0, 30.0], ids=lambda s: f"x{s:g}")
def test_matches_fp64_reference(backend, shape, dtype, temperature, scale, monkeypatch):
    _, lead, vocab, sliced, block_cap = shape
    if block_cap is not None:
        monkeypatch.setattr(logprob_entropy, "INTERPRET_MAX_BLOCK", block_cap)
    logits, labels, gen = _inputs(lead, vocab, sliced, DTYPES[dtype], scale)
    g_lp = torch.randn(labels.shape, generator=gen)
    g_h = torch.randn(labels.shape, generator=gen)

    ours = _fwd_bwd(
        logprobs_and_entropy, logits, labels, g_lp, g_h, temperature=temperature, backend=backend
    )
    plain = _fwd_bwd(naive_logprobs_and_entropy, logits, labels, g_lp, g_h, temperature=temperature)
    ref = _fwd_bwd(
        naive_logprobs_and_entropy, logits.double(), labels, g_lp, g_h, temperature=temperature
    )
    assert ours[0].dtype == ours[1].dtype == torch.float32
    assert ours[2].dtype == logits.dtype and ours[2].shape == logits.shape
    for name, o, p, r, out_dtype in zip(
        ("logp", "entropy", "grad"),
        ours,
        plain,
        ref,
        (torch.float32,) * 2 + (logits.dtype,),
        strict=True,
    ):
        assert_within_rule(f"{backend} {name}", o, p, r, out_dtype)
    ignored = labels == -100
    assert (ours[0][ignored] == 0).all() and (ours[1][ignored] == 0).all()
    assert (ours[2][ignored] == 0).all(), "ignored rows must get exactly zero gradient"


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("used", ["logp", "entropy"])
def test_single_output_gradient(backend, used):
    """Only one output in the loss: the other upstream gradient is None inside the backward."""
    logits, labels, _ = _inputs((11,), 300, False, torch.float32, 3.0)
    names = ("logp", "entropy")

    def grad(fn, x):
        x = x.clone().requires_grad_()
        out = dict(zip(names, fn(x, labels), strict=True))
        return torch.autograd.grad(out[used].sum(), x)[0]

    ours = grad(lambda x, y: logprobs_and_entropy(x, y, backend=backend), logits)
    plain = grad(naive_logprobs_and_entropy, logits)
    ref = grad(naive_logprobs_and_entropy, logits.double())
    assert_within_rule(f"{backend} d{used}", ours, plain, ref, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("banned", ["tail", "head"])
def test_masked_vocabulary_minus_inf(backend, banned, monkeypatch):
    """-inf logits (banned tokens) have p = 0: finite outputs equal to the unmasked sub-problem.
    ``head``: the first blocks hold only -inf (lanes start from nothing but -inf)."""
    monkeypatch.setattr(logprob_entropy, "INTERPRET_MAX_BLOCK", 64)
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 200, generator=gen)
    keep = slice(0, 50) if banned == "tail" else slice(150, 200)
    ban = slice(50, 200) if banned == "tail" else slice(0, 150)
    logits[:, ban] = float("-inf")
    labels = torch.randint(0, 50, (6,), generator=gen) + keep.start
    x = logits.clone().requires_grad_()
    logp, ent = logprobs_and_entropy(x, labels, backend=backend)
    (g,) = torch.autograd.grad((logp + ent).sum(), x)

    def sub_problem(dtype):  # the unmasked columns alone, plain torch
        sub = logits[:, keep].to(dtype).requires_grad_()
        lp, h = naive_logprobs_and_entropy(sub, labels - keep.start)
        return lp, h, torch.autograd.grad((lp + h).sum(), sub)[0]

    plain, ref = sub_problem(torch.float32), sub_problem(torch.float64)
    ours = (logp, ent, g[:, keep])
    for name, o, p, r in zip(("logp", "entropy", "grad"), ours, plain, ref, strict=True):
        assert_within_rule(f"{backend} {banned} {name}", o, p, r, torch.float32)
    assert (g[:, ban] == 0).all()


@pytest.mark.parametrize("grads", ["logp", "entropy", "both"])
def test_backward_tail_lanes_compute_nothing_out_of_range(grads, monkeypatch):
    """All logits <= -40 at T=0.3 with a partial last block: the backward's masked lanes past V
    must give p = 0 (they once loaded 0.0, far above the row max, and exp2 overflowed to inf
    there; the store was masked, but it is an inf per lane and a warning in the interpreter)."""
    import warnings

    monkeypatch.setattr(logprob_entropy, "INTERPRET_MAX_BLOCK", 64)
    gen = torch.Generator().manual_seed(5)
    logits = -40.0 - 5.0 * torch.rand(4, 100, generator=gen)  # V = 100: a 36-element tail
    labels = torch.randint(0, 100, (4,), generator=gen)
    x = logits.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        logp, ent = logprobs_and_entropy(x, labels, temperature=0.3, backend="triton")
        loss = {"logp": logp.sum(), "entropy": ent.sum(), "both": (logp + ent).sum()}[grads]
        (g,) = torch.autograd.grad(loss, x)

    def plain_grad(dtype):
        x = logits.to(dtype).requires_grad_()
        lp, h = naive_logprobs_and_entropy(x, labels, 0.3)
        loss = {"logp": lp.sum(), "entropy": h.sum(), "both": (lp + h).sum()}[grads]
        return torch.autograd.grad(loss, x)[0]

    assert_within_rule(
        f"d/d{grads}", g, plain_grad(torch.float32), plain_grad(torch.float64), torch.float32
    )


@pytest.mark.parametrize("lanes, vec", [(1, 1), (8, 1), (4, 4), (32, 2)], ids=lambda v: str(v))
def test_forward_lane_layouts(lanes, vec, monkeypatch):
    """The forward's per-lane statistics and their merge: any [K, LANES, VEC] split of the
    block gives the fp64 answer within the rule (3 full blocks, a ragged tail, lanes that
    see only masked elements, large logits)."""
    monkeypatch.setattr(logprob_entropy, "INTERPRET_MAX_BLOCK", 256)
    monkeypatch.setattr(logprob_entropy, "INTERPRET_LANES", lanes)
    monkeypatch.setattr(logprob_entropy, "INTERPRET_VEC", vec)
    logits, labels, _ = _inputs((7,), 3 * 256 + 37, False, torch.float32, 30.0)
    ours = logprobs_and_entropy(logits, labels, temperature=0.7, backend="triton")
    plain = naive_logprobs_and_entropy(logits, labels, temperature=0.7)
    ref = naive_logprobs_and_entropy(logits.double(), labels, temperature=0.7)
    for name, o, p, r in zip(("logp", "entropy"), ours, plain, ref, strict=True):
        assert_within_rule(f"lanes={lanes} vec={vec} {name}", o, p, r, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ignored_rows_with_garbage_logits_get_zero(backend):
    """Masked rows are skipped: inf/NaN there neither leaks into outputs nor gradients."""
    logits, labels, _ = _inputs((10,), 64, False, torch.float32, 1.0)
    labels[3] = -100
    logits[3] = float("nan")
    logits[3, 0] = float("inf")
    x = logits.clone().requires_grad_()
    logp, ent = logprobs_and_entropy(x, labels, backend=backend)
    (g,) = torch.autograd.grad((logp * 2 + ent).sum(), x)
    assert logp[3] == 0 and ent[3] == 0 and (g[3] == 0).all()
    assert torch.isfinite(g).all() and torch.isfinite(logp).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
def test_inplace_grad_writes_into_logits(backend, dtype):
    logits, labels, gen = _inputs((13,), 700, False, DTYPES[dtype], 2.0)
    g_lp, g_h = torch.randn(13, generator=gen), torch.randn(13, generator=gen)
    leaf = logits.clone().requires_grad_()
    expected = _fwd_bwd(logprobs_and_entropy, logits, labels, g_lp, g_h, backend=backend)[2]

    x = leaf * 1  # a non-leaf, like an lm_head output
    storage = x.data_ptr()
    logp, ent = logprobs_and_entropy(x, labels, backend=backend, inplace_grad=True)
    (g,) = torch.autograd.grad((logp * g_lp + ent * g_h).sum(), leaf)
    assert x.data_ptr() == storage
    torch.testing.assert_close(x.detach(), expected, rtol=0, atol=0)  # x now holds the gradient
    torch.testing.assert_close(g, expected, rtol=0, atol=0)


def test_inplace_grad_refuses_leaf():
    logits = torch.randn(2, 5, requires_grad=True)
    with pytest.raises(ValueError, match="leaf"):
        logprobs_and_entropy(logits, torch.zeros(2, dtype=torch.long), inplace_grad=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch(backend):
    x = torch.randn(0, 7, 32, requires_grad=True)
    logp, ent = logprobs_and_entropy(x, torch.zeros(0, 7, dtype=torch.long), backend=backend)
    assert logp.shape == ent.shape == (0, 7)
    (g,) = torch.autograd.grad((logp + ent).sum(), x, allow_unused=True)
    assert g is None or g.shape == x.shape


def test_backends_agree_on_auto_choice():
    from aepo.kernels import resolve_backend

    cpu = torch.zeros(2, 3)
    expect = "triton" if _launch.INTERPRET else "torch"
    assert resolve_backend("auto", cpu) == expect
    assert resolve_backend("auto", cpu.double()) == "torch"
