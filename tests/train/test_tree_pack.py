"""Tree packing: the trie layout exactly, the tree attention against per-row attention, and a
tiny HF model's tree forward and backward against its flat padded forward (fp32)."""

import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from aepo.train import tree_attention as ta
from aepo.train.tree_attention import (
    ATTN_NAME,
    TreePackingError,
    sdpa_tree_attention,
    tree_blocker,
    tree_forward,
)
from aepo.train.tree_pack import pack_tree, unpack

PAD = 99  # padding holds a real token id on purpose: only the mask may decide


def _batch(rows: list[list[int]], width: int | None = None):
    """Right-padded [B, L] ids and mask from token lists."""
    width = width or max(map(len, rows))
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(row)] = 1
    return ids, mask


# Group A (prompt 10 11 12) has depth 4 below its prompt: [1 2] -> [3] -> [4] / [6 7], a fork
# at the first response token (8 9), a branch of another length (5) and a duplicate row;
# group B (prompt 20 21) answers with A's tokens, which must not be shared, and one of its rows
# extends the other, so a row ends inside a segment.
HAND_ROWS = [
    [10, 11, 12, 1, 2, 3, 4],
    [10, 11, 12, 1, 2, 5],
    [10, 11, 12, 1, 2, 3, 6, 7],
    [10, 11, 12, 8, 9],
    [20, 21, 1, 2],
    [10, 11, 12, 1, 2, 3, 4],
    [],
    [20, 21, 1, 2, 3],
]


def test_pack_hand_built_tree():
    ids, mask = _batch(HAND_ROWS)
    pack = pack_tree(ids, mask)
    segments = [[10, 11, 12], [1, 2], [3], [4], [6, 7], [5], [8, 9], [20, 21, 1, 2, 3]]
    assert pack.input_ids.tolist() == [[tok for seg in segments for tok in seg]]
    assert pack.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 6, 7, 5, 3, 4, 0, 1, 2, 3, 4]]
    assert pack.seg_bounds.dtype == pack.kv_bounds.dtype == torch.int32
    assert pack.seg_bounds.tolist() == [0, 3, 5, 6, 7, 9, 10, 12, 17]
    kv = [
        [0, 1, 2],
        [0, 1, 2, 3, 4],
        [0, 1, 2, 3, 4, 5],
        [0, 1, 2, 3, 4, 5, 6],
        [0, 1, 2, 3, 4, 5, 7, 8],
        [0, 1, 2, 3, 4, 9],
        [0, 1, 2, 10, 11],
        [12, 13, 14, 15, 16],
    ]
    bounds = pack.kv_bounds.tolist()
    assert [pack.kv_index[bounds[s] : bounds[s + 1]].tolist() for s in range(8)] == kv
    assert bounds == [0, 3, 8, 14, 21, 29, 35, 40, 45]
    x = -1
    assert pack.index.tolist() == [
        [0, 1, 2, 3, 4, 5, 6, x],
        [0, 1, 2, 3, 4, 9, x, x],
        [0, 1, 2, 3, 4, 5, 7, 8],
        [0, 1, 2, 10, 11, x, x, x],
        [12, 13, 14, 15, x, x, x, x],
        [0, 1, 2, 3, 4, 5, 6, x],
        [x] * 8,
        [12, 13, 14, 15, 16, x, x, x],
    ]
    assert (pack.num_tokens, pack.num_segments, pack.max_q, pack.max_k) == (17, 8, 5, 8)
    assert pack.flat_tokens == sum(map(len, HAND_ROWS)) == 42
    assert pack.ratio == pytest.approx(17 / 42)


def test_pack_no_sharing_and_all_padding():
    ids, mask = _batch([[5, 6, 7], [8, 9], []])
    pack = pack_tree(ids, mask)
    assert pack.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert pack.seg_bounds.tolist() == [0, 3, 5]
    assert pack.kv_index.tolist() == [0, 1, 2, 3, 4]
    assert pack.ratio == 1.0
    empty = pack_tree(*_batch([[], []], width=4))
    assert (empty.num_tokens, empty.num_segments, empty.seg_bounds.tolist()) == (0, 0, [0])
    assert (empty.index == -1).all()


