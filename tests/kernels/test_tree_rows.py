"""The policy losses on the unique rows of a packed tree (``rows=``) against the flat
computation: ``policy_loss`` on the log-probs of ``table[rows]`` gathered to [B, L], so that
the flat gradient sums back onto the unique rows the same way. Random trees with forks at
depth >= 3, ragged rows, mixed-sign advantages on branches that share tokens, masked
tool-result spans, rows with several labels; every objective on the single pass and the
recompute path of the hidden-state loss and on the logits loss; the head counted on edges."""

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
    naive_logprobs_and_entropy,
    unique_edges,
)
from aepo.kernels import fused_loss as fused_loss_module
from aepo.objectives import entropy_statistics, policy_loss
from tests.helpers import assert_within_rule, max_err

DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
# fp64: max |ours - flat| / max |flat|, ~450 ulps (the [B, L] flat sum and ours differ in the
# order of their sums; measured <= 3e-15); a wrong per-occurrence term is ~1e-2
FP64_TOL = 1e-13
V, H = 97, 16


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    """Blocks of at most 16 edges on the single pass and small chunks on the recompute path,
    so that blocks of edges start and end inside runs of shared occurrences."""
    monkeypatch.setattr(linear_torch, "LOSS_BUFFER_BYTES", 4096)
    monkeypatch.setattr(linear_gemm, "LOSS_BUFFER_BYTES", 4096)
    monkeypatch.setattr(linear_torch, "VOCAB_CHUNK", 64)
    monkeypatch.setattr(linear_torch, "ROW_CHUNK", 16)


# ---------------------------------------------------------------------------------------------
# Trees


def _paths(g: torch.Generator, depth: int, prefix: list[int], tokens: list[int]) -> list:
    """Root-to-leaf token lists of a random tree: a segment, then 2-3 children (depth > 0)
    whose first tokens differ (so their parent's last token predicts several labels)."""
    seg = torch.randint(1, 8 if depth else 14, (1,), generator=g).item()
    path = prefix + [tokens.pop() for _ in range(seg)]
    if depth == 0:
        return [path]
    kids = 2 + int(torch.randint(0, 2, (1,), generator=g))
    return [p for _ in range(kids) for p in _paths(g, depth - 1, path, tokens)]


def make_tree(seed: int, groups: int = 2, depth: int = 3):
    """A flat right-padded layout of tree rollouts: (rows [B, L] packed row or -1, labels
    [B, L] next token, mask [B, L] (prompt, tool-result spans, last token and padding 0),
    group_ids [B], R). Packed rows are the trie nodes: positions share a row iff their paths
    agree up to and including it."""
    g = torch.Generator().manual_seed(seed)
    paths = []
    for _ in range(groups):
        prompt = torch.randint(0, V, (3,), generator=g).tolist()
        tokens = torch.randint(0, V, (400,), generator=g).tolist()
        paths.append(_paths(g, depth, prompt, tokens))
    group_ids = torch.tensor([i for i, ps in enumerate(paths) for _ in ps])
    paths = [p for ps in paths for p in ps]
    length = max(len(p) for p in paths)
    rows = torch.full((len(paths), length), -1, dtype=torch.long)
    labels = torch.zeros(len(paths), length, dtype=torch.long)
    mask = torch.zeros(len(paths), length)
    node: dict[tuple, int] = {}
    for b, p in enumerate(paths):
        for t in range(len(p)):
            rows[b, t] = node.setdefault((group_ids[b].item(), *p[: t + 1]), len(node))
            labels[b, t] = p[t + 1] if t + 1 < len(p) else 0
        mask[b, 2 : len(p) - 1] = 1.0  # the prompt's last token predicts the first sampled
    for start in range(6, length, 11):  # tool results: the same token span in every branch
        mask[:, start : start + 3] = 0.0
    return rows, labels, mask, group_ids, len(node)


def _edges_by_hand(rows, labels, mask):
    keep = mask.bool()
    return sorted(set(zip(rows[keep].tolist(), labels[keep].tolist(), strict=True)))


