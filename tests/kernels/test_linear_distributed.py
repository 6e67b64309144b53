"""Vocab-parallel hidden-state path on 2 gloo ranks: each rank holds a contiguous shard of the
lm_head weight (unequal sizes: V is odd) and gets the single-process logp, entropy, hidden
gradient and its shard of the weight gradient, for both backends; shards that disagree in H
are refused on every rank."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from aepo.kernels import fused_linear_policy_loss, linear_gemm, linear_logprobs_and_entropy
from tests.helpers import spawn_ranks

WORLD, N, H, V = 2, 23, 32, 301
SPLIT = (150, 151)  # rank 0 owns ids [0, 150), rank 1 [150, 301)


def _small_blocks(set_) -> None:
    """Several row blocks and vocabulary slices per shard on the triton backend."""
    set_(linear_gemm, "WORKSPACE_BYTES", 4096)
    set_(linear_gemm, "MIN_SLICE", 64)


def _inputs():
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.4
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::6] = -100
    mask = (labels != -100).float()
    extra = {k: torch.randn(N, generator=g) for k in ("g_lp", "g_h", "old", "adv")}
    return hidden, weight, labels, mask, extra


def _outputs(hidden, weight, labels, mask, extra, backend, group):
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = linear_logprobs_and_entropy(x, w, labels, backend=backend, process_group=group)
    dx, dw = torch.autograd.grad((lp * extra["g_lp"] + ent * extra["g_h"]).sum(), (x, w))
    x2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    old = lp.detach() + 0.2 * extra["old"]
    loss, _ = fused_linear_policy_loss(
        x2,
        w2,
        labels,
        old,
        extra["adv"],
        mask,
        backend=backend,
        process_group=group,
        objective="aepo",
        entropy_coef=0.01,
    )
    ldx, ldw = torch.autograd.grad(loss, (x2, w2))
    return {"lp": lp, "ent": ent, "dx": dx, "dw": dw, "loss": loss, "ldx": ldx, "ldw": ldw}


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=WORLD,
        init_method=f"tcp://127.0.0.1:{port}",
        timeout=timedelta(seconds=60),
    )
    _small_blocks(setattr)
    try:
        hidden, weight, labels, mask, extra = _inputs()
        start = sum(SPLIT[:rank])
        shard = weight[start : start + SPLIT[rank]]
        out = {
            b: _outputs(hidden, shard, labels, mask, extra, b, dist.group.WORLD)
            for b in ("torch", "triton")
        }
        # rank 1 is consistent with itself but not with rank 0: H = 33 there
        bad_x, bad_w = torch.zeros(N, H + rank), torch.zeros(SPLIT[rank], H + rank)
        try:
            linear_logprobs_and_entropy(bad_x, bad_w, labels, process_group=dist.group.WORLD)
        except ValueError as exc:
            out["h_error"] = str(exc)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("ranks"), timeout_s=180)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vocab_parallel_equals_single_rank(ranks, backend, monkeypatch):
    _small_blocks(monkeypatch.setattr)
    hidden, weight, labels, mask, extra = _inputs()
    single = _outputs(hidden, weight, labels, mask, extra, backend, None)
    tol = {"rtol": 2e-6, "atol": 2e-6}
    for r, out in enumerate(ranks):
        got = out[backend]
        for key in ("lp", "ent", "dx", "loss", "ldx"):
            torch.testing.assert_close(got[key], single[key], **tol, msg=f"rank {r} {key}")
        rows = slice(sum(SPLIT[:r]), sum(SPLIT[: r + 1]))
        torch.testing.assert_close(got["dw"], single["dw"][rows], **tol)
        torch.testing.assert_close(got["ldw"], single["ldw"][rows], **tol)
    # every rank gets bitwise the same full-vocabulary statistics (one gather, one merge order)
    assert torch.equal(ranks[0][backend]["lp"], ranks[1][backend]["lp"])
    assert torch.equal(ranks[0][backend]["ent"], ranks[1][backend]["ent"])
    # a shard alone is not the answer: the merge is what makes it right
    alone = linear_logprobs_and_entropy(hidden, weight[: SPLIT[0]], labels.clamp(max=SPLIT[0] - 1))
    assert (alone[1] - single["ent"]).abs().max() > 1e-2


def test_shards_that_disagree_in_h_are_refused_everywhere(ranks):
    for out in ranks:
        assert "disagree in H" in out["h_error"]
        assert "(150, 32)" in out["h_error"] and "(151, 33)" in out["h_error"]