def _random_tree(seed: int, groups: int = 3, per_group: int = 5, vocab: int = 6):
    """Rows of a rollout tree: per group a prompt, paths forked off earlier paths at random
    depths (a small vocabulary makes accidental sharing across groups likely), a duplicate
    row, a row of a repeated prompt and an all-padding row."""
    rng = random.Random(seed)
    rows = []
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(2, 5))] for _ in range(groups)]
    prompts.append(list(prompts[0]))
    for prompt in prompts:
        paths = [prompt + [rng.randrange(vocab) for _ in range(rng.randint(1, 8))]]
        for _ in range(per_group - 1):
            parent = rng.choice(paths)
            fork = rng.randint(len(prompt), len(parent))
            paths.append(parent[:fork] + [rng.randrange(vocab) for _ in range(rng.randint(0, 6))])
        rows += paths
    rows += [list(rows[1]), []]
    rng.shuffle(rows)
    return rows


def _check_layout(rows: list[list[int]], pack) -> None:
    """The compressed-trie contract, checked against prefixes of the rows themselves."""
    node = {}  # prefix -> packed position
    for b, row in enumerate(rows):
        for t in range(len(rows[b])):
            p = int(pack.index[b, t])
            assert node.setdefault(tuple(row[: t + 1]), p) == p  # equal prefix, same token
            assert pack.input_ids[0, p] == row[t] and pack.position_ids[0, p] == t
            assert t == 0 or pack.index[b, t - 1] < p  # parents first
        assert (pack.index[b, len(row) :] == -1).all()
    assert len(set(node.values())) == len(node) == pack.num_tokens  # one token per trie node
    children = {p: set() for p in node.values()}
    for prefix, p in node.items():
        if len(prefix) > 1:
            children[node[prefix[:-1]]].add(p)
    qb, kb = pack.seg_bounds.tolist(), pack.kv_bounds.tolist()
    for s in range(pack.num_segments):
        for p in range(qb[s], qb[s + 1] - 1):
            assert children[p] == {p + 1}  # a chain of single-child nodes
        assert len(children[qb[s + 1] - 1]) != 1  # and maximal
        keys = pack.kv_index[kb[s] : kb[s + 1]].tolist()
        assert keys[-(qb[s + 1] - qb[s]) :] == list(range(qb[s], qb[s + 1]))
        assert pack.position_ids[0, keys].tolist() == list(range(len(keys)))
        assert all(c in children[a] for a, c in itertools.pairwise(keys))


@pytest.mark.parametrize("seed", range(6), ids=lambda s: f"seed{s}")
def test_pack_random_trees(seed):
    rows = _random_tree(seed)
    pack = pack_tree(*_batch(rows))
    _check_layout(rows, pack)
    assert pack.max_k == max(map(len, rows))