def test_make_tree_shares_and_forks():
    rows, labels, mask, _, r = make_tree(0)
    keep = mask.bool()
    edges = _edges_by_hand(rows, labels, mask)
    per_row = torch.bincount(torch.tensor([e[0] for e in edges]), minlength=r)
    assert len(edges) < 0.6 * int(keep.sum())  # shared prefixes
    assert int((per_row > 1).sum()) >= 4  # rows with several labels (forks)
    assert len({int(n) for n in (rows >= 0).sum(1)}) > 2  # ragged
    case = make_case(0, torch.float32)
    _, _, inverse = unique_edges(rows, labels, keep)
    signs = torch.zeros(len(edges), 2).index_add_(
        0,
        inverse,
        torch.stack([case["advantages"][keep] > 0, case["advantages"][keep] < 0], 1).float(),
    )
    assert int((signs > 0).all(1).sum()) > 10  # edges shared by branches of both signs


def test_unique_edges():
    rows, labels, mask, _, _ = make_tree(1)
    keep = mask.bool()
    edge_rows, edge_labels, inverse = unique_edges(rows, labels, keep)
    assert list(zip(edge_rows.tolist(), edge_labels.tolist(), strict=True)) == _edges_by_hand(
        rows, labels, mask
    )
    torch.testing.assert_close(edge_rows[inverse], rows[keep], rtol=0, atol=0)
    torch.testing.assert_close(edge_labels[inverse], labels[keep], rtol=0, atol=0)
    empty = unique_edges(rows, labels, torch.zeros_like(keep))
    assert all(t.numel() == 0 and t.dtype == torch.long for t in empty)


# ---------------------------------------------------------------------------------------------
# Objectives


def _objectives(case):
    """(name, policy_loss kwargs, natural path): every objective and the options that change
    which tokens a gradient depends on."""
    mask, group_ids, ent = case["mask"], case["group_ids"], case["entropy"]
    batch = entropy_statistics(ent, mask)
    group = entropy_statistics(ent, mask, norm="group", group_ids=group_ids)
    ref = case["old_logp"] + 0.2
    return [
        ("aepo", {}, "recompute"),
        ("aepo-group", {"entropy_adv_norm": "group", "group_ids": group_ids}, "recompute"),
        ("aepo-stats-bonus", {"entropy_stats": batch, "entropy_coef": 0.05}, "single"),
        ("aepo-group-stats", {"entropy_stats": group, "agg": "seq-mean-token-mean"}, "single"),
        ("grpo", {"objective": "grpo", "clip_ratio_c": None}, "single"),
        ("ppo-kl", {"objective": "ppo", "ref_logp": ref, "kl_coef": 0.1}, "single"),
        ("dapo", {"objective": "dapo", "agg": "seq-mean-token-sum"}, "single"),
        ("gppo", {"objective": "gppo", "gppo_beta_low": 0.5, "gppo_beta_high": 0.7}, "single"),
        ("cispo", {"objective": "cispo", "agg": "constant", "normalizer": 50.0}, "single"),
    ]


def make_case(seed: int, dtype: torch.dtype):
    """A tree with hidden rows, a weight, advantages per branch (mixed signs on shared
    tokens) and old log-probs near the current ones (ratios on both sides of the clips)."""
    rows, labels, mask, group_ids, r = make_tree(seed)
    g = torch.Generator().manual_seed(seed + 100)
    hidden = torch.randn(r, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.7).to(dtype)
    with torch.no_grad():
        logp, ent = naive_linear_logprobs_and_entropy(hidden[rows.clamp(min=0)], weight, labels)
    b = rows.shape[0]
    advantages = torch.randn(b, 1, generator=g).expand(b, rows.shape[1]).contiguous()
    old_logp = (logp + 0.3 * torch.randn(logp.shape, generator=g).to(dtype)).where(
        mask.bool(), float("-inf")
    )  # padding holds -inf, as rollouts leave it
    return {
        "hidden": hidden,
        "weight": weight,
        "rows": rows,
        "labels": labels,
        "mask": mask.to(dtype),
        "group_ids": group_ids,
        "advantages": advantages.to(dtype),
        "old_logp": old_logp,
        "entropy": ent,
    }


