"""The hidden-state path: linear_logprobs_and_entropy / fused_linear_policy_loss, both backends
(triton: the GEMMs on CPU, upcast, and the row kernels through the interpreter) against float64
on the rounded inputs, with the tolerance rule of the logits kernels; the 6NHV single pass for
every weight dtype, its block sizes and dW accumulator; the FLOP / byte models; the regressions
other fused-linear kernels shipped; bad input."""

from __future__ import annotations

import pytest
import torch

from aepo.kernels import (
    fused_linear_policy_loss,
    fused_policy_loss,
    linear,
    linear_gemm,
    linear_logprobs_and_entropy,
    linear_single_pass,
    linear_torch,
    naive_linear_logprobs_and_entropy,
)
from tests.helpers import assert_within_rule, make_labels

BACKENDS = ("torch", "triton")


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """Several vocabulary chunks / row blocks / backward slices at test sizes."""
    monkeypatch.setattr(linear_torch, "VOCAB_CHUNK", 64)
    monkeypatch.setattr(linear_torch, "ROW_CHUNK", 16)
    monkeypatch.setattr(linear_torch, "LOSS_BUFFER_BYTES", 2 * 16 * 300 * 8)  # <= 16 rows a block
    monkeypatch.setattr(linear_gemm, "WORKSPACE_BYTES", 4096)  # 16-row blocks, 64-column slices
    monkeypatch.setattr(linear_gemm, "MIN_SLICE", 64)
    monkeypatch.setattr(linear_gemm, "LOSS_BUFFER_BYTES", 4096)


def _inputs(n, h, v, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * scale / h**0.5).to(dtype)
    labels = make_labels((n,), v, g)
    return hidden, weight, labels, torch.randn(n, generator=g), torch.randn(n, generator=g)


def _run(fn, hidden, weight, labels, g_lp, g_h, **kw):
    x, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logp, ent = fn(x, w, labels, **kw)
    loss = (logp * g_lp.to(logp.dtype) + ent * g_h.to(ent.dtype)).sum()
    dx, dw = torch.autograd.grad(loss, (x, w))
    return logp, ent, dx, dw