def test_pack_rejects_bad_inputs():
    ids, mask = _batch([[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError, match=r"input_ids must be \[B, L\]"):
        pack_tree(ids[0], mask[0])
    with pytest.raises(ValueError, match="differs from input_ids"):
        pack_tree(ids, mask[:, :2])
    with pytest.raises(ValueError, match="integer token ids"):
        pack_tree(ids.float(), mask)
    with pytest.raises(ValueError, match="only 0 and 1"):
        pack_tree(ids, mask * 2)
    left = torch.tensor([[1, 1, 1], [0, 1, 1]])
    with pytest.raises(ValueError, match="row 1 is not right-padded: position 0 is 0 and 1 is 1"):
        pack_tree(ids, left)


def test_unpack_gathers_and_sums_gradients():
    ids, mask = _batch(HAND_ROWS)
    pack = pack_tree(ids, mask)
    values = torch.randn(1, pack.num_tokens, 3, requires_grad=True)
    flat = unpack(values, pack)  # [B, L, 3]
    assert flat.shape == (*ids.shape, 3)
    assert (flat[mask == 0] == 0).all()
    assert torch.equal(flat[mask == 1], values[0, pack.index[mask == 1]])
    assert torch.equal(unpack(values[0], pack), flat)
    flat.sum().backward()
    uses = torch.bincount(pack.index[mask == 1], minlength=pack.num_tokens).float()
    assert torch.equal(values.grad[0], uses[:, None].expand(-1, 3))  # each use adds its grad
    with pytest.raises(ValueError, match="T=17"):
        unpack(values[0, :5], pack)


def _per_row_attention(q, k, v, ids, mask, pack, scale):
    """Causal attention of each flat row over its own path: the definition tree attention must
    reproduce. q: [T, Hq, d]; k, v: [T, Hkv, d]. Returns [B, L, Hq, d]."""
    rep = q.shape[1] // k.shape[1]
    out = torch.zeros(*ids.shape, *q.shape[1:], dtype=q.dtype)
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        if n == 0:
            continue
        path = pack.index[b, :n]
        qb = q[path].transpose(0, 1)  # [Hq, n, d]
        kb = k[path].transpose(0, 1).repeat_interleave(rep, 0)
        vb = v[path].transpose(0, 1).repeat_interleave(rep, 0)
        scores = (qb @ kb.transpose(1, 2)) * scale
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        out[b, :n] = (scores.softmax(-1) @ vb).transpose(0, 1)
    return out


def test_sdpa_tree_attention_matches_per_row_attention(monkeypatch):
    rows = _random_tree(7)
    ids, mask = _batch(rows)
    pack = pack_tree(ids, mask)
    t, hq, hkv, d = pack.num_tokens, 4, 2, 8
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(t, h, d, dtype=torch.float64, generator=gen) for h in (hq, hkv, hkv))
    shapes = []
    sdpa = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kw):
        shapes.append((query.shape[0], *attn_mask.shape))
        assert attn_mask.shape == (query.shape[2], key.shape[2])
        return sdpa(query, key, value, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(ta.F, "scaled_dot_product_attention", spy)
    out = sdpa_tree_attention(q, k, v, pack, scale=0.3)  # [T, Hq, d]
    monkeypatch.undo()
    ref = _per_row_attention(q, k, v, ids, mask, pack, scale=0.3)
    real = mask == 1
    torch.testing.assert_close(unpack(out, pack)[real], ref[real], rtol=0, atol=1e-12)
    # Memory is per segment: the score blocks add up to sum over segments of Lq * Lk.
    qb, kb = pack.seg_bounds.tolist(), pack.kv_bounds.tolist()
    per_segment = sum((qb[s + 1] - qb[s]) * (kb[s + 1] - kb[s]) for s in range(pack.num_segments))
    assert sum(g * lq * lk for g, lq, lk in shapes) == per_segment
    assert max(lq * lk for _, lq, lk in shapes) < t * t
    assert len(shapes) < pack.num_segments  # equal shapes share a call


def _tiny(family: str):
    common = dict(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    return Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _loss_and_grads(model, weights, run):
    """run() -> (hidden, logits) [B, L, .], zeros at padding; the loss is a fixed random linear
    function of both. Returns them and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    hidden, logits = run()
    dtype = hidden.dtype
    loss = (weights[0].to(dtype) * hidden).sum() + (weights[1].to(dtype) * logits).sum()
    loss.backward()
    return (
        hidden.detach(),
        logits.detach(),
        {n: p.grad.clone() for n, p in model.named_parameters()},
    )


def _flat_reference(model, weights, flat):
    """The flat forward's outputs and gradients in fp32, and its gradients in fp64."""
    ref = _loss_and_grads(model, weights, flat)
    model.double()
    exact = _loss_and_grads(model, weights, flat)[2]
    model.float()
    return ref, exact


def _assert_matches_flat(reference, tree_result) -> None:
    (h_flat, l_flat, g_flat), g_exact = reference
    h_tree, l_tree, g_tree = tree_result
    # Measured on CPU fp32 (tests' trees, llama / qwen2 / qwen3): hidden <= 3.2e-7, logits
    # <= 4.2e-7 of flat.
    assert _rel(h_tree, h_flat) <= 1e-6
    assert _rel(l_tree, l_flat) <= 1e-6
    # Gradients: tree vs flat fp32 measured 0.8e-6 .. 1.3e-6, as far as flat fp32 is from fp64
    # (0.6e-6 .. 1.6e-6): summing a shared token's contributions in another order is fp32
    # noise. So the rule is flash-attention's: the tree's worst error against fp64 at most 2x
    # flat fp32's (measured ratio 0.9 .. 1.1).
    ours = max(_rel(g_tree[n], g_exact[n]) for n in g_exact)
    plain = max(_rel(g_flat[n], g_exact[n]) for n in g_exact)
    assert ours <= 2 * plain, (ours, plain)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("base", [False, True], ids=["causal_lm", "base_model"])
def test_tree_forward_matches_flat(family, base):
    model = _tiny(family)
    rows = _random_tree(3, vocab=100)
    ids, mask = _batch(rows)
    pack = pack_tree(ids, mask)
    assert pack.ratio < 0.8
    real = mask[..., None].float()  # [B, L, 1]
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(*ids.shape, n, generator=gen) * real for n in (64, 100)]

    def flat():
        out = (model.model if base else model)(
            input_ids=ids, attention_mask=mask, output_hidden_states=True
        )
        h = out.last_hidden_state if base else out.hidden_states[-1]
        return h * real.to(h.dtype), model.lm_head(h) * real.to(h.dtype)

    def tree():
        with tree_forward(model):
            out = (model.model if base else model)(
                input_ids=pack.input_ids,
                position_ids=pack.position_ids,
                aepo_tree=pack,
                use_cache=False,
                output_hidden_states=True,
            )
        h = out.last_hidden_state if base else out.hidden_states[-1]
        return unpack(h, pack), unpack(model.lm_head(h), pack)

    reference = _flat_reference(model, weights, flat)
    _assert_matches_flat(reference, _loss_and_grads(model, weights, tree))
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_tree_forward_under_gradient_checkpointing(reentrant):
    """The checkpoint recompute runs in backward, outside the block: it must replay on tree
    attention (a reentrant checkpoint would otherwise replay silently on full causal sdpa)."""
    model = _tiny("llama")
    ids, mask = _batch(HAND_ROWS)
    pack = pack_tree(ids, mask)
    real = mask[..., None].float()
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(*ids.shape, n, generator=gen) * real for n in (64, 100)]

    def flat():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return out.hidden_states[-1] * real.to(out.logits.dtype), out.logits * real.to(
            out.logits.dtype
        )

    def tree():
        with tree_forward(model):
            out = model(
                input_ids=pack.input_ids,
                position_ids=pack.position_ids,
                aepo_tree=pack,
                output_hidden_states=True,
            )
        return unpack(out.hidden_states[-1], pack), unpack(out.logits, pack)

    reference = _flat_reference(model, weights, flat)
    model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    model.train()
    _assert_matches_flat(reference, _loss_and_grads(model, weights, tree))
    ckpt = model.model.layers[0]._gradient_checkpointing_func
    assert ckpt.func is torch.utils.checkpoint.checkpoint  # unwrapped again