def _flat_reference(case, kw, temperature, logits=None):
    """policy_loss on [B, L] gathered from the unique rows: (loss, metrics, grads)."""
    rows, labels = case["rows"].clamp(min=0), case["labels"]
    tokens = (case["old_logp"], case["advantages"], case["mask"])
    if logits is None:
        x = case["hidden"].clone().requires_grad_()
        w = case["weight"].clone().requires_grad_()
        lp, ent = naive_linear_logprobs_and_entropy(x[rows], w, labels, temperature)
        wrt = (x, w)
    else:
        z = logits.clone().requires_grad_()
        lp, ent = naive_logprobs_and_entropy(z[0][rows], labels, temperature)
        wrt = (z,)
    loss, metrics = policy_loss(lp, *tokens, entropy=ent, **kw)
    return loss, metrics, torch.autograd.grad(loss, wrt)


def _up(x):
    """fp64 copies of the floating tensors in ``x`` (a tensor, tuple or dict)."""
    if isinstance(x, dict):
        return {k: _up(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_up(v) for v in x)
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _flat_values(loss, metrics, grads) -> dict[str, torch.Tensor]:
    names = ("d_hidden", "d_weight") if len(grads) == 2 else ("d_logits",)
    return {"loss": loss, **metrics, **dict(zip(names, grads, strict=True))}


def _compare(ours, case, kw, temperature, logits=None):
    """Ours against the flat computation: in fp64, within FP64_TOL of its maximum; in fp32,
    within the tolerance rule against the fp64 flat computation on the same fp32 inputs
    (at most 2x the error of the flat fp32 computation, plus a few ulps)."""
    dtype = case["hidden"].dtype
    ours = _flat_values(*ours)
    plain = _flat_values(*_flat_reference(case, kw, temperature, logits))
    exact = plain
    if dtype != torch.float64:
        exact = _flat_values(*_flat_reference(_up(case), _up(kw), temperature, _up(logits)))
    assert ours.keys() == plain.keys()
    for name, value in ours.items():
        assert value.dtype == plain[name].dtype and value.shape == plain[name].shape, name
        if dtype != torch.float64:
            assert_within_rule(name, value, plain[name], exact[name], value.dtype)
            continue
        scale, err = exact[name].abs().max().item(), max_err(value, exact[name])
        assert err <= FP64_TOL * scale, f"{name}: {err:.3g} vs max |flat| {scale:.3g}"


class _Spy:
    """Rows the hidden-state head ran on: x of the single pass, x of the recompute forward."""

    def __init__(self, monkeypatch):
        self.single, self.recompute = [], []
        real_pass = linear_single_pass.linear_loss_single_pass
        real_forward = linear_torch.linear_forward

        def run_pass(x, *a):
            self.single.append(x.shape[0])
            return real_pass(x, *a)

        def forward(x, *a):
            self.recompute.append(x.shape[0])
            return real_forward(x, *a)

        monkeypatch.setattr(linear_single_pass, "linear_loss_single_pass", run_pass)
        monkeypatch.setattr(linear_torch, "linear_forward", forward)


def _ours_linear(case, kw, temperature, backend, batched):
    x = case["hidden"].clone()
    x = (x.unsqueeze(0) if batched else x).requires_grad_()
    w = case["weight"].clone().requires_grad_()
    tokens = (case["labels"], case["old_logp"], case["advantages"], case["mask"])
    loss, metrics = fused_linear_policy_loss(
        x, w, *tokens, temperature=temperature, backend=backend, rows=case["rows"], **kw
    )
    dx, dw = torch.autograd.grad(loss, (x, w))
    return loss, metrics, (dx.view(case["hidden"].shape), dw)


# ---------------------------------------------------------------------------------------------
# The hidden-state loss


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("path", ["natural", "recompute"])
def test_linear_matches_flat(monkeypatch, dtype, path):
    """Every objective, on the path it takes (single pass, or recompute for AEPO's
    entropy-aware advantage without statistics) and forced onto the recompute path."""
    if path == "recompute":
        monkeypatch.setattr(linear, "_single_pass", lambda *a: False)
    for seed, temperature in ((0, 1.0), (1, 0.7)):
        case = make_case(seed, dtype)
        edges = _edges_by_hand(case["rows"], case["labels"], case["mask"])
        n_edges, n_rows = len(edges), len({row for row, _ in edges})
        assert n_rows < n_edges  # fork rows: the single pass takes each row once
        for i, (name, kw, natural) in enumerate(_objectives(case)):
            spy = _Spy(monkeypatch)
            ours = _ours_linear(case, kw, temperature, "torch", batched=i % 2 == 1)
            _compare(ours, case, kw, temperature)
            ran = natural if path == "natural" else "recompute"
            assert (spy.single, spy.recompute) == (
                ([n_rows], []) if ran == "single" else ([], [n_edges])
            ), name


def test_linear_logprobs_and_entropy_rows():
    """The per-position (logp, H) from unique rows, with a random upstream gradient."""
    case = make_case(2, torch.float64)
    labels = case["labels"].where(case["mask"].bool(), -100)
    g = torch.Generator().manual_seed(0)
    up = [torch.randn(labels.shape, generator=g, dtype=torch.float64) for _ in range(2)]

    def run(fn, gather):
        x = case["hidden"].clone().requires_grad_()
        w = case["weight"].clone().requires_grad_()
        x_in = x[case["rows"].clamp(min=0)] if gather else x
        outs = fn(x_in, w, labels)
        grads = torch.autograd.grad(
            sum((o * u).sum() for o, u in zip(outs, up, strict=True)), (x, w)
        )
        return *outs, *grads

    ours = run(lambda x, w, y: linear_logprobs_and_entropy(x, w, y, rows=case["rows"]), False)
    ref = run(lambda x, w, y: naive_linear_logprobs_and_entropy(x, w, y), True)
    for name, a, b in zip(("logp", "entropy", "dx", "dw"), ours, ref, strict=True):
        assert max_err(a, b) <= FP64_TOL * b.abs().max().item(), name
    assert (ours[0][~case["mask"].bool()] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_linear_logprobs_and_entropy_rows_no_grad(monkeypatch, dtype):
    """Without autograd (the trainer's old log-probs) the head runs once per unique row, a
    fork row's extra labels from their logit gap to the primary label's: within the tolerance
    rule of the flat computation."""
    case = make_case(4, dtype)
    labels = case["labels"].where(case["mask"].bool(), -100)
    edges = _edges_by_hand(case["rows"], case["labels"], case["mask"])
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        ours = linear_logprobs_and_entropy(
            case["hidden"],
            case["weight"],
            labels,
            temperature=0.7,
            backend="torch",
            rows=case["rows"],
        )
    assert spy.recompute == [len({row for row, _ in edges})] < [len(edges)]
    x = case["hidden"][case["rows"].clamp(min=0)]
    plain = naive_linear_logprobs_and_entropy(x, case["weight"], labels, 0.7)
    exact = naive_linear_logprobs_and_entropy(_up(x), _up(case["weight"]), labels, 0.7)
    keep = case["mask"].bool()
    for name, a, b, e in zip(("logp", "entropy"), ours, plain, exact, strict=True):
        if dtype == torch.float64:
            assert max_err(a[keep], e[keep]) <= FP64_TOL * e[keep].abs().max().item(), name
        else:
            assert_within_rule(name, a[keep], b[keep], e[keep], a.dtype)


def test_linear_triton_interpreted(monkeypatch):
    """The triton backend (GEMMs + row kernels through the interpreter) on one tree, single
    pass and recompute path."""
    case = make_case(3, torch.float32)
    ok = [o for o in _objectives(case) if o[0] in ("aepo", "aepo-stats-bonus")]
    for _, kw, _ in ok:
        ours = _ours_linear(case, kw, 0.7, "triton", batched=False)
        _compare(ours, case, kw, 0.7)


# ---------------------------------------------------------------------------------------------
# The logits loss


def _ours_logits(case, logits, kw, temperature, backend, inplace_grad=False):
    z = logits.clone().requires_grad_()
    z_in = z * 1.0 if inplace_grad else z  # a non-leaf to overwrite
    tokens = (case["labels"], case["old_logp"], case["advantages"], case["mask"])
    loss, metrics = fused_policy_loss(
        z_in,
        *tokens,
        temperature=temperature,
        backend=backend,
        inplace_grad=inplace_grad,
        rows=case["rows"],
        **kw,
    )
    return loss, metrics, torch.autograd.grad(loss, (z,))


def _logits(case):
    g = torch.Generator().manual_seed(7)
    r = case["hidden"].shape[0]
    return (3 * torch.randn(1, r, V, generator=g)).to(case["hidden"].dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_logits_matches_flat(monkeypatch, dtype):
    """Every objective; the kernels run once over the R unique rows, one label a row."""
    calls = []
    real = fused_loss_module.forward_stats
    monkeypatch.setattr(
        fused_loss_module, "forward_stats", lambda z, y, *a: calls.append(y) or real(z, y, *a)
    )
    for seed, temperature in ((0, 1.0), (1, 0.7)):
        case = make_case(seed, dtype)
        logits = _logits(case)
        edge_rows = {e[0] for e in _edges_by_hand(case["rows"], case["labels"], case["mask"])}
        for i, (name, kw, _) in enumerate(_objectives(case)):
            calls.clear()
            ours = _ours_logits(case, logits, kw, temperature, "torch", inplace_grad=i % 3 == 0)
            _compare(ours, case, kw, temperature, logits)
            assert len(calls) == 1 and calls[0].shape == logits.shape[:-1], name
            assert int((calls[0] != -100).sum()) == len(edge_rows), name


def test_logits_compile_branch(monkeypatch):
    """What fused_policy_loss runs under torch.compile with rows (the differentiable
    composition, an [X, V] copy of the fork rows), here eagerly."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    case = make_case(4, torch.float64)
    logits = _logits(case)
    for _, kw, _ in _objectives(case)[:3]:
        ours = _ours_logits(case, logits, kw, 0.7, "torch")
        _compare(ours, case, kw, 0.7, logits)


def test_logits_triton_interpreted():
    case = make_case(3, torch.float32)
    logits = _logits(case)
    for _, kw, _ in _objectives(case)[2:4]:
        ours = _ours_logits(case, logits, kw, 0.7, "triton", inplace_grad=True)
        _compare(ours, case, kw, 0.7, logits)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("loss", ["linear", "logits"])
def test_bad_rows(loss):
    case = make_case(5, torch.float32)
    rows, r = case["rows"], case["hidden"].shape[0]
    tokens = (case["labels"], case["old_logp"], case["advantages"], case["mask"])
    logits = _logits(case)
    if loss == "linear":
        call = lambda rows, table=case["hidden"]: fused_linear_policy_loss(
            table, case["weight"], *tokens, rows=rows, backend="torch"
        )
    else:
        call = lambda rows, table=logits: fused_policy_loss(
            table, *tokens, rows=rows, backend="torch"
        )
    with pytest.raises(TypeError, match="int64"):
        call(rows.int())
    with pytest.raises(ValueError, match="must equal labels shape"):
        call(rows[:, :-1])
    with pytest.raises(ValueError, match=rf"rows must be in \[-1, {r}\)"):
        call(rows.where(rows != 3, r))
    with pytest.raises(ValueError, match=r"rows must be in \[-1"):
        call(rows.where(rows != 3, -2))
    kept = case["mask"].bool()
    orphan = rows.clone()
    orphan[kept.nonzero()[0].tolist()] = -1
    with pytest.raises(ValueError, match=r"kept tokens .* need a row >= 0"):
        call(orphan)
    table = case["hidden"] if loss == "linear" else logits[0]
    with pytest.raises(ValueError, match=r"unique rows \[R, X\] or \[1, R, X\]"):
        call(rows, table=torch.stack([table, table]))