def _check(hidden, weight, labels, g_lp, g_h, backend, **kw):
    ours = _run(
        linear_logprobs_and_entropy, hidden, weight, labels, g_lp, g_h, backend=backend, **kw
    )
    plain = _run(naive_linear_logprobs_and_entropy, hidden, weight, labels, g_lp, g_h, **kw)
    ref = _run(
        naive_linear_logprobs_and_entropy, hidden.double(), weight.double(), labels, g_lp, g_h, **kw
    )
    dtypes = (torch.float32, torch.float32, hidden.dtype, weight.dtype)
    names = ("logp", "entropy", "dx", "dw")
    for name, o, p, r, od in zip(names, ours, plain, ref, dtypes, strict=True):
        assert o.dtype == od, name
        assert_within_rule(name, o, p, r, od)
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize(
    "n, h, v", [(37, 40, 301), (1, 24, 700), (70, 64, 257)], ids=lambda s: f"{s}"
)
def test_matches_float64(backend, dtype, temperature, n, h, v):
    hidden, weight, labels, g_lp, g_h = _inputs(n, h, v, dtype, scale=3.0)
    _check(hidden, weight, labels, g_lp, g_h, backend, temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_shape_and_ignored_rows(backend):
    """[B, T, H] hidden; ignored rows return 0, get exactly zero d hidden, and garbage (NaN)
    in them reaches neither the outputs nor d weight."""
    hidden, weight, labels, g_lp, g_h = _inputs(24, 32, 300, torch.float32)
    labels[:5] = -100
    clean = _run(linear_logprobs_and_entropy, hidden, weight, labels, g_lp, g_h, backend=backend)
    poisoned = hidden.clone()
    poisoned[:5] = float("nan")
    b = (2, 12)
    ours = _run(
        linear_logprobs_and_entropy,
        poisoned.view(*b, 32),
        weight,
        labels.view(b),
        g_lp.view(b),
        g_h.view(b),
        backend=backend,
    )
    assert ours[0].shape == b and ours[2].shape == (*b, 32)
    assert (ours[0].view(-1)[:5] == 0).all() and (ours[1].view(-1)[:5] == 0).all()
    assert (ours[2].view(-1, 32)[:5] == 0).all()
    for a, c in zip(ours, clean, strict=True):
        torch.testing.assert_close(a.reshape(c.shape), c, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wrt", ["logp", "entropy"])
def test_single_upstream_gradient(backend, wrt):
    """An entropy-only (or logp-only) upstream gradient: TRL once dropped the entropy term."""
    hidden, weight, labels, g_lp, g_h = _inputs(20, 32, 300, torch.float32, scale=3.0)
    zero = torch.zeros_like(g_lp)
    g_lp, g_h = (g_lp, zero) if wrt == "logp" else (zero, g_h)
    _, _, dx, dw = _check(hidden, weight, labels, g_lp, g_h, backend)
    assert dx.abs().max() > 0 and dw.abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_peaked_weight_large_vocab(backend):
    """verl's out-of-bounds vocabulary bug: zero-padded columns added e^0 to the sum. A peaked
    weight at V=152064 (not a multiple of the tiles) makes any such column visible."""
    v, h, temperature = 152064, 16, 1.0
    weight = torch.zeros(v, h)
    weight[:, 0] = -15 * temperature
    weight[0, 0] = 3 * temperature
    hidden = torch.zeros(4, h)
    hidden[:, 0] = 1.0
    labels = torch.tensor([0, 1, 151000, 152063])
    ours = linear_logprobs_and_entropy(hidden, weight, labels, backend=backend)
    plain = naive_linear_logprobs_and_entropy(hidden, weight, labels)
    ref = naive_linear_logprobs_and_entropy(hidden.double(), weight.double(), labels)
    for name, o, p, r in zip(("logp", "entropy"), ours, plain, ref, strict=True):
        assert_within_rule(name, o, p, r, torch.float32)
    # one padded column adding e^0 would move logp by log(1 + e^-3 / s) ~ 0.05
    assert (ours[0].double() - ref[0]).abs().max() < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_negative_logits_low_temperature(backend):
    """Every logit strongly negative at T=0.3: a merged max starting at 0 underflows to NaN."""
    hidden, weight, labels, g_lp, g_h = _inputs(16, 32, 300, torch.float32, seed=3)
    hidden = hidden.abs() + 0.5
    weight = -(weight.abs() + 40.0 / 32)  # z <= -40 everywhere
    _check(hidden, weight, labels, g_lp, g_h, backend, temperature=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_result_independent_of_batch(backend):
    """A row's result does not depend on the batch beyond fp32 rounding (the GEMMs may pick
    another algorithm, and sum in another order, for another number of rows)."""
    hidden, weight, labels, *_ = _inputs(40, 32, 300, torch.float32)
    alone = linear_logprobs_and_entropy(hidden[:13], weight, labels[:13], backend=backend)
    batched = linear_logprobs_and_entropy(hidden, weight, labels, backend=backend)
    for a, b in zip(alone, batched, strict=True):
        torch.testing.assert_close(a, b[:13], rtol=1e-6, atol=1e-6)


OBJECTIVES = ("aepo", "grpo", "ppo", "dapo", "gppo", "cispo")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_fused_linear_loss_equals_logits_loss(backend, objective):
    """Same loss and gradients as the logits path on hidden @ weight.T, for every objective
    (with an entropy bonus, so the entropy gradient reaches both operands)."""
    g = torch.Generator().manual_seed(7)
    b, t, h, v = 3, 9, 32, 300
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, v, (b, t), generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.3).float()
    with torch.no_grad():
        logits_lp = naive_linear_logprobs_and_entropy(hidden, weight, labels)[0]
    old_logp = (logits_lp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(b, t, generator=g)
    kw = {"objective": objective, "entropy_coef": 0.01, "temperature": 0.9}

    def grads(fn, lead):
        x, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
        loss, _ = fn(*lead(x, w), labels, old_logp, adv, mask, **kw)
        return (loss, *torch.autograd.grad(loss, (x, w)))

    ours = grads(
        lambda *a, **k: fused_linear_policy_loss(*a, backend=backend, **k), lambda x, w: (x, w)
    )
    theirs = grads(
        lambda *a, **k: fused_policy_loss(*a, backend="torch", **k), lambda x, w: (x @ w.T,)
    )
    for a, c in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, c, rtol=2e-5, atol=1e-6)


def _loss_case(dtype, seed=11):
    g = torch.Generator().manual_seed(seed)
    b, t, h, v = 4, 13, 24, 300  # 38-ish kept rows: three blocks of at most 16 rows
    hidden = torch.randn(b, t, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.3).float()
    mask[1] = 0  # an empty sequence
    old_logp = -5.5 + 0.3 * torch.randn(b, t, generator=g)
    return hidden, weight, labels, old_logp, torch.randn(b, t, generator=g), mask


def _loss_and_grads(case, monkeypatch, single: bool, **kw):
    """(loss, metrics, d hidden, d weight) with the single pass allowed or forbidden; checks
    that the path asked for is the one taken."""
    calls = []
    real = linear_single_pass.linear_loss_single_pass
    monkeypatch.setattr(
        linear_single_pass, "linear_loss_single_pass", lambda *a: calls.append(1) or real(*a)
    )
    if not single:
        monkeypatch.setattr(linear, "_single_pass", lambda *a: False)
    hidden, weight, *rest = case
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = fused_linear_policy_loss(x, w, *rest, backend="torch", **kw)
    loss.backward()
    monkeypatch.undo()
    assert bool(calls) == single
    return loss, metrics, x.grad, w.grad


STATS = (torch.tensor(2.5), torch.tensor(0.8))


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_single_pass_equals_recompute_path(monkeypatch, objective, agg):
    """The gradients-in-the-forward path (6NHV) gives the recompute path's loss, metrics and
    gradients for every objective and aggregation (entropy bonus, KL term, temperature):
    equal to 1e-10 in fp64; in fp32 within the tolerance rule against fp64 (the two paths sum
    the rows' contributions in different orders)."""
    case = _loss_case(torch.float32)
    double = tuple(t.double() if t.is_floating_point() else t for t in case)
    kw = {"objective": objective, "agg": agg, "entropy_coef": 0.01, "temperature": 0.7}
    kw |= {"entropy_stats": STATS, "kl_coef": 0.05}
    runs = {}
    for name, c in (("fp32", case), ("fp64", double)):
        kw["ref_logp"] = c[3] + 0.2
        for single in (True, False):
            runs[name, single] = _loss_and_grads(c, monkeypatch, single, **kw)
    ref = runs["fp64", True]
    for i, name in enumerate(("loss", "metrics", "dx", "dw")):
        a, b = runs["fp64", True][i], runs["fp64", False][i]
        torch.testing.assert_close(
            a, b, rtol=1e-10, atol=0, msg=lambda m, name=name: f"{name}: {m}"
        )
        if name != "metrics":
            ours, plain = runs["fp32", True][i], runs["fp32", False][i]
            assert_within_rule(name, ours, plain, ref[i], torch.float32)
    ours = runs["fp32", True]
    assert ours[2][1].abs().max() == 0  # the empty sequence's hidden rows get exactly zero
    assert ours[3].abs().min() > 0 or objective == "cispo"  # every vocab row got a gradient


def test_single_pass_group_statistics_and_frozen_weight(monkeypatch):
    """Per-sequence entropy statistics ([B, 1], the "group" normalisation precomputed) are
    broadcast per token; a frozen weight skips dW; a second backward is refused."""
    case = _loss_case(torch.float64)
    stats = (2.0 + torch.rand(4, 1, dtype=torch.float64), 0.5 + torch.rand(4, 1))
    kw = {"entropy_stats": stats, "entropy_adv_norm": "group"}
    single = _loss_and_grads(case, monkeypatch, True, **kw)
    recompute = _loss_and_grads(case, monkeypatch, False, **kw)
    for a, b in zip(single, recompute, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=0)
    hidden, weight, *rest = case
    x = hidden.clone().requires_grad_()
    loss, _ = fused_linear_policy_loss(x, weight, *rest, backend="torch", **kw)
    (dx,) = torch.autograd.grad(loss, x, retain_graph=True)
    torch.testing.assert_close(dx, single[2])
    with pytest.raises(RuntimeError, match="backward through it runs once"):
        loss.backward()


@pytest.mark.parametrize(
    "why, kw, dtype, grad",
    [
        ("entropy statistics inside the loss", {}, torch.float32, True),
        ("nothing to differentiate", {"entropy_stats": STATS}, torch.float32, False),
    ],
)
def test_recompute_path_where_single_pass_does_not_apply(monkeypatch, why, kw, dtype, grad):
    calls = []
    monkeypatch.setattr(linear_single_pass, "linear_loss_single_pass", lambda *a: calls.append(a))
    hidden, weight, *rest = _loss_case(dtype)
    x = hidden.clone().requires_grad_(grad)
    loss, _ = fused_linear_policy_loss(x, weight, *rest, backend="torch", **kw)
    assert not calls, why
    assert loss.isfinite()


def test_gradcheck_float64_torch_backend():
    hidden, weight, labels, *_ = _inputs(9, 6, 150, torch.float64)
    x, w = hidden.requires_grad_(), weight.requires_grad_()
    fn = lambda x, w: linear_logprobs_and_entropy(x, w, labels, temperature=0.8, backend="torch")
    assert torch.autograd.gradcheck(fn, (x, w))


def test_masked_rows_cost_no_flops(monkeypatch):
    """Rows with mask 0 never reach the backend (dropped before any matmul)."""
    seen = []
    real = linear_torch.linear_forward
    monkeypatch.setattr(
        linear_torch, "linear_forward", lambda x, *a: seen.append(x.shape[0]) or real(x, *a)
    )
    hidden, weight, labels, *_ = _inputs(20, 16, 50, torch.float32)
    mask = torch.zeros(20)
    mask[[3, 7, 11]] = 1
    zeros, ones = torch.zeros(20), torch.ones(20)
    fused_linear_policy_loss(hidden, weight, labels, zeros, ones, mask, backend="torch")
    assert seen == [3]


H, V = 8, 30
_x, _w, _y = torch.zeros(4, H), torch.zeros(V, H), torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((_x, _w[0], _y), {}, ValueError, r"weight must be 2-D \[V, H\]"),
        ((_x, torch.zeros(V, H + 1), _y), {}, ValueError, "must end in H = weight.shape"),
        ((_x.double(), _w, _y), {}, TypeError, "dtypes differ"),
        ((_x.long(), _w, _y), {}, TypeError, "hidden must be a floating-point"),
        ((_x, _w, _y[:3]), {}, ValueError, "labels shape"),
        ((_x, _w, _y.float()), {}, TypeError, "labels must be an integer"),
        ((_x, _w, torch.tensor([0, 1, V, 2])), {}, ValueError, r"labels must be in \[0, 30\)"),
        ((_x, _w, _y), {"temperature": 0.0}, ValueError, "temperature"),
        ((_x, torch.zeros(0, H), _y), {}, ValueError, "no elements"),
        ((_x, _w.to("meta"), _y), {}, ValueError, "same device"),
        ((_x, _w, _y), {"backend": "cuda"}, ValueError, "backend must be one of"),
    ],
    ids=[
        "weight-1d",
        "h-mismatch",
        "dtype-mismatch",
        "int-hidden",
        "labels-shape",
        "float-labels",
        "label-range",
        "temperature",
        "empty-weight",
        "device",
        "backend",
    ],
)
def test_bad_input_raises_named_error(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        linear_logprobs_and_entropy(*args, **kwargs)