def test_tree_attention_needs_the_pack():
    model = _tiny("llama")
    pack = pack_tree(*_batch(HAND_ROWS))
    with tree_forward(model), pytest.raises(TreePackingError, match="aepo_tree=pack"):
        model(input_ids=pack.input_ids, position_ids=pack.position_ids)


def _small(cls, config_cls, **kw):
    dims = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    return cls(config_cls(vocab_size=100, num_hidden_layers=2, **dims, **kw))


def test_blocker_refuses_recurrent_layers():
    mamba = MambaForCausalLM(
        MambaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, state_size=4)
    )
    assert "model_type 'mamba'" in tree_blocker(mamba)
    assert "recurrent state" in tree_blocker(mamba)
    with (
        pytest.raises(TreePackingError, match=r"MambaForCausalLM.*recurrent state"),
        tree_forward(mamba),
    ):
        pass
    hybrid = _small(LlamaForCausalLM, LlamaConfig)
    assert tree_blocker(hybrid) is None
    hybrid.config.layer_types = ["full_attention", "linear_attention"]
    assert "'linear_attention' layers" in tree_blocker(hybrid)

    class FakeMambaMixer(torch.nn.Module):
        pass

    plain = _small(LlamaForCausalLM, LlamaConfig)
    plain.model.layers[0].mixer = FakeMambaMixer()
    assert "layer FakeMambaMixer keeps recurrent state" in tree_blocker(plain)


def test_blocker_refuses_sliding_windows_that_bite():
    qwen = _small(
        Qwen2ForCausalLM,
        Qwen2Config,
        use_sliding_window=True,
        sliding_window=6,
        max_window_layers=0,
    )
    assert "sliding_attention layers (window 6)" in tree_blocker(qwen)
    assert tree_blocker(qwen, max_len=6) is None  # a window no row outgrows cuts nothing
    assert tree_blocker(_small(Qwen2ForCausalLM, Qwen2Config)) is None  # use_sliding_window off
    mistral = _small(MistralForCausalLM, MistralConfig, sliding_window=6)
    assert "sliding-window attention (window 6)" in tree_blocker(mistral)
    with pytest.raises(TreePackingError, match="window 6"), tree_forward(mistral):
        pass
    assert mistral.config._attn_implementation == "sdpa"
    # Rows longer than the window are caught in the forward too, when max_len was wrong.
    pack = pack_tree(*_batch(HAND_ROWS))
    with tree_forward(qwen, max_len=6), pytest.raises(TreePackingError, match="longest row"):
        qwen(input_ids=pack.input_ids, position_ids=pack.position_ids, aepo_tree=pack)


def test_tree_forward_restores_the_implementation():
    model = _small(LlamaForCausalLM, LlamaConfig, attn_implementation="sdpa")
    with tree_forward(model):
        assert model.config._attn_implementation == ATTN_NAME
        assert model.model.layers[0].self_attn.config._attn_implementation == ATTN_NAME
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="boom"), tree_forward(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    ta.register()
    ta.register()  # idempotent


def _long_tree(seed: int) -> list[list[int]]:
    """Segments longer than flash-attn's blocks: a 300-token prompt, forks hundreds deep."""
    rng = random.Random(seed)
    paths = [[rng.randrange(100) for _ in range(300)]]
    for _ in range(5):
        parent = rng.choice(paths)
        fork = rng.randint(250, len(parent))
        paths.append(parent[:fork] + [rng.randrange(100) for _ in range(rng.randint(1, 200))])
    return paths[1:]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tree", ["short", "long"])
def test_flash_path_matches_sdpa_path(cuda, dtype, tree):
    pytest.importorskip("flash_attn")
    rows = _random_tree(11, vocab=100) if tree == "short" else _long_tree(0)
    pack = pack_tree(*_batch(rows)).to(cuda)
    t, hq, hkv, d = pack.num_tokens, 8, 2, 64
    gen = torch.Generator(device=cuda).manual_seed(0)
    qkv64 = [
        torch.randn(t, h, d, generator=gen, device=cuda, dtype=torch.float64)
        for h in (hq, hkv, hkv)
    ]
    grad = torch.randn(t, hq, d, generator=gen, device=cuda, dtype=torch.float64)

    def run(fn, dt):
        x = [a.detach().clone().to(dt).requires_grad_() for a in qkv64]
        out = fn(*x, pack, d**-0.5)
        out.backward(grad.to(dt))
        return [out.double()] + [a.grad.double() for a in x]

    ref = run(sdpa_tree_attention, torch.float64)
    ours = run(ta.flash_tree_attention, dtype)
    torch_low = run(sdpa_tree_attention, dtype)
    for name, r, o, p in zip(["out", "dq", "dk", "dv"], ref, ours, torch_low, strict=True):
        err, base = (o - r).abs().max().item(), (p - r).abs().max().item()
        rounding = ((r.to(dtype) + 0.3 - 0.3).double() - r).abs().max().item()
        assert err <= 2 * base + 2 * rounding, (name, err, base)  # flash-attention's rule
    # The attention-interface entry point takes the flash path for 16-bit CUDA tensors.
    q, k, v = (a.to(dtype).transpose(0, 1)[None] for a in qkv64)  # [1, H, T, d]
    entry = ta.tree_attention(None, q, k, v, None, scaling=d**-0.5, aepo_tree=pack)[0]
    direct = ta.flash_tree_attention(
        q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), pack, d**-0.5
    )
    assert torch.equal(entry[0], direct)


def test_missing_flash_attn_on_cuda_warns_once_with_the_import_error():
    """Tree packing on a GPU without a usable flash-attn falls back to SDPA: said once, with
    the import error and the install command (GPU_AUDIT 1.6 / 19), never on the CPU."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    from aepo.train import tree_attention as ta

    if ta.flash_attn_problem() is None:
        pytest.skip("flash-attn is importable here")
    with FakeTensorMode():
        q_gpu = torch.empty(4, 2, 32, device="cuda", dtype=torch.bfloat16)
    ta._warn_sdpa_fallback.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not ta._flash_ok(q_gpu) and not ta._flash_ok(q_gpu)
        assert not ta._flash_ok(torch.empty(4, 2, 32, dtype=torch.bfloat16))  # CPU: silent
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "flash_attn" in messages[0] and "--no-build-isolation" in messages[0]
